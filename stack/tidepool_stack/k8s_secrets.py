"""`tidepool k8s-secrets`: the bus's Secrets for deploy/k8s, generated fresh (print once, `kubectl apply`).

- `tidepool-nats-<service>`: each service's NATS login (TIDEPOOL_NATS_USER / TIDEPOOL_NATS_PASSWORD);
- `tidepool-nats-config`: the nats-server configuration, with the users' bcrypt hashes and permissions
  (tidepool_runtime.nats_auth), JetStream under /data and TLS only;
- `tidepool-nats-tls`: a private CA and the server's certificate for `nats`, `nats.<namespace>`,
  `nats.<namespace>.svc` (and the cluster domain); `tidepool-nats-ca`: the CA alone, which the services
  verify the server with (TIDEPOOL_NATS_CA_FILE);
- `tidepool-signing-seal` (API, proxy), `tidepool-registry-seal` (API, builder) and `tidepool-otel-seal`
  (API, telemetry): the keys sealing secrets on the bus (tidepool_runtime.sealing).
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tidepool_runtime import nats_auth

NATS_DIR = "/etc/nats"
NATS_CA_DIR = "/etc/tidepool/nats-ca"
CA_DAYS, CERT_DAYS = 3650, 825


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def nats_tls(namespace: str, cluster_domain: str = "cluster.local") -> dict[str, str]:
    """A new CA and a server certificate for the NATS Service (PEM texts: ca.crt, tls.crt, tls.key)."""
    names = ["nats", f"nats.{namespace}", f"nats.{namespace}.svc", f"nats.{namespace}.svc.{cluster_domain}"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ec = ("-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
        _openssl("genpkey", *ec, "-out", str(folder / "ca.key"))
        _openssl(
            "req", "-x509", "-new", "-key", str(folder / "ca.key"), "-sha256", "-days", str(CA_DAYS),
            "-subj", f"/O=Tidepool/CN=Tidepool NATS CA {secrets.token_hex(4)}",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-out", str(folder / "ca.crt"),
        )  # fmt: skip
        _openssl("genpkey", *ec, "-out", str(folder / "tls.key"))
        _openssl(
            "req", "-new", "-key", str(folder / "tls.key"), "-subj", "/CN=nats", "-out", str(folder / "csr")
        )
        (folder / "ext").write_text(
            f"subjectAltName={','.join(f'DNS:{name}' for name in names)}\n"
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "x509", "-req", "-in", str(folder / "csr"), "-CA", str(folder / "ca.crt"),
            "-CAkey", str(folder / "ca.key"), "-set_serial", f"0x{secrets.token_hex(16)}",
            "-days", str(CERT_DAYS), "-sha256", "-extfile", str(folder / "ext"),
            "-out", str(folder / "tls.crt"),
        )  # fmt: skip
        return {name: (folder / name).read_text() for name in ("ca.crt", "tls.crt", "tls.key")}


def _secret(name: str, data: dict[str, str], comment: str = "") -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if comment:
        metadata["annotations"] = {"tidepool.io/holders": comment}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "stringData": data}


def k8s_secrets(namespace: str = "tidepool") -> str:
    """Every Secret of the bus, as one multi-document YAML text (holds passwords and keys: never log it)."""
    passwords = nats_auth.new_passwords()
    hashes = {service: nats_auth.hash_password(password) for service, password in passwords.items()}
    tls = nats_tls(namespace)
    config = nats_auth.server_config(
        hashes,
        host="0.0.0.0",
        port=4222,
        store_dir="/data",
        tls={"cert_file": f"{NATS_DIR}/tls/tls.crt", "key_file": f"{NATS_DIR}/tls/tls.key"},
    )
    documents = [
        _secret(
            f"tidepool-nats-{service.replace('_', '-')}",  # Kubernetes names have no `_`
            {"TIDEPOOL_NATS_USER": service, "TIDEPOOL_NATS_PASSWORD": password},
            f"the {service} only",
        )
        for service, password in passwords.items()
    ]
    documents += [
        _secret("tidepool-nats-config", {"nats.conf": config}, "nats-server (bcrypt hashes only)"),
        _secret("tidepool-nats-tls", tls, "nats-server"),
        _secret("tidepool-nats-ca", {"ca.crt": tls["ca.crt"]}, "every service (verifies the server)"),
        _secret(
            "tidepool-signing-seal",
            {"TIDEPOOL_SIGNING_SEAL_KEY": secrets.token_urlsafe(32)},
            "the API and the proxy",
        ),
        _secret(
            "tidepool-registry-seal",
            {"TIDEPOOL_REGISTRY_SEAL_KEY": secrets.token_urlsafe(32)},
            "the API and the builder",
        ),
        _secret(
            "tidepool-otel-seal",
            {"TIDEPOOL_OTEL_SEAL_KEY": secrets.token_urlsafe(32)},
            "the API and the telemetry service",
        ),
    ]
    for document in documents:
        document["metadata"]["namespace"] = namespace
    return yaml.safe_dump_all(documents, sort_keys=False, width=200)
