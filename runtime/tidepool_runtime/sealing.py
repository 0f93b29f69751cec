"""Secrets that cross the bus travel sealed (Fernet) with a key only the two services concerned hold.

- sandbox signing keys (KV `KV_SIGNING_KEYS`): sealed by the API, opened by the proxy (`signing_seal_key`);
- organizations' registry passwords (request/reply `tidepool.rpc.registry.credentials`): sealed by the API,
  opened by the builder (`registry_seal_key`);
- organizations' OTLP headers (KV `KV_ORGANIZATION_TELEMETRY`): sealed by the API, opened by the telemetry
  service (`otel_seal_key`).

Whoever reads the bucket, the stream store on disk or a reply without the key learns nothing usable. A key
left empty is generated once under the data directory (0600), which suits a single machine; services on
different machines must be given the same key (Kubernetes: the Secrets of deploy/k8s).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

SIGNING_KEYS = "signing-keys"
REGISTRY_CREDENTIALS = "registry-credentials"
OTEL_HEADERS = "otel-headers"


class Sealer:
    """Seals and opens strings with a key derived from `secret` for one `purpose` (a sealer of one purpose
    cannot open another's)."""

    def __init__(self, secret: str, purpose: str, *, derivation: bytes | None = None) -> None:
        """`derivation`: the prefix the key is derived with (default: the bus's, per purpose); the API's
        secrets at rest use their own (tidepool_api.secrets_box)."""
        if not secret:
            raise ValueError("a sealing key is required")
        prefix = derivation if derivation is not None else f"tidepool-bus-seal:{purpose}:".encode()
        derived = hashlib.sha256(prefix + secret.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(derived))

    def seal(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, sealed: str) -> str:
        """The plaintext; ValueError if `sealed` was not sealed with this key and purpose (or is plain)."""
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except (InvalidToken, ValueError) as error:
            raise ValueError("cannot be opened with this installation's sealing key") from error


def load_seal_key(configured: str, data_dir: Path, purpose: str) -> str:
    """`configured`, or a key generated once into `{data_dir}/seal-{purpose}` (0600) and reused."""
    if configured:
        return configured
    path = Path(data_dir) / f"seal-{purpose}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
        try:
            os.link(tmp, path)  # first writer wins: two services starting at once agree on one key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()
