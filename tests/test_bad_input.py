"""Bad input as users meet it: every bad value gets a stable code, the field and what is
accepted; no traceback; nothing half-written (a refused file submits nothing)."""
from __future__ import annotations

import csv
import json

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from bondtape.cli import cli
from bondtape.engine import Engine
from bondtape.journal.schema import journal, trade_reports
from bondtape.reporting.codes import Rejected
from bondtape.reporting.commands import parse_command
from tests.api_support import api_client, api_world, with_certificate
from tests.conftest import IG, et

HEADER = "action,client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time,report_time"
EXEC, RECEIVED = "2024-03-04T10:00:00-05:00", "2024-03-04T10:01:00-05:00"


def line(ref: str, **over) -> str:
    row = dict(action="NEW", client_ref=ref, reporting_mpid="DLRA", cusip=IG, side="S", capacity="P", contra="C",
               quantity="100000", price="99.5", execution_time=EXEC, report_time=RECEIVED)
    row.update(over)
    return ",".join(row[c] for c in HEADER.split(","))


def invoke(args):
    """Run a command as a user would: a SystemExit is an answer, any other exception a traceback."""
    res = CliRunner().invoke(cli, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.output, res.exception)
    return res


def journaled(db) -> int:
    with db.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(journal)).scalar_one()


def fields(**over):
    f = dict(reporting_mpid="DLRA", cusip=IG, side="S", capacity="P", contra="C", quantity="100000", price="99.5",
             execution_time=EXEC)
    f.update(over)
    return f


# --- parsing numbers, times, dates (every channel) ------------------------------------------


@pytest.mark.parametrize("name,value,code", [
    ("price", "1e-999999999", "PRICE_INVALID"),  # was accepted and stored as price 0
    ("price", "1e2", "PRICE_INVALID"),  # a spreadsheet's exponent form has lost digits
    ("price", "NaN", "PRICE_INVALID"),
    ("price", "1_01", "PRICE_INVALID"),  # Decimal reads underscores
    ("price", "\uff11\uff10\uff11", "PRICE_INVALID"),  # full-width digits
    ("price", "101,5", "PRICE_INVALID"),  # a decimal comma, not 1015
    ("quantity", "Infinity", "QUANTITY_INVALID"),
    ("commission", "1234567890123456789012345678901", "COMMISSION_INVALID"),  # was an engine crash
    ("yield", "0." + "0" * 30 + "1", "YIELD_INVALID"),
])
def test_numbers_are_plain_digits_within_range(name, value, code):
    with pytest.raises(Rejected) as exc:
        parse_command(fields(**{name: value}), channel="bulk")
    assert (exc.value.reject.code, exc.value.reject.field) == (code, name)
    assert "digits" in exc.value.reject.message


def test_plain_numbers_still_read_exactly():
    terms = parse_command(fields(quantity="1,000,000.00", price="+101.125", commission=".5"), channel="bulk").terms
    assert (str(terms.quantity), str(terms.price), str(terms.commission)) == ("1000000.00", "101.125", "0.5")


@pytest.mark.parametrize("value", ["2024-03-04", "9999-12-31T23:59:59", "0001-01-01T00:00:00+05:00"])
def test_times_need_a_time_of_day_within_the_calendar(value):
    with pytest.raises(Rejected) as exc:  # the 9999 one was an OverflowError in the engine
        parse_command(fields(execution_time=value), channel="bulk")
    assert (exc.value.reject.code, exc.value.reject.field) == ("TIME_INVALID", "execution_time")


def test_out_of_calendar_time_is_a_reject_not_an_engine_crash(market):
    [r] = Engine(market).submit([parse_command(fields(execution_time="2024-03-04T10:00:00-05:00"), channel="api")])
    assert r.accepted
    with pytest.raises(Rejected):
        parse_command(fields(execution_time="9999-12-31T23:59:59"), channel="api")


@pytest.mark.parametrize("value", ["2024W101", "20240305", "2024-02-30"])
def test_dates_are_yyyy_mm_dd(value):
    with pytest.raises(Rejected) as exc:
        parse_command(fields(settlement_date=value), channel="bulk")
    assert exc.value.reject.code == "DATE_INVALID" and "YYYY-MM-DD" in exc.value.reject.message


