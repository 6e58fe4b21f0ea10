"""Access for the demo: a secret key, a certificate authority, the operator, the firms'
administrators and a data vendor, each invited by email written to an outbox folder.

``setup_demo_access(db, directory, now_us=...)`` is idempotent: a second run reuses what
the first made. The demo (``bondtape demo``) may call it and print ``DemoAccess.lines()``.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from bondtape.access import accounts, entitlements
from bondtape.access.ca import CA_KEY, CertificateAuthority
from bondtape.access.mail import OutboxMailer, invitation_email
from bondtape.access.model import AuthenticatedUser
from bondtape.access.schema import organisations
from bondtape.access.settings import AccessSettings
from bondtape.reference.schema import firms

DEMO_OPERATOR = AuthenticatedUser(0, "demo", 0, "OPERATOR", None, ("operator_admin",), "demo")


@dataclass
class DemoAccess:
    directory: Path
    secret_key_file: Path
    ca_dir: Path
    tls_cert: Path
    tls_key: Path
    outbox: Path
    invited: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"export BONDTAPE_SECRET_KEY_FILE={self.secret_key_file} BONDTAPE_CA_DIR={self.ca_dir} BONDTAPE_OUTBOX={self.outbox}",
            f"bondtape web serve --tls-cert {self.tls_cert} --tls-key {self.tls_key}",
            f"open the enrollment links in {self.outbox}/*.eml (users: {', '.join(self.invited) or 'already invited'})",
        ]


def setup_demo_access(db: sa.Engine, directory: Path, *, now_us: int, firm_count: int = 2,
                      base_url: str = "https://127.0.0.1:8443") -> DemoAccess:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_file = directory / "secret.key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
    ca_dir, tls_dir, outbox = directory / "ca", directory / "tls", directory / "outbox"
    ca = CertificateAuthority.load(ca_dir) if (ca_dir / CA_KEY).exists() else CertificateAuthority.create(ca_dir, now_us=now_us)
    if not (tls_dir / "server-cert.pem").exists():
        ca.issue_server(["127.0.0.1", "localhost"], tls_dir, now_us=now_us)
    result = DemoAccess(directory, key_file, ca_dir, tls_dir / "server-cert.pem", tls_dir / "server-key.pem", outbox)
    settings = AccessSettings(secret_key=bytes.fromhex(key_file.read_text().strip()), base_url=base_url, outbox_dir=outbox)
    mailer = OutboxMailer(outbox, settings.mail_from)
    with db.begin() as conn:
        if conn.execute(sa.select(organisations.c.id).where(organisations.c.kind == "OPERATOR")).first():
            return result
        people = []
        op_org = accounts.create_organisation(conn, "Market Operator", "OPERATOR", at_us=now_us, source="demo")
        people.append((op_org, "operator", "Olive Operator", "operator@bondtape.demo", "operator_admin"))
        for firm in conn.execute(sa.select(firms).where(firms.c.test_only.is_(False)).order_by(firms.c.mpid).limit(firm_count)):
            org = accounts.create_organisation(conn, firm.name, "FIRM", mpid=firm.mpid, at_us=now_us, source="demo")
            people.append((org, f"{firm.mpid.lower()}-admin", f"{firm.name} administrator",
                           f"admin@{firm.mpid.lower()}.demo", "org_admin,trader"))
        vendor = accounts.create_organisation(conn, "Demo Data Vendor", "VENDOR", at_us=now_us, source="demo")
        for product, data_set in (("REALTIME", "CORP"), ("REALTIME", "AGCY"), ("REFERENCE", "")):
            entitlements.grant(conn, org_id=vendor, product=product, data_set=data_set, start_us=now_us,
                               actor=DEMO_OPERATOR, at_us=now_us, source="demo")
        people.append((vendor, "vendor", "Vera Vendor", "vera@vendor.demo", "org_admin,subscriber"))
        for org, username, name, email, roles in people:
            order = accounts.request_user(conn, actor=DEMO_OPERATOR, org_id=org, username=username, email=email,
                                          full_name=name, roles=roles, now_us=now_us, source="demo")
            token = accounts.decide_order(conn, order, approve=True, actor=DEMO_OPERATOR, now_us=now_us, source="demo",
                                          invitation_hours=settings.invitation_hours)
            subject, body = invitation_email(settings, full_name=name, username=username, token=token,
                                             hours=settings.invitation_hours)
            mailer.send(email, subject, body)
            result.invited.append(username)
    return result
