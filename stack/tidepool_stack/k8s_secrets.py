"""Secrets of deploy/k8s made outside the cluster.

- `nats_tls(namespace)`: a private CA and the NATS certificate (clients and the cluster's routes);
- `k8s_secrets()`: `tidepool k8s-secrets`, every Secret the bootstrap Job (tidepool_stack.k8s_bootstrap)
  would create, printed once for operators who create Secrets themselves instead of running the Job.
"""

from __future__ import annotations

import secrets
import subprocess
import tempfile
from pathlib import Path

import yaml

CA_DAYS, CERT_DAYS = 3650, 825


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def nats_tls(namespace: str, cluster_domain: str = "cluster.local") -> dict[str, str]:
    """A new CA and the NATS servers' certificate (PEM texts: ca.crt, tls.crt, tls.key): for the Service
    `nats` and, as client and server of the cluster's routes, every pod behind `nats-headless`."""
    names = ["nats", f"nats.{namespace}", f"nats.{namespace}.svc", f"nats.{namespace}.svc.{cluster_domain}"]
    names += [f"*.nats-headless.{namespace}.svc", f"*.nats-headless.{namespace}.svc.{cluster_domain}"]
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
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl(
            "x509", "-req", "-in", str(folder / "csr"), "-CA", str(folder / "ca.crt"),
            "-CAkey", str(folder / "ca.key"), "-set_serial", f"0x{secrets.token_hex(16)}",
            "-days", str(CERT_DAYS), "-sha256", "-extfile", str(folder / "ext"),
            "-out", str(folder / "tls.crt"),
        )  # fmt: skip
        return {name: (folder / name).read_text() for name in ("ca.crt", "tls.crt", "tls.key")}


def k8s_secrets(*, postgres: bool = True, registry: bool = True) -> str:
    """Every Secret the bootstrap Job of deploy/k8s would create on an empty cluster, as one multi-document
    YAML text, for operators who create Secrets themselves (holds passwords and keys: never log it)."""
    from tidepool_stack.k8s_bootstrap import plan  # it imports this module's nats_tls

    documents = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "type": "Opaque",
            "stringData": data,
        }
        for (namespace, name), data in plan({}, postgres=postgres, registry=registry).items()
    ]
    return yaml.safe_dump_all(documents, sort_keys=False, width=200)