def test_long_values_are_not_echoed_whole():
    with pytest.raises(Rejected) as exc:
        parse_command(fields(side="X" * 100_000), channel="bulk")
    assert exc.value.reject.code == "FIELD_INVALID" and len(exc.value.reject.message) < 200


# --- bondtape report ----------------------------------------------------------------------


def test_report_refuses_a_file_it_cannot_read_whole_and_submits_nothing(market, db_url, tmp_path):
    cases = {
        "unknown.csv": (HEADER + ",tset\n" + line("u1") + ",Y\n").encode(),  # a misspelt test column
        "twice.csv": (HEADER + ",reporting_mpid\n" + line("t1") + ",DLRB\n").encode(),
        "empty.csv": b"",
        # the bad byte is past the first batch: before, the first batch was journaled, then a crash
        "latin1.csv": (HEADER + "\n" + "".join(line(f"l{i}", quantity=str(1000 + i)) + "\n" for i in range(5))
                       + line("caf\xe9", quantity="999") + "\n").encode("latin-1"),
        "hugefield.csv": (HEADER + "\n" + line("h0") + "\n" + line("x" * 200_000) + "\n").encode(),
    }
    for name, data in cases.items():
        src = tmp_path / name
        src.write_bytes(data)
        res = invoke(["report", str(src), "--batch-size", "2", "--use-report-time", "--db", db_url])
        assert res.exit_code == 1 and "FILE_INVALID" in res.output, (name, res.output)
        assert journaled(market) == 0, name
    assert "line 7 is not UTF-8" in invoke(["report", str(tmp_path / "latin1.csv"), "--db", db_url]).output


