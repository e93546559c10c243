"""What a test reads back from a certificate fedsilo wrote."""

from pathlib import Path

from cryptography import x509


def certificate_hosts(path: Path) -> list[str]:
    """The host names and IP addresses a certificate is valid for (its subject alternative names)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in names.get_values_for_type(x509.DNSName)] + [
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    ]
