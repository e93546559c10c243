"""Key material: certificates that verify, private keys only the owner can read, nothing overwritten."""

import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fedsilo.common.errors import ConfigError
from fedsilo.runtime.keys import fingerprint, issue_server_certificates, load_node_public_key, new_node_keys
from tests.runtime.certificates import certificate_hosts


def test_the_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path: Path) -> None:
    certs = issue_server_certificates(tmp_path, ("coordinator.example", "10.0.0.5"))
    assert certificate_hosts(certs.server_cert) == ["coordinator.example", "10.0.0.5"]
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    # Python's TLS stack accepts the pair, as gRPC/HTTPS clients will.
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    context.load_cert_chain(certs.server_cert, certs.server_key)
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_nothing_is_overwritten(tmp_path: Path) -> None:
    issue_server_certificates(tmp_path)
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        issue_server_certificates(tmp_path)
    new_node_keys(tmp_path / "node.key")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        new_node_keys(tmp_path / "node.key")


def test_node_keys_are_p384_openssh_with_ssh_keygen_fingerprints(tmp_path: Path) -> None:
    public_path = new_node_keys(tmp_path / "node.key")
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    private = serialization.load_ssh_private_key((tmp_path / "node.key").read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_node_public_key(public_path)
    assert public.startswith(b"ecdsa-sha2-nistp384 ")
    printed = subprocess.run(["ssh-keygen", "-lf", str(public_path)], capture_output=True, text=True, check=False)
    if printed.returncode == 0:  # OpenSSH's own tool, where installed, agrees
        assert printed.stdout.split()[1] == fingerprint(public)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not a key\n", "not an OpenSSH public key"),
        (b"", "not an OpenSSH public key"),
    ],
)
def test_a_bad_public_key_is_named_with_the_fix(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "node.key.pub"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as err:
        load_node_public_key(path)
    assert str(path) in str(err.value)


def test_an_rsa_key_is_refused(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    path = tmp_path / "rsa.pub"
    path.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    with pytest.raises(ConfigError, match="an ECDSA key is needed"):
        load_node_public_key(path)