def test_report_results_path_problems_are_refused_before_anything_is_sent(market, db_url, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(HEADER + "\n" + line("a") + "\n")
    res = invoke(["report", str(src), "--results", str(src), "--db", db_url])
    assert res.exit_code == 2 and "overwrite" in res.output
    assert src.read_text().startswith(HEADER)  # the input is intact
    res = invoke(["report", str(src), "--results", str(tmp_path / "no" / "such" / "r.csv"), "--db", db_url])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert invoke(["report", str(src), "--batch-size", "0", "--db", db_url]).exit_code == 2
    assert journaled(market) == 0


def test_report_bom_crlf_blank_lines_and_quoted_commas(market, db_url, tmp_path):
    src = tmp_path / "in.csv"
    text = "\ufeff" + HEADER + "\r\n" + line("q1").replace("99.5", '"99.5"') + "\r\n\r\n" + line(
        "q2", quantity='"1,000,000"') + "\r\n"
    src.write_bytes(text.encode("utf-8"))
    out = tmp_path / "out.csv"
    res = invoke(["report", str(src), "--results", str(out), "--use-report-time", "--db", db_url])
    assert res.exit_code == 0 and "2 accepted, 0 rejected" in res.output, res.output
    assert [r["line"] for r in csv.DictReader(open(out))] == ["2", "4"]



def test_report_refuses_a_line_whose_quote_runs_on_instead_of_swallowing_the_lines_after_it(market, db_url, tmp_path):
    """An unterminated quote took in every line after it as one cell: 1,001 lines gave one
    result row (labelled with the last line) and the other 1,000 were never submitted."""
    rows = [line(f"s{i}", quantity=str(2000 + i)) for i in range(1000)]
    cases = {
        "unterminated.csv": ("line 2", [line("s-bad", price='"101')] + rows),  # the reviewer's file
        "closed_later.csv": ("line 3", [rows[0], line("s-nl", price='"101\n.5"')] + rows[1:5]),  # a cell spanning lines
        "cr_in_cell.csv": ("line 2", [line("s-cr", price='"101\r.5"')] + rows[:5]),
        "after_quote.csv": ("line 4", rows[:2] + [line("s-x", price='"101.5"x')] + rows[2:5]),
        "header.csv": ("line 1", []),
    }
    for name, (where, data_lines) in cases.items():
        src = tmp_path / name
        head = HEADER if name != "header.csv" else HEADER.replace("action,", '"action,') + "\n" + rows[0]
        src.write_bytes((head + "\n" + "".join(x + "\n" for x in data_lines)).encode())
        res = invoke(["report", str(src), "--use-report-time", "--db", db_url])
        assert res.exit_code == 1 and "FILE_INVALID" in res.output, (name, res.output)
        assert f"{where} is not CSV" in res.output and "nothing was submitted" in res.output, (name, res.output)
        assert journaled(market) == 0, name
    # every data line gets its result row: a quoted comma is fine
    src = tmp_path / "fine.csv"
    src.write_text(HEADER + "\n" + line("f0", quantity='"1,000"') + "\n" + "".join(x + "\n" for x in rows[:20]))
    res = invoke(["report", str(src), "--use-report-time", "--db", db_url])
    assert res.exit_code == 0 and "21 lines: 21 accepted" in res.output, res.output
    assert len(list(csv.DictReader(open(tmp_path / "fine.results.csv")))) == 21


# --- reference data imports ---------------------------------------------------------------

SEC_HEADER = "cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a"


def test_securities_import_bad_files_and_rows(db_url, tmp_path):
    def load(name: str, data: bytes):
        f = tmp_path / name
        f.write_bytes(data)
        return invoke(["securities", "import", str(f), "--db", db_url])

    res = load("latin.csv", (SEC_HEADER + "\n037833100,AAPL1,Caf\xe9 Inc,4.25,2030-01-01,CORP,IG,N\n").encode("latin-1"))
    assert res.exit_code == 1 and "line 2 is not UTF-8" in res.output
    assert load("ok.csv", (SEC_HEADER + "\n037833100,AAPL1,Apple,4.25,2030-01-01,CORP,IG,N\n").encode()).exit_code == 0
    # a symbol another CUSIP holds: was an IntegrityError traceback, now a row error
    res = load("clash.csv", (SEC_HEADER + "\n594918104,AAPL1,Microsoft,4,2030-01-01,CORP,IG,N\n"
                             "459200101,IBM1,IBM,4,2030-01-01,CORP,IG,N\n"
                             "38259P508,IBM1,Alphabet,4,2030-01-01,CORP,IG,N\n").encode())
    assert res.exit_code == 0 and "line 2: symbol AAPL1 belongs to 037833100" in res.output
    assert "line 4: symbol IBM1 repeats line 3" in res.output and "1 securities loaded, 2 rows rejected" in res.output
    res = load("rows.csv", (SEC_HEADER + "\n594918104,MSFT1," + "M" * 201 + ",4,2030-01-01,CORP,IG,N\n"
                            "38259P508,GOOG1,Alphabet,1e1,2030-01-01,CORP,IG,N\n"
                            "38259P508,GOOG1,Alphabet,4,2030-02-30,CORP,IG,N\n").encode())
    assert "line 2: issuer is required, at most 200 characters" in res.output
    assert "line 3: coupon '1e1' is not accepted" in res.output and "line 4: maturity" in res.output
    res = load("header.csv", (SEC_HEADER + ",eligible_too\n594918104,MSFT1,Microsoft,4,2030-01-01,CORP,IG,N,"
                              "2031-01-01\n").encode())
    assert res.exit_code == 1 and "unknown column(s) 'eligible_too'" in res.output
    res = load("twice.csv", (SEC_HEADER + ",grade\n594918104,MSFT1,Microsoft,4,2030-01-01,CORP,IG,N,HY\n").encode())
    assert res.exit_code == 1 and "grade appear twice" in res.output
    listed = invoke(["securities", "list", "--format", "csv", "--db", db_url]).output
    assert "594918104" not in listed and "459200101" in listed


def test_firms_import_bad_rows(db_url, tmp_path):
    f = tmp_path / "firms.csv"
    f.write_text("mpid,name\nDLRA,Dealer A\nDLR\u00c9,Accent\nDLRB," + "n" * 201 + "\n")
    res = invoke(["firms", "import", str(f), "--db", db_url])
    assert "1 firms loaded, 2 rows rejected" in res.output and "line 3: mpid" in res.output


# --- other commands -----------------------------------------------------------------------


def test_out_of_range_numbers_and_ranges_on_the_command_line(db_url, tmp_path):
    big = "99999999999999999999"
    for args in (["users", "list", "--org", big], ["entitlements", "end", big], ["entitlements", "list", "--org", big],
                 ["fees", "unsubscribe", "--subscription", big, "--end", "2024-01-01"],
                 ["journal", "show", "--limit", "-5"], ["journal", "show", "--from-seq", big],
                 ["audit", "search", "--limit", "0"],
                 ["audit", "search", "--since", "2024-05-01", "--until", "2024-01-01"]):
        res = invoke(args + ["--db", db_url])  # each was a traceback or a silent everything
        assert res.exit_code == 2, (args, res.output)


def test_certs_refuse_bad_hosts_and_unreadable_authorities(tmp_path):
    ca = tmp_path / "ca"
    assert invoke(["certs", "init", "--ca-dir", str(ca)]).exit_code == 0
    res = invoke(["certs", "server", "--ca-dir", str(ca), "--out", str(tmp_path / "o"), "--host", ""])
    assert res.exit_code == 2 and "--host" in res.output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ca-key.pem").write_text("garbage")
    (bad / "ca-cert.pem").write_text("garbage")
    res = invoke(["certs", "server", "--ca-dir", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "CA_INVALID" in res.output


def test_a_bad_database_url_is_one_line(tmp_path):
    (tmp_path / "notdb.db").write_text("not a database")
    (tmp_path / "firms.csv").write_text("mpid,name\nDLRA,Dealer A\n")
    missing = f"sqlite:///{tmp_path}/missing/x.db"
    for argv, url, says in ((["firms", "list"], "foo://bar", "cannot open database"),
                            (["firms", "list"], missing, "DATABASE_NOT_FOUND"),  # a command that only reads
                            (["firms", "import", str(tmp_path / "firms.csv")], missing, "cannot open database"),
                            (["firms", "list"], f"sqlite:///{tmp_path}/notdb.db", "cannot open database")):
        res = invoke([*argv, "--db", url])
        assert res.exit_code == 1 and says in res.output and "sqlalche.me" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


# --- the REST API -------------------------------------------------------------------------


@pytest.fixture
def api(market, tmp_path):
    w = api_world(market, tmp_path, et(2026, 6, 1, 10, 0, 0))
    a = w.org("Dealer A", "FIRM", mpid="DLRA")
    w.org("Dealer B", "FIRM", mpid="DLRB")
    w.trader = w.user("a-trader", a, "trader")
    with_certificate(w, w.trader)
    yield w
    w.close()


API_EXEC = "2026-06-01T09:58:00-04:00"


def test_bulk_file_cannot_report_for_another_firm_through_a_repeated_column(api):
    c = api_client(api, api.trader)
    body = ("reporting_mpid,client_ref,cusip,side,capacity,contra,quantity,price,execution_time,REPORTING_MPID\n"
            f"DLRA,imp1,{IG},S,P,C,100000,101,{API_EXEC},DLRB\n")
    r = c.post("/api/v1/bulk", content=body, headers={"content-type": "text/csv"})
    assert r.status_code == 400 and r.json()["code"] == "FILE_INVALID", r.text
    with api.db.connect() as conn:
        assert conn.execute(sa.select(trade_reports.c.reporting_mpid)).all() == []
    # a header in another case is read as run_bulk reads it, and still checked
    r = c.post("/api/v1/bulk", content=body.replace(",REPORTING_MPID", "").replace(",DLRB", "").replace(
        "reporting_mpid", "Reporting_MPID").replace("DLRA,", "DLRB,"), headers={"content-type": "text/csv"})
    assert r.status_code == 400 and r.json()["field"] == "reporting_mpid"



def test_bulk_api_refuses_an_unterminated_quote_naming_its_line(api):
    c = api_client(api, api.trader)
    head = "client_ref,reporting_mpid,cusip,side,capacity,contra,quantity,price,execution_time\n"
    body = head + f'q0,DLRA,{IG},S,P,C,100000,"101,{API_EXEC}\n' + "".join(
        f"q{i},DLRA,{IG},S,P,C,{100000 + i},101,{API_EXEC}\n" for i in range(1, 50))
    r = c.post("/api/v1/bulk", content=body, headers={"content-type": "text/csv"})
    assert r.status_code == 400 and r.json()["code"] == "FILE_INVALID", r.text
    assert r.json()["message"].startswith("line 2 is not CSV: a quoted cell has no closing quote"), r.text
    with api.db.connect() as conn:
        assert conn.execute(sa.select(trade_reports.c.client_ref)).all() == []


def test_api_bodies(api):
    c = api_client(api, api.trader)
    chunked = c.post("/api/v1/reports", content=iter([b'{"client_ref":"', b"x" * 200_000, b'"}']),
                     headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and chunked.json()["code"] == "BODY_TOO_LARGE"
    twice = c.post("/api/v1/reports", content=b'{"price":"1","price":"2"}', headers={"content-type": "application/json"})
    assert twice.status_code == 400 and twice.json() == {
        "code": "FIELD_REPEATED", "field": "price", "message": "field 'price' appears twice in one object; send it once"}
    tiny = (b'{"cusip":"%s","side":"S","capacity":"P","contra":"C","quantity":"1000","price":1e-999999999,'
            b'"execution_time":"%s"}' % (IG.encode(), API_EXEC.encode()))
    r = c.post("/api/v1/reports", content=tiny, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["reject"]["code"] == "PRICE_INVALID"  # was accepted at price 0
    r = c.post("/api/v1/reports", content=tiny.replace(b"1e-999999999", b"1e999999999"),
               headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["reject"]["field"] == "price"


def test_api_paths_and_query_parameters(api):
    c = api_client(api, api.trader)
    for path in ("/api/v1/reports/abc", "/api/v1/reports/-1/cancel", "/api/v1/nothing"):
        r = c.get(path) if "cancel" not in path else c.post(path)
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND" and "field" in r.json(), path
    r = c.get("/api/v1/bulk")
    assert r.status_code == 405 and r.json()["code"] == "METHOD_NOT_ALLOWED"
    expect = {
        ("/api/v1/reports", "date_from=2024-05-01&date_to=2024-01-01"): ("FILTER_INVALID", "date_to"),
        ("/api/v1/reports", "date_from=2024W011"): ("DATE_INVALID", "date_from"),
        ("/api/v1/reports", "limit=%EF%BC%92"): ("LIMIT_INVALID", "limit"),
        ("/api/v1/reports", "after=%EF%BC%91%EF%BC%92"): ("FILTER_INVALID", "after"),
        ("/api/v1/reports", "cusip=" + "X" * 500): ("CUSIP_MALFORMED", "cusip"),
        ("/api/v1/time-and-sales", f"cusip={IG}&date_from=2024-05-01&date_to=2024-01-01"): ("FILTER_INVALID", "date_to"),
        ("/api/v1/time-and-sales", "cusip=" + "X" * 500): ("CUSIP_MALFORMED", "cusip"),
    }
    for (path, query), (code, field) in expect.items():
        r = c.get(f"{path}?{query}")
        assert r.status_code == 400 and (r.json()["code"], r.json()["field"]) == (code, field), (query, r.text)
    r = c.post("/api/v1/reports", content=json.dumps({"k" * 5000: 1}), headers={"content-type": "application/json"})
    assert r.status_code == 400 and len(r.text) < 1000


@pytest.mark.parametrize("argv", [
    ["journal", "verify"], ["journal", "show"], ["securities", "list"], ["firms", "list"], ["feed", "status"],
    ["feed", "replay"], ["fees", "records"], ["fees", "invoice", "--month", "2024-01", "--out", "{tmp}/inv"],
    ["historic", "build", "--data-set", "agency", "--year", "2024", "--as-of", "2026-07-01", "--out", "{tmp}/h"],
])
def test_a_command_that_reads_refuses_a_database_that_is_not_there(tmp_path, argv):
    """A mistyped --db: not a new, empty database read as if it were the market (before:
    `journal verify` said "0 journal events: OK", an invoice or a data set came out empty)."""
    missing = tmp_path / "typo.db"
    res = CliRunner().invoke(cli, [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--db", f"sqlite:///{missing}"])
    assert res.exit_code == 1 and "DATABASE_NOT_FOUND (db)" in res.output and str(missing) in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created: no database, no output
