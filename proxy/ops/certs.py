"""Certificates for the gateway and its wallboxes (cryptography).

One call per step of the usual OpenSSL recipe: a root CA, a server certificate
signed by it (or self-signed), a client certificate for a wallbox id. Keys are
EC P-256 (small, fast on a Raspberry Pi, in the whitepaper's ECDSA suites) and
written with mode 0600. Subjects are UTF-8 end to end, so an operator named
"Tiefgarage Köln GmbH" comes out as written.

:func:`check_pair` is what start-up uses to refuse unusable files with a
reason naming the file: unreadable, not PEM, key not matching, expired.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey

#: Subject field names accepted from options or a subject TOML.
SUBJECT_FIELDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
}


class CertificateProblem(OSError):
    """A certificate or key file cannot be used; says which file and why."""

    def __init__(self, path: str | Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = str(path)
        self.why = why


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: PrivateKey


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def subject(fields: Mapping[str, str]) -> x509.Name:
    unknown = set(fields) - set(SUBJECT_FIELDS)
    if unknown:
        raise ValueError(f"unknown subject fields {sorted(unknown)}; use {sorted(SUBJECT_FIELDS)}")
    return x509.Name([x509.NameAttribute(SUBJECT_FIELDS[k], v) for k, v in fields.items() if v])


def _builder(name: x509.Name, issuer: x509.Name, key: PrivateKey, days: int,
             now: datetime.datetime | None) -> x509.CertificateBuilder:
    start = (now or datetime.datetime.now(datetime.timezone.utc)) - datetime.timedelta(minutes=5)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))


def create_ca(fields: Mapping[str, str], days: int = 3650) -> Issued:
    key = new_key()
    name = subject(fields)
    cert = (_builder(name, name, key, days, None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Issued(cert, key)


def _alt_names(sans: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in dict.fromkeys(sans):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    return names


def _leaf(fields: Mapping[str, str], usage: x509.ObjectIdentifier, sans: Iterable[str], days: int,
          ca: Issued | None, now: datetime.datetime | None) -> Issued:
    key = new_key()
    name = subject(fields)
    issuer_name, signer = (ca.certificate.subject, ca.key) if ca else (name, key)
    builder = (_builder(name, issuer_name, key, days, now)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    alt = _alt_names(sans)
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def create_server(fields: Mapping[str, str], sans: Iterable[str], days: int = 825,
                  ca: Issued | None = None, now: datetime.datetime | None = None) -> Issued:
    """Server certificate; self-signed when no CA is given."""
    return _leaf(fields, ExtendedKeyUsageOID.SERVER_AUTH, sans, days, ca, now)


def create_client(charge_box_id: str, ca: Issued, days: int = 825, fields: Mapping[str, str] | None = None,
                  now: datetime.datetime | None = None) -> Issued:
    """Client certificate for a wallbox (SP3): CN is its ChargeBox id."""
    return _leaf({"CN": charge_box_id, **(fields or {})}, ExtendedKeyUsageOID.CLIENT_AUTH, (), days, ca, now)


class WouldOverwrite(FileExistsError):
    """A certificate or key file is already there and replacing it was not asked for."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.EEXIST, "already exists", str(path))
        self.path = path


def existing(*paths: Path) -> Path | None:
    """The first of ``paths`` that exists: what :func:`write` would refuse to replace."""
    return next((path for path in paths if path.exists()), None)


def write(issued: Issued, cert_path: Path, key_path: Path, chain: Iterable[x509.Certificate] = (), *,
          overwrite: bool = False) -> None:
    """PEM files; the key is created with mode 0600 before any byte is written.

    Without ``overwrite`` an existing certificate or key is never replaced (WouldOverwrite): a
    replaced CA key silently invalidates every certificate it issued. The key is created with
    O_EXCL then, so a file appearing meanwhile is not replaced either.
    """
    if not overwrite and (found := existing(key_path, cert_path)):
        raise WouldOverwrite(found)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = issued.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(key_path, flags, 0o600)
    except FileExistsError:
        raise WouldOverwrite(key_path) from None
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    os.chmod(key_path, 0o600)
    pem = issued.certificate.public_bytes(serialization.Encoding.PEM)
    pem += b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    cert_path.write_bytes(pem)


def read_issued(cert_path: Path, key_path: Path, password: str = "") -> Issued:
    """A CA to sign with; its key may be encrypted (the guides' recipe protects it with a passphrase)."""
    cert = load_certificates(cert_path)[0]
    return Issued(cert, _load_key(key_path, password))  # type: ignore[arg-type]


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def load_certificates(path: Path) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateProblem(path, f"cannot read: {exc.strerror}") from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateProblem(path, "not a PEM certificate") from exc
    return certs


def _load_key(path: Path, password: str = "") -> PrivateKeyTypes:
    """The private key; an encrypted one needs its passphrase (``key_password`` and friends)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CertificateProblem(path, f"cannot read: {exc.strerror}") from exc
    try:
        return serialization.load_pem_private_key(data, password=password.encode("utf-8") if password else None)
    except TypeError as exc:
        if password:  # the key is not encrypted, a passphrase was given
            raise CertificateProblem(path, "key is not encrypted but a passphrase is configured; "
                                     "remove the key's *_password setting") from exc
        raise CertificateProblem(path, "key is encrypted: set its passphrase (key_password_env / "
                                 "key_password_file, client_key_password_* for a client key; "
                                 "ocpp-proxy certs: --ca-password-env)") from exc
    except ValueError as exc:
        if password and b"ENCRYPTED" in data:
            raise CertificateProblem(path, "wrong passphrase for this encrypted key") from exc
        raise CertificateProblem(path, "not a PEM private key") from exc


def check_validity(cert: x509.Certificate, path: Path, now: datetime.datetime | None = None) -> None:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise CertificateProblem(path, f"certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    if cert.not_valid_before_utc > now:
        raise CertificateProblem(path, f"certificate not valid before {cert.not_valid_before_utc:%Y-%m-%d}")


def check_pair(cert_path: Path, key_path: Path, password: str = "") -> x509.Certificate:
    """The leaf certificate of a usable cert/key pair, or CertificateProblem."""
    cert = load_certificates(cert_path)[0]
    key = _load_key(key_path, password)
    public = cert.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo) != public:
        raise CertificateProblem(key_path, f"private key does not belong to the certificate in {cert_path}")
    check_validity(cert, cert_path)
    return cert


def ensure_self_signed(certs_dir: Path, hosts: Iterable[str]) -> tuple[Path, Path, bool]:
    """The proxy's own server certificate: created on first start, reused afterwards."""
    cert_path, key_path = certs_dir / "server.crt", certs_dir / "server.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path, False
    sans = [socket.gethostname(), "localhost", "127.0.0.1", "::1", *hosts]
    issued = create_server({"CN": socket.gethostname(), "O": "ocpp-proxy"}, sans, days=3650)
    write(issued, cert_path, key_path, overwrite=True)  # a pair with one half missing is made anew
    return cert_path, key_path, True
