"""Organization-scoped object-storage keys and the embedded storage's auth proxy."""

from __future__ import annotations

from pathlib import Path

from tidepool_runtime.object_keys import parse_key, secret_for, service_key, user_key
from tidepool_stack.s3_auth import REFUSED, answer

MASTER = "m" * 40


def test_user_keys_expire_and_name_their_organization() -> None:
    access_key, secret, expires_at = user_key(MASTER, "org-1", 60)
    scope = parse_key(access_key, MASTER)
    assert scope is not None and scope.organization_id == "org-1" and scope.expires_at == expires_at
    assert secret == secret_for(MASTER, access_key)
    assert parse_key(access_key, MASTER, now=expires_at + 1) is None


def test_malformed_keys_are_rejected() -> None:
    for bad in ("", "AKIA123", "TPU.org/../x.99999999999.ab", "TPS.org-1.5.", "TPU.org-1.x.ab"):
        assert parse_key(bad, MASTER) is None


def test_only_keys_the_platform_minted_are_accepted() -> None:
    access_key, _, _ = user_key(MASTER, "org-1", 60)
    assert parse_key(access_key, "x" * 40) is None  # another master secret
    body, tag = access_key.rsplit(".", 1)
    forged = f"{body.replace('org-1', 'org-9')}.{tag}"  # someone else's organization, same tag
    assert parse_key(forged, MASTER) is None
    assert parse_key(f"{body}.{'0' * 20}", MASTER) is None


def test_auth_proxy_maps_keys_to_their_organization_root(tmp_path: Path) -> None:
    access_key, secret = service_key(MASTER, "org-2")
    reply = answer({"user": access_key}, MASTER, tmp_path, "builds")
    assert reply["_root"] == str(tmp_path / "orgs" / "org-2")
    assert reply["_secret_access_key"] == secret
    assert (tmp_path / "orgs" / "org-2" / "builds").is_dir()
    expired, _, _ = user_key(MASTER, "org-2", -1)
    assert answer({"user": expired}, MASTER, tmp_path, "builds") == REFUSED
    assert answer({"user": "TPU.org-2"}, MASTER, tmp_path, "builds") == REFUSED
    assert answer({"user": access_key}, "", tmp_path, "builds") == REFUSED
    # A well-formed key the platform did not mint creates nothing (rclone would refuse it only afterwards).
    body, _ = user_key(MASTER, "org-forged", 60)[0].rsplit(".", 1)
    assert answer({"user": f"{body}.{'0' * 20}"}, MASTER, tmp_path, "builds") == REFUSED
    assert not (tmp_path / "orgs" / "org-forged").exists()
