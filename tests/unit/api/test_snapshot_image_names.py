"""A snapshot's image name as the API validates it: a numeric tag of a short name (`node:22`, the short
form of a Docker Hub image, issue #15) is a tag, not a registry port."""

from __future__ import annotations

import pytest

from tidepool_api.errors import ApiError
from tidepool_api.snapshots import validate_image_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "image",
    [
        "node:22",
        "mirrored-ab12cd34:1",
        "python:3.12-slim",
        "docker.io/library/redis:7",
        "127.0.0.1:5000/library/x:1",
        "localhost/tidepool/default:0.3.0",
        f"python@{DIGEST}",
        f"registry.example:443/team/app:2@{DIGEST}",
    ],
)
def test_pinned_names_are_accepted(image: str) -> None:
    validate_image_reference(image)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("node", "must include a tag"),
        ("127.0.0.1:5000/library/x", "must include a tag"),
        ("node:latest", "not supported"),
        ("Node:22", "Invalid image name"),
    ],
)
def test_unpinned_or_malformed_names_are_refused(image: str, message: str) -> None:
    with pytest.raises(ApiError) as refused:
        validate_image_reference(image)
    assert refused.value.status_code == 400
    assert message in refused.value.message
