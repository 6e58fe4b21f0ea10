"""Access settings: one object, read from the environment by the edges (CLI, server).

Every setting has a default that is safe for a single machine; the secret key has none
outside tests and the demo: ``BONDTAPE_SECRET_KEY`` (64 hex characters, or a file named by
``BONDTAPE_SECRET_KEY_FILE``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MINUTE_US = 60_000_000


@dataclass(frozen=True)
class LockoutPolicy:
    max_failures: int = 5  # consecutive failed logins (password or second factor)
    lock_minutes: int = 30  # then refused, even with the right password, for this long
    max_failures_per_source: int = 50  # failed logins from one address (any user names) ...
    source_window_minutes: int = 15  # ... within this window: that address is refused for a while


@dataclass(frozen=True)
class AccessSettings:
    secret_key: bytes  # 32 bytes: encrypts TOTP secrets at rest
    base_url: str = "https://127.0.0.1:8443"  # the website's public address, used in emails
    download_base_url: str = "https://127.0.0.1:8443/download"
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    invitation_hours: int = 72
    session_idle_minutes: int = 30
    session_max_hours: int = 12
    cookie_secure: bool = True  # the session cookie is sent over HTTPS only
    totp_issuer: str = "bondtape"
    # email: SMTP when smtp_host is set, else .eml files in outbox_dir
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_starttls: bool = False
    smtp_user: str | None = None
    smtp_password: str | None = None
    mail_from: str = "bondtape@localhost"
    outbox_dir: Path | None = None
    ca_dir: Path | None = None  # the certificate authority's files (bondtape certs)
    historic_dir: Path | None = None  # Historic data-set files: <dir>/<DATA_SET>/<YEAR>/<file>
    policy_file: Path | None = None  # an access-policy TOML replacing the built-in one

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "AccessSettings":
        env = dict(os.environ if env is None else env)
        key_hex = env.get("BONDTAPE_SECRET_KEY")
        if not key_hex and env.get("BONDTAPE_SECRET_KEY_FILE"):
            key_hex = Path(env["BONDTAPE_SECRET_KEY_FILE"]).read_text().strip()
        if "secret_key" not in overrides:
            if not key_hex:
                raise ValueError(
                    "BONDTAPE_SECRET_KEY is not set: 64 hex characters (32 bytes), e.g. from "
                    "`python -c 'import secrets; print(secrets.token_hex(32))'`"
                )
            overrides["secret_key"] = parse_key(key_hex)
        path = lambda name: Path(env[name]) if env.get(name) else None  # noqa: E731
        values = dict(
            base_url=env.get("BONDTAPE_BASE_URL", cls.base_url),
            download_base_url=env.get("BONDTAPE_DOWNLOAD_URL", cls.download_base_url),
            smtp_host=env.get("BONDTAPE_SMTP_HOST") or None,
            smtp_port=int(env.get("BONDTAPE_SMTP_PORT", "25")),
            smtp_starttls=env.get("BONDTAPE_SMTP_STARTTLS", "") in ("1", "true", "yes"),
            smtp_user=env.get("BONDTAPE_SMTP_USER") or None,
            smtp_password=env.get("BONDTAPE_SMTP_PASSWORD") or None,
            mail_from=env.get("BONDTAPE_MAIL_FROM", cls.mail_from),
            outbox_dir=path("BONDTAPE_OUTBOX"),
            ca_dir=path("BONDTAPE_CA_DIR"),
            historic_dir=path("BONDTAPE_HISTORIC_DIR"),
            policy_file=path("BONDTAPE_ACCESS_POLICY"),
            cookie_secure=env.get("BONDTAPE_COOKIE_SECURE", "1") not in ("0", "false", "no"),
        )
        values.update(overrides)
        return cls(**values)


def parse_key(text: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("the secret key must be 64 hex characters (32 bytes)") from None
    if len(key) != 32:
        raise ValueError(f"the secret key must be 32 bytes (64 hex characters); got {len(key)} bytes")
    return key
