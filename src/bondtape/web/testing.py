"""Test support for the website: a controllable clock, users with authenticators, and a
client that signs in and fills CSRF tokens. Used by bondtape's own tests; other route
modules' tests may use it too. Never used by the running service."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyotp
from starlette.testclient import TestClient

from bondtape.access import accounts
from bondtape.access.settings import AccessSettings
from bondtape.web.app import create_app

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
PASSWORD = "a long test password 7"


class Clock:
    def __init__(self, t_us: int):
        self.t = t_us

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1_000_000)


@dataclass(frozen=True)
class WorldUser:
    id: int
    username: str
    org_id: int
    password: str
    secret: str | None

    def code(self, clock: Clock) -> str:
        return pyotp.TOTP(self.secret).at(clock.t // 1_000_000)


class World:
    """A database, settings, a clock and the app; organisations and users on demand."""

    def __init__(self, db, folder: Path, now_us: int, *, policy=None, **settings):
        self.db = db
        self.policy = policy
        self.folder = Path(folder)
        self.clock = Clock(now_us)
        base = dict(secret_key=os.urandom(32), ca_dir=self.folder / "ca", historic_dir=self.folder / "historic",
                    outbox_dir=self.folder / "outbox", base_url="https://testserver")
        base.update(settings)
        self.settings = AccessSettings(**base)
        self._app = None

    @property
    def app(self):
        if self._app is None:
            self._app = create_app(self.db, self.settings, clock=self.clock, policy=self.policy)
        return self._app

    def org(self, name: str, kind: str, mpid: str | None = None) -> int:
        with self.db.begin() as conn:
            return accounts.create_organisation(conn, name, kind, mpid=mpid, at_us=self.clock.t)

    def user(self, username: str, org_id: int, roles, *, mfa: bool = True, password: str = PASSWORD) -> WorldUser:
        with self.db.begin() as conn:
            uid, secret = accounts.create_active_user(
                conn, org_id=org_id, username=username, password=password, roles=roles, at_us=self.clock.t,
                master_key=self.settings.secret_key if mfa else None)
        return WorldUser(uid, username, org_id, password, secret)

    def client(self) -> "SiteClient":
        return SiteClient(self)

    def signed_in(self, user: WorldUser) -> "SiteClient":
        """A client signed in as ``user`` (password and TOTP code), the clock 30 s on."""
        c = self.client()
        answer = c.login(user)
        if answer.status_code != 303:
            raise AssertionError(f"{user.username} could not sign in: {answer.status_code}")
        self.clock.advance(30)
        return c

    def close(self) -> None:
        """Stop the services the app started (a test's teardown)."""
        services = getattr(self.app.state, "services", None) if self._app is not None else None
        if services is not None:
            services.close()


class SiteClient:
    def __init__(self, world: World):
        self.world = world
        self.http = TestClient(world.app, base_url="https://testserver", follow_redirects=False)

    def csrf(self, path: str = "/login") -> str:
        page = self.http.get(path)
        match = CSRF_RE.search(page.text)
        if match is None and path != "/login":  # a visitor's pages carry no form but the sign-in
            return self.csrf("/login")
        assert match, f"no CSRF token on {path} ({page.status_code})"
        return match.group(1)

    def login(self, user: WorldUser, *, code: str | None = None, password: str | None = None):
        token = self.csrf("/login")
        return self.http.post("/login", data={
            "csrf_token": token, "username": user.username, "password": password or user.password,
            "code": code if code is not None else user.code(self.world.clock), "next": "/"})

    def post(self, path: str, data: dict | None = None, *, csrf_from: str = "/"):
        return self.http.post(path, data={"csrf_token": self.csrf(csrf_from), **(data or {})})

    def get(self, path: str, **kw):
        return self.http.get(path, **kw)
