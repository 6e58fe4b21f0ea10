"""``bondtape demo --no-serve`` builds and prints credentials that work; ``bondtape serve``
runs the website, REST API, feed and FIX gateway in one process and stops cleanly."""
from __future__ import annotations

import re
import shutil
import socket
import threading
from pathlib import Path

import httpx
import pyotp
import pytest
from click.testing import CliRunner

from bondtape.cli import cli
from bondtape.db import connect

pytestmark = pytest.mark.timeout(180)


def test_demo_no_serve_prints_credentials_that_sign_in(tmp_path):
    folder = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--dir", str(folder), "--days", "2", "--trades-per-day", "150",
                                      "--no-serve"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "http://127.0.0.1:8000/" in out and "bondtape demo password 1" in out
    # the commands it suggests run from any folder: the installation's bondtape, by its path
    # when it is not on PATH
    [command] = set(re.findall(r"^  (\S+) journal verify --db", out, re.M))
    assert command == "bondtape" and shutil.which("bondtape") or Path(command).is_absolute() and Path(command).exists()
    secrets = dict(re.findall(r"(demo-\w+)\s+.*TOTP secret ([A-Z2-7]+)", out))
    assert set(secrets) == {"demo-operator", "demo-trader", "demo-subscriber", "demo-investor"}
    again = CliRunner().invoke(cli, ["demo", "--dir", str(folder), "--days", "2", "--trades-per-day", "150",
                                     "--no-serve"])
    assert again.exit_code == 0 and dict(re.findall(r"(demo-\w+)\s+.*TOTP secret ([A-Z2-7]+)", again.output)) == secrets

    from bondtape.demo import DEMO_PASSWORD, demo_users
    from bondtape.serve import build_app
    from bondtape.web.testing import CSRF_RE
    from starlette.testclient import TestClient

    db = connect(f"sqlite:///{folder / 'bondtape.db'}")
    _users, settings, _access = demo_users(db, folder, host="127.0.0.1", port=8000)
    app = build_app(db, settings)
    try:
        client = TestClient(app, base_url="http://testserver", follow_redirects=False)
        token = CSRF_RE.search(client.get("/login").text).group(1)
        r = client.post("/login", data={"csrf_token": token, "username": "demo-trader", "password": DEMO_PASSWORD,
                                        "code": pyotp.TOTP(secrets["demo-trader"]).now(), "next": "/journal"})
        assert r.status_code == 303, r.text
        journal = client.get("/journal")
        assert journal.status_code == 200 and "/reports/" in journal.text  # the simulated firm's reports
        assert client.get("/data").status_code == 200
    finally:
        app.state.services.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_runs_web_feed_and_fix_in_one_process(market, tmp_path):
    import os

    from bondtape.access.settings import AccessSettings
    from bondtape.serve import run_serve

    settings = AccessSettings(secret_key=os.urandom(32), cookie_secure=False)
    ready: dict = {}
    started, stop = threading.Event(), threading.Event()

    def on_ready(addresses):
        ready.update(addresses)
        started.set()

    thread = threading.Thread(target=run_serve, args=(market, settings), daemon=True,
                              kwargs=dict(port=0, fix_port=_free_port(), ready=on_ready, stop=stop))
    thread.start()
    assert started.wait(30), "the server did not start"
    try:
        base = ready["http"]
        assert httpx.get(f"{base}/market", timeout=10).status_code == 200
        assert httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"]
        assert httpx.get(f"{base}/feed/status", timeout=10).status_code == 200  # the feed's routes
        host, port = ready["fix"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5):
            pass  # the FIX gateway listens
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
