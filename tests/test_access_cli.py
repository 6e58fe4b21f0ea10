"""The operator's commands: orgs, users, certs, entitlements, audit."""
from __future__ import annotations

import json
import re

from click.testing import CliRunner

from bondtape.cli import cli


def run(args, env=None, ok=True):
    result = CliRunner().invoke(cli, args, env=env, catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_operator_workflow(tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    ca = str(tmp_path / "ca")
    env = {"BONDTAPE_DATABASE_URL": db, "BONDTAPE_CA_DIR": ca, "BONDTAPE_OUTBOX": str(tmp_path / "outbox"),
           "BONDTAPE_BASE_URL": "https://traqs.example"}
    assert "organisation 1 created" in run(["orgs", "create", "Market Operator", "--kind", "OPERATOR"], env).output
    run(["orgs", "create", "Dealer A", "--kind", "FIRM", "--mpid", "dlra"], env)
    bad = run(["orgs", "create", "Dealer B", "--kind", "FIRM"], env, ok=False)
    assert bad.exit_code == 1 and "ORG_MPID" in bad.output and "Traceback" not in bad.output
    # an MPID already held by an open organisation: its reports would be billed to one and
    # traded by the other
    taken = run(["orgs", "create", "Dealer A2", "--kind", "FIRM", "--mpid", "DLRA"], env, ok=False)
    assert taken.exit_code == 1 and "ORG_MPID_TAKEN" in taken.output and "'Dealer A'" in taken.output
    bad_email = run(["orgs", "create", "Vendor V", "--kind", "VENDOR", "--email", "notanemail"], env, ok=False)
    assert bad_email.exit_code == 1 and "ORG_EMAIL" in bad_email.output
    out = run(["users", "add", "--org", "1", "--username", "root-op", "--email", "op@example.test", "--full-name",
               "Olive Operator", "--roles", "operator_admin", "--print-link"], env).output
    assert re.search(r"https://traqs.example/enroll/[A-Za-z0-9_-]{20,}", out)
    run(["users", "add", "--org", "2", "--username", "alice", "--email", "alice@dealer.test", "--full-name", "Alice",
         "--roles", "trader"], env)
    [mail] = list((tmp_path / "outbox").glob("*.eml"))
    assert "alice@dealer.test" in mail.read_text() and "/enroll/" in mail.read_text()
    users = json.loads(run(["users", "list", "--format", "json"], env).output)
    assert [(u["username"], u["status"]) for u in users] == [("root-op", "INVITED"), ("alice", "INVITED")]
    assert "password" not in json.dumps(users) and "totp" not in json.dumps(users)

    run(["certs", "init"], env)
    run(["certs", "server", "--out", str(tmp_path / "server")], env)
    issued = run(["certs", "issue", "alice", "--out", str(tmp_path / "alice")], env).output
    serial = re.search(r"certificate ([0-9a-f]+) issued", issued).group(1)
    assert (tmp_path / "alice" / "alice.key").stat().st_mode & 0o777 == 0o600
    assert ((tmp_path / "ca" / "ca-key.pem").stat().st_mode & 0o777) == 0o600
    listed = json.loads(run(["certs", "list", "--format", "json"], env).output)
    assert listed[0]["serial"] == serial and listed[0]["status"] == "valid"
    run(["certs", "revoke", serial, "--reason", "left the firm"], env)
    assert (tmp_path / "ca" / "crl.pem").exists()
    listed = json.loads(run(["certs", "list", "--format", "json"], env).output)
    assert listed[0]["status"].startswith("revoked")
    again = run(["certs", "revoke", serial, "--reason", "x"], env, ok=False)
    assert "CERT_REVOKED" in again.output

    run(["entitlements", "grant", "--org", "2", "--product", "HISTORIC", "--data-set", "CORP", "--year", "2023"], env)
    missing_year = run(["entitlements", "grant", "--org", "2", "--product", "HISTORIC", "--data-set", "CORP"], env, ok=False)
    assert "ENT_YEAR" in missing_year.output
    grants = json.loads(run(["entitlements", "list", "--format", "json"], env).output)
    assert [(g["product"], g["data_set"], g["year"]) for g in grants] == [("HISTORIC", "CORP", 2023)]

    trail = json.loads(run(["audit", "search", "--format", "json"], env).output)
    actions = {e["action"] for e in trail}
    assert {"admin.org.create", "admin.order.request", "admin.order.approved", "enroll.invite", "cert.issue",
            "cert.revoke", "admin.entitlement.grant"} <= actions
    assert json.loads(run(["audit", "search", "--action", "cert", "--format", "json"], env).output)[0]["action"] == "cert.revoke"


def test_demo_access_setup_is_idempotent(market, tmp_path):
    from bondtape.access.demo import setup_demo_access
    from bondtape.clock import now_us

    first = setup_demo_access(market, tmp_path / "demo", now_us=now_us())
    assert first.invited[0] == "operator" and "vendor" in first.invited and len(first.invited) == 4
    mails = sorted((tmp_path / "demo" / "outbox").glob("*.eml"))
    assert len(mails) == 4 and "/enroll/" in mails[0].read_text()
    assert (tmp_path / "demo" / "secret.key").stat().st_mode & 0o777 == 0o600
    again = setup_demo_access(market, tmp_path / "demo", now_us=now_us())
    assert again.invited == [] and len(list((tmp_path / "demo" / "outbox").glob("*.eml"))) == 4
    assert any("bondtape web serve" in line for line in again.lines())
