"""A DTLS certificate FFmpeg's WHIP muxer can use against whipcast.

The FFmpeg in the PyAV wheel does DTLS with GnuTLS, whose self-signed certificate is
ECDSA on P-224; OpenSSL 4 (under aiortc) refuses that curve and aborts the handshake.
The muxer's ``cert_file``/``key_file`` options take this P-256 one instead.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_p256_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate and key, as PEM files in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whipcast-ffmpeg")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "ffmpeg-cert.pem", directory / "ffmpeg-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
