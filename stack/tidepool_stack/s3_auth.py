"""`rclone serve s3 --auth-proxy` program: maps an access key to its secret and its organization's root.

rclone runs it with the request's access key ID as JSON on stdin and caches the answer for 5 minutes.
Unknown, malformed and expired keys get an empty secret, which makes rclone refuse the request.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tidepool_runtime.object_keys import parse_key, secret_for

REFUSED = {"type": "local", "_root": "/nonexistent", "_secret_access_key": ""}


def answer(request: dict[str, str], master_secret: str, objects_dir: Path, bucket: str) -> dict[str, str]:
    access_key_id = request.get("user", "")
    scope = parse_key(access_key_id)
    if scope is None or not master_secret:
        return REFUSED
    root = objects_dir / "orgs" / scope.organization_id
    (root / bucket).mkdir(parents=True, exist_ok=True)  # top-level directories are buckets
    return {
        "type": "local",
        "_root": str(root),
        "_secret_access_key": secret_for(master_secret, access_key_id),
    }


def main() -> None:
    request = json.loads(sys.stdin.read() or "{}")
    reply = answer(
        request,
        os.environ.get("TIDEPOOL_S3_SECRET_KEY", ""),
        Path(os.environ["TIDEPOOL_S3_OBJECTS_DIR"]),
        os.environ.get("TIDEPOOL_S3_BUCKET", "tidepool-builds"),
    )
    json.dump(reply, sys.stdout)


if __name__ == "__main__":
    main()
