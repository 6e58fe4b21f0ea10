"""Secrets at rest: argon2 password hashes, AES-GCM for TOTP secrets, SHA-256 for tokens.

Nothing here stores or logs a secret in clear. The encryption key comes from configuration
(``AccessSettings.secret_key``), never from the database.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# OWASP's argon2id baseline: 19 MiB, 2 passes, 1 lane.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when the user name is unknown, so that timing does not reveal it.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 256


class WeakPassword(ValueError):
    """A password that the policy refuses; the message says what is accepted."""


def check_password_policy(password: str, *, username: str = "") -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"password must have at most {MAX_PASSWORD_LENGTH} characters")
    if username and username.lower() in password.lower():
        raise WeakPassword("password must not contain the user name")
    if len(set(password)) < 5:
        raise WeakPassword("password must use at least 5 different characters")


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when ``password`` matches; always spends one argon2 verification."""
    try:
        if stored_hash is None:
            _HASHER.verify(_DUMMY_HASH, password + "\x00never")
            return False
        return _HASHER.verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def new_token(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def constant_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def derive_key(master: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"bondtape", info=purpose.encode()).derive(master)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_totp_secret() -> str:
    """A fresh RFC 6238 secret: 160 random bits, base32 (what authenticator apps take)."""
    return base64.b32encode(os.urandom(20)).decode("ascii")


def encrypt_totp_secret(master: bytes, user_id: int, secret_b32: str) -> str:
    """AES-256-GCM, bound to the user (copying the value to another user's row fails)."""
    raw = base64.b32decode(secret_b32)
    nonce = os.urandom(12)
    sealed = AESGCM(derive_key(master, "totp-secret")).encrypt(nonce, raw, f"totp:{user_id}".encode())
    return _b64(nonce + sealed)  # 12 + 20 + 16 bytes = 64 characters


def decrypt_totp_secret(master: bytes, user_id: int, stored: str) -> str:
    data = _unb64(stored)
    raw = AESGCM(derive_key(master, "totp-secret")).decrypt(data[:12], data[12:], f"totp:{user_id}".encode())
    return base64.b32encode(raw).decode("ascii")


RECOVERY_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I


def new_recovery_code() -> str:
    """Twelve characters from a 32-letter alphabet (60 bits), shown as XXXX-XXXX-XXXX."""
    chars = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(12))
    return f"{chars[:4]}-{chars[4:8]}-{chars[8:]}"


def normalise_recovery_code(code: str) -> str:
    chars = "".join(c for c in code.upper() if c.isalnum())
    return f"{chars[:4]}-{chars[4:8]}-{chars[8:]}"
