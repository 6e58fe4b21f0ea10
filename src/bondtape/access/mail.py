"""Email: SMTP to the configured server, or ``.eml`` files in an outbox folder (the demo)."""
from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

from bondtape.access.settings import AccessSettings


class MailError(Exception):
    pass


def build_message(sender: str, to: str, subject: str, body: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="bondtape")
    msg.set_content(body)
    return msg


class SmtpMailer:
    def __init__(self, host: str, port: int, sender: str, *, starttls: bool = False, user: str | None = None,
                 password: str | None = None, timeout: float = 10.0):
        self.host, self.port, self.sender = host, port, sender
        self.starttls, self.user, self.password, self.timeout = starttls, user, password, timeout

    def send(self, to: str, subject: str, body: str) -> None:
        msg = build_message(self.sender, to, subject, body)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls()
                if self.user:
                    smtp.login(self.user, self.password or "")
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as exc:
            raise MailError(f"cannot send email through {self.host}:{self.port}: {exc}") from exc


class OutboxMailer:
    """Writes each message as an .eml file (for the demo and for operators without SMTP)."""

    def __init__(self, folder: Path, sender: str):
        self.folder, self.sender = Path(folder), sender

    def send(self, to: str, subject: str, body: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        existing = len(list(self.folder.glob("*.eml")))
        safe = "".join(c if c.isalnum() else "_" for c in to)[:60]
        path = self.folder / f"{existing + 1:05d}-{safe}.eml"
        path.write_bytes(bytes(build_message(self.sender, to, subject, body)))


def mailer_for(settings: AccessSettings):
    if settings.smtp_host:
        return SmtpMailer(settings.smtp_host, settings.smtp_port, settings.mail_from, starttls=settings.smtp_starttls,
                          user=settings.smtp_user, password=settings.smtp_password)
    if settings.outbox_dir:
        return OutboxMailer(settings.outbox_dir, settings.mail_from)
    raise MailError("no email configured: set BONDTAPE_SMTP_HOST (and _PORT) or BONDTAPE_OUTBOX")


def invitation_email(settings: AccessSettings, *, full_name: str, username: str, token: str, hours: int) -> tuple[str, str]:
    link = f"{settings.base_url.rstrip('/')}/enroll/{token}"
    subject = "bondtape: enroll your user ID and authenticator"
    body = (
        f"Dear {full_name},\n\n"
        f"Your organisation's administrator ordered the bondtape user ID '{username}' for you, and the\n"
        f"operator approved it. Open this one-time link to set your password and enroll an\n"
        f"authenticator app (multi-factor authentication):\n\n    {link}\n\n"
        f"The link works once and expires in {hours} hours. If you did not expect this message,\n"
        f"ignore it and tell your administrator.\n"
    )
    return subject, body
