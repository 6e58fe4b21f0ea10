"""The service's certificate authority: client certificates for users, a server certificate.

Files in the CA folder: ``ca-key.pem`` (mode 0600), ``ca-cert.pem``. Each client
certificate issued is recorded in ``client_certificates`` (serial, fingerprint, user);
revocation is recorded there and takes effect at once: the REST API and the download
service look every presented certificate up on each request. ``crl.pem`` is also written
for other TLS terminators.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bondtape.access import audit
from bondtape.access.model import AccessError, AuthenticatedUser
from bondtape.access.schema import client_certificates, users
from bondtape.clock import from_us, to_us

CA_KEY = "ca-key.pem"
CA_CERT = "ca-cert.pem"
CRL = "crl.pem"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class CertificateAuthority:
    folder: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.folder / CA_CERT

    @classmethod
    def load(cls, folder: Path) -> "CertificateAuthority":
        folder = Path(folder)
        if not (folder / CA_KEY).exists():
            raise AccessError("CA_MISSING", f"no certificate authority in {folder}: run `bondtape certs init`", "ca_dir")
        key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
        return cls(folder, key, cert)

    @classmethod
    def create(cls, folder: Path, *, name: str = "bondtape certificate authority", now_us: int, years: int = 10) -> "CertificateAuthority":
        folder = Path(folder)
        if (folder / CA_KEY).exists():
            raise AccessError("CA_EXISTS", f"a certificate authority already exists in {folder}", "ca_dir")
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bondtape")])
        start = from_us(now_us) - dt.timedelta(minutes=5)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(folder / CA_KEY, _key_pem(key))
        (folder / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(folder, key, cert)

    def _leaf(self, subject: x509.Name, public_key, *, now_us: int, days: int, usage, san=None) -> x509.Certificate:
        start = from_us(now_us) - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_server(self, hostnames: list[str], out_dir: Path, *, now_us: int, days: int = 825) -> tuple[Path, Path]:
        """A TLS server certificate for the website/API/download host; returns (cert, key) paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        san = []
        for host in hostnames:
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                san.append(x509.DNSName(host))
        cert = self._leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]), key.public_key(),
                          now_us=now_us, days=days, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = out_dir / "server-cert.pem", out_dir / "server-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(key_path, _key_pem(key))
        return cert_path, key_path

    def issue_client(self, conn: sa.Connection, user_id: int, *, now_us: int, days: int = 365,
                     actor: AuthenticatedUser | None = None, source: str | None = None) -> tuple[bytes, bytes, str]:
        """A client certificate for a user: returns (cert PEM, private key PEM, serial hex).

        The private key is returned once and not kept by the service.
        """
        user = conn.execute(sa.select(users).where(users.c.id == user_id)).first()
        if user is None:
            raise AccessError("USER_UNKNOWN", f"no user with id {user_id}", "user")
        if user.status not in ("ACTIVE", "INVITED"):
            raise AccessError("USER_STATUS", f"cannot issue a certificate to a user whose status is {user.status}", "user")
        if not 1 <= days <= 825:
            raise AccessError("CERT_DAYS", "a client certificate lasts 1 to 825 days", "days")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, user.username),
            x509.NameAttribute(NameOID.USER_ID, str(user.id)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bondtape users"),
        ])
        cert = self._leaf(subject, key.public_key(), now_us=now_us, days=days, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        serial = format(cert.serial_number, "x")
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        conn.execute(client_certificates.insert().values(
            serial=serial, user_id=user.id, fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            subject=cert.subject.rfc4514_string(), not_before_us=to_us(cert.not_valid_before_utc),
            not_after_us=to_us(cert.not_valid_after_utc), issued_us=now_us, issued_by=actor and actor.username,
            cert_pem=cert_pem.decode("ascii")))
        audit.record(conn, "cert.issue", at_us=now_us, actor_user_id=actor and actor.user_id, actor=actor and actor.username,
                     org_id=user.org_id, target=f"cert:{serial}", source=source, detail={"user": user.username, "days": days})
        return cert_pem, _key_pem(key), serial

    def write_crl(self, conn: sa.Connection, *, now_us: int) -> Path:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(from_us(now_us)).next_update(from_us(now_us) + dt.timedelta(days=1)))
        for row in conn.execute(sa.select(client_certificates).where(client_certificates.c.revoked_us.is_not(None))):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(row.serial, 16)).revocation_date(from_us(row.revoked_us)).build())
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.folder / CRL
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


def revoke(conn: sa.Connection, serial: str, *, now_us: int, reason: str, actor: AuthenticatedUser | None = None,
           source: str | None = None) -> None:
    serial = serial.lower().lstrip("0") or "0"
    row = conn.execute(sa.select(client_certificates).where(client_certificates.c.serial == serial)).first()
    if row is None:
        raise AccessError("CERT_UNKNOWN", f"no certificate with serial {serial}", "serial")
    if row.revoked_us is not None:
        raise AccessError("CERT_REVOKED", f"certificate {serial} is already revoked", "serial")
    conn.execute(client_certificates.update().where(client_certificates.c.serial == serial)
                 .values(revoked_us=now_us, revoked_reason=(reason or "unspecified")[:200]))
    audit.record(conn, "cert.revoke", at_us=now_us, actor_user_id=actor and actor.user_id, actor=actor and actor.username,
                 target=f"cert:{serial}", source=source, detail={"reason": reason})


def list_certificates(conn: sa.Connection, user_id: int | None = None) -> list:
    q = (sa.select(client_certificates, users.c.username).join(users, users.c.id == client_certificates.c.user_id)
         .order_by(client_certificates.c.issued_us))
    if user_id is not None:
        q = q.where(client_certificates.c.user_id == user_id)
    return list(conn.execute(q))


@dataclass(frozen=True)
class CertificateCheck:
    user_id: int | None
    serial: str | None
    reason: str  # ok, no_certificate, not_ours, unknown, revoked, expired, user_not_active


def check_client_certificate(conn: sa.Connection, der: bytes | None, ca_cert: x509.Certificate, *,
                             now_us: int) -> CertificateCheck:
    """Whose is this presented certificate, and may it be used now?"""
    if not der:
        return CertificateCheck(None, None, "no_certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return CertificateCheck(None, None, "not_ours")
    serial = format(cert.serial_number, "x")
    row = conn.execute(sa.select(client_certificates).where(
        client_certificates.c.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex())).first()
    if row is None:
        return CertificateCheck(None, serial, "unknown")
    if row.revoked_us is not None and row.revoked_us <= now_us:
        return CertificateCheck(row.user_id, serial, "revoked")
    if not row.not_before_us <= now_us < row.not_after_us:
        return CertificateCheck(row.user_id, serial, "expired")
    status = conn.execute(sa.select(users.c.status).where(users.c.id == row.user_id)).scalar_one()
    if status != "ACTIVE":
        return CertificateCheck(row.user_id, serial, "user_not_active")
    return CertificateCheck(row.user_id, serial, "ok")
