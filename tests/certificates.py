"""Self-signed certificates for TLS tests, made by Debian's openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, valid for a day: (cert.pem, key.pem) in ``directory``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def make_signed_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 it signed, with its key: (ca.pem, cert.pem, key.pem) in ``directory``;
    the certificate is not self-signed, so it cannot stand for its own CA."""
    ca, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    cert, key, request = directory / "cert.pem", directory / "key.pem", directory / "cert.csr"
    extensions = directory / "cert.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "1",
         "-subj", "/CN=sidetrace test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request), "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
         str(cert), "-days", "1", "-extfile", str(extensions)],
    ):
        subprocess.run(["openssl", *command], check=True, capture_output=True, timeout=60)
    return ca, cert, key
