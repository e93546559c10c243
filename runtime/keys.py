"""Key material: the federation's CA and server certificate, institutions' node keys.

Only recipes of the ``cryptography`` package are used; nothing here is a
cryptographic primitive of ours. Private keys are written with mode 0600, and
never overwritten.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.common.errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CERT_DAYS = 825


@dataclass(frozen=True)
class ServerCertificates:
    """Where ``issue_server_certificates`` wrote the PEM files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never replacing an existing key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise ConfigError(f"{path} already exists; refusing to overwrite it")
    path.write_bytes(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_certificates(directory: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> ServerCertificates:
    """A new CA (P-384) and a server certificate signed by it, valid for ``hosts``."""
    if not hosts:
        raise ConfigError("the server certificate needs at least one host name or IP address")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsilo federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    out = ServerCertificates(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
    )
    pem = serialization.Encoding.PEM
    private = serialization.PrivateFormat.PKCS8
    _write_private(out.ca_key, ca_key.private_bytes(pem, private, serialization.NoEncryption()))
    _write_private(out.server_key, server_key.private_bytes(pem, private, serialization.NoEncryption()))
    _write_public(out.ca_cert, ca_cert.public_bytes(pem))
    _write_public(out.server_cert, server_cert.public_bytes(pem))
    return out


def new_node_keys(private_path: Path) -> Path:
    """An institution's node key pair (ECDSA P-384, OpenSSH format); returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    public_path = private_path.with_name(private_path.name + ".pub")
    if public_path.exists():
        raise ConfigError(f"{public_path} already exists; refusing to overwrite it")
    _write_private(
        private_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public_path, public + b"\n")
    return public_path


def load_node_public_key(path: Path) -> bytes:
    """An OpenSSH ECDSA public key, checked and in canonical form; errors name the file and what is wrong."""
    try:
        text = path.read_bytes().strip()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the public key ({err.strerror})") from None
    try:
        key = serialization.load_ssh_public_key(text)
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{path}: not an OpenSSH public key; send the '.pub' file that `fedsilo-client keys` wrote"
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__
        raise ConfigError(f"{path}: an ECDSA key is needed (Flower's node authentication); this is {kind}")
    # The key itself, re-encoded: no comment, no stray text from the file.
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fingerprint(public_key: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it, for checking a key over the phone."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
