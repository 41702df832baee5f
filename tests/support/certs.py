"""Throwaway certificates made by openssl, for the TLS tests and the browser's HTTPS page."""
import subprocess


def make_cert(directory, name, san=None):
    """A self-signed P-256 certificate and its key; `san` (e.g. "IP:127.0.0.1") lets a
    verifying client accept it for that name."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-subj", f"/CN={name}", "-days", "2", "-keyout", str(key), "-out", str(cert)]
                   + (["-addext", f"subjectAltName={san}"] if san else []),
                   check=True, capture_output=True, timeout=60)
    return cert, key
