"""Secrets of deploy/k8s: the NATS certificate (the bootstrap Job's too) and `tidepool k8s-secrets`.

- `nats_tls(namespace)`: a private CA and the NATS certificate (clients and the cluster's routes);
- `ssh_host_key()`: the SSH gateway's host key (one for every replica and restart);
- `k8s_secrets()`: `tidepool k8s-secrets`, every Secret the bootstrap Job (tidepool_stack.k8s_bootstrap)
  would create, printed once for operators who create Secrets themselves instead of running the Job.
"""

from __future__ import annotations

import datetime
import secrets

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS, CERT_DAYS = 3650, 825


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tidepool"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def nats_tls(namespace: str, cluster_domain: str = "cluster.local") -> dict[str, str]:
    """A new CA and the NATS servers' certificate (PEM texts: ca.crt, tls.crt, tls.key), P-256: for the
    Service `nats` and, as client and server of the cluster's routes, every pod behind `nats-headless`.

    With `cryptography`, not the openssl command: the bootstrap Job's image has the library only."""
    names = ["nats", f"nats.{namespace}", f"nats.{namespace}.svc", f"nats.{namespace}.svc.{cluster_domain}"]
    names += [f"*.nats-headless.{namespace}.svc", f"*.nats-headless.{namespace}.svc.{cluster_domain}"]
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"Tidepool NATS CA {secrets.token_hex(4)}")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("nats"))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digitalSignature
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return {
        "ca.crt": ca.public_bytes(serialization.Encoding.PEM).decode(),
        "tls.crt": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "tls.key": _pem_key(key),
    }


def ssh_host_key() -> str:
    """A new Ed25519 SSH host key for the SSH gateway, OpenSSH's private-key format (PEM text)."""
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


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
