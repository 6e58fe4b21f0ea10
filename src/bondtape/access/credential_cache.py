"""A short-lived memory of verified (certificate, login, password) triples.

The REST API and the download service check the password on every request; an argon2id
verification costs tens of milliseconds by design. A request whose exact triple was
verified within ``ttl_us`` skips only that hash: the certificate (revocation, dates), the
user's status, lockout and password hash are still read from the database on every
request, and a changed password hash invalidates the memory. The memory holds an HMAC of
the triple under a key that lives only in this process, never the password.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
from collections import OrderedDict


class CredentialCache:
    def __init__(self, ttl_us: int = 300_000_000, max_entries: int = 10_000):
        self.ttl_us, self.max_entries = ttl_us, max_entries
        self._key = os.urandom(32)
        self._entries: OrderedDict[bytes, tuple[int, str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def _digest(self, serial: str, username: str, password: str) -> bytes:
        message = "\0".join((serial, username.strip().lower(), password)).encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def remember(self, serial: str, username: str, password: str, *, user_id: int, password_hash: str,
                 now_us: int) -> None:
        digest = self._digest(serial, username, password)
        with self._lock:
            self._entries[digest] = (user_id, password_hash, now_us + self.ttl_us)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def recall(self, serial: str, username: str, password: str, *, now_us: int) -> tuple[int, str] | None:
        """(user id, password hash) verified for this triple, if still fresh."""
        digest = self._digest(serial, username, password)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if now_us >= entry[2] or now_us < entry[2] - self.ttl_us:
                del self._entries[digest]
                return None
            return entry[0], entry[1]
