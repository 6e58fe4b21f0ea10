"""Historic TRACE Data: content, layout, links, aging, the final view, determinism."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from bondtape.engine import Engine
from bondtape.historic import (HEADER, HistoricError, build_data_set, check_available, coverage,
                               data_dictionary_json, reference_number)
from bondtape.historic import builder as builder_module
from bondtape.journal.schema import trade_reports
from tests.conftest import AGCY, HY, IG, R144A, et
from tests.helpers import act, new

# The exact post-2012 header of TRACE_REFERENCE.md 4.2 (a real 2020 corporate file).
REFERENCE_HEADER = (
    "Record Count Num|Reference Number|Trade Status|TRACE Symbol|CUSIP|Bloomberg Identifier|Sub Product|"
    "When Issued Indicator|Remuneration|Quantity|Price|Yield Direction|Yield|As Of Indicator|Execution Date|"
    "Execution Time|Trade Report Date|Trade Report Time|Settlement Date|Trade Modifier 3|Trade Modifier 4|"
    "Buy/Sell Indicator|Buyer Commission|Buyer Capacity|Seller Commission|Seller Capacity|Reporting Party Type|"
    "Contra Party Indicator|Locked In Indicator|ATS Indicator|Special Price Indicator|Trading Market Indicator|"
    "Dissemination Flag|Prior Trade Report Date|Prior Reference Number|First Trade Control Date|"
    "First Trade Control Number"
)
AS_OF_2024 = dt.date(2026, 7, 1)  # the first day 2024 is available
MPIDS = ("DLRA", "DLRB", "DLRC", "CERT", "NMBR")


def ok(engine: Engine, *commands):
    results = engine.submit(list(commands))
    for r in results:
        assert r.accepted, r.reject
    return [r.control_number for r in results]


def scenario(db) -> dict[str, int]:
    """A 2024 corporate and agency market with every kind of record; returns control numbers."""
    e = Engine(db)
    cn: dict[str, int] = {}
    # customer sale, on time
    cn["customer"], = ok(e, new("DLRA", et(2024, 3, 4, 10, 0, 1), execution_us=et(2024, 3, 4, 10, 0, 0)))
    # inter-dealer: both sides; only the sell side is disseminated
    cn["id_sell"], cn["id_buy"] = ok(
        e, new("DLRA", et(2024, 3, 4, 11, 0, 5), contra="DLRB", execution_us=et(2024, 3, 4, 11, 0, 0),
               quantity=Decimal("250000")),
        new("DLRB", et(2024, 3, 4, 11, 1, 0), side="B", contra="DLRA", execution_us=et(2024, 3, 4, 11, 0, 0),
            quantity=Decimal("250000")))
    # far above the high-yield cap, with cents of par, and a yield
    cn["big"], = ok(e, new("DLRC", et(2024, 3, 4, 12, 0, 30), cusip=HY, side="B", capacity="A",
                           quantity=Decimal("12345678.50"), price=Decimal("87.123456"), yield_=Decimal("-0.25"),
                           commission=Decimal("125.00"), execution_us=et(2024, 3, 4, 12, 0, 0)))
    # excluded: a Rule 144A trade, a test report, a test firm's report
    cn["r144a"], = ok(e, new("DLRA", et(2024, 3, 4, 13, 0, 1), cusip=R144A, execution_us=et(2024, 3, 4, 13, 0, 0)))
    cn["test"], = ok(e, new("DLRA", et(2024, 3, 4, 13, 5, 1), test=True, execution_us=et(2024, 3, 4, 13, 5, 0),
                            quantity=Decimal("777000")))
    cn["cert"], = ok(e, new("CERT", et(2024, 3, 4, 13, 6, 1), execution_us=et(2024, 3, 4, 13, 6, 0),
                            quantity=Decimal("778000")))
    # an as-of report, and a P1 primary-market trade (not disseminated)
    cn["asof"], = ok(e, new("DLRB", et(2024, 3, 5, 9, 0, 0), execution_us=et(2024, 3, 1, 15, 0, 0),
                            quantity=Decimal("40000")))
    cn["p1"], = ok(e, new("DLRB", et(2024, 3, 5, 9, 30, 0), trading_market="P1",
                          execution_us=et(2024, 3, 5, 9, 29, 0), quantity=Decimal("5000000")))
    # cancelled the next day
    cn["to_cancel"], = ok(e, new("DLRA", et(2024, 3, 4, 14, 0, 1), execution_us=et(2024, 3, 4, 14, 0, 0),
                                 quantity=Decimal("61000")))
    ok(e, act("CANCEL", cn["to_cancel"], "DLRA", et(2024, 3, 5, 10, 0, 0)))
    # corrected twice: T -> C+R1 (same day) -> C+R2 (next day)
    cn["to_correct"], = ok(e, new("DLRB", et(2024, 3, 4, 15, 0, 1), execution_us=et(2024, 3, 4, 15, 0, 0),
                                  quantity=Decimal("70000")))
    cn["r1"], = ok(e, act("CORRECT", cn["to_correct"], "DLRB", et(2024, 3, 4, 16, 0, 0),
                          execution_us=et(2024, 3, 4, 15, 0, 0), quantity=Decimal("70000"), price=Decimal("99.625")))
    cn["r2"], = ok(e, act("CORRECT", cn["r1"], "DLRB", et(2024, 3, 5, 11, 0, 0),
                          execution_us=et(2024, 3, 4, 15, 0, 0), quantity=Decimal("71000"), price=Decimal("99.625")))
    # reversed after the cancel/correct window
    cn["to_reverse"], = ok(e, new("DLRC", et(2024, 3, 4, 16, 30, 1), execution_us=et(2024, 3, 4, 16, 30, 0),
                                  quantity=Decimal("82000")))
    cn["reversal"], = ok(e, act("REVERSE", cn["to_reverse"], "DLRC", et(2024, 5, 1, 10, 0, 0)))
    # a corrected trade reversed: the Y names the R row standing at the time
    cn["reversal_of_r"], = ok(e, act("REVERSE", cn["r2"], "DLRB", et(2024, 5, 2, 10, 0, 0)))
    # agency: in the agency set only; one of them corrected
    cn["agency"], = ok(e, new("DLRA", et(2024, 3, 4, 10, 30, 1), cusip=AGCY, execution_us=et(2024, 3, 4, 10, 30, 0)))
    cn["agency_r"], = ok(e, act("CORRECT", cn["agency"], "DLRA", et(2024, 3, 4, 10, 45, 0), cusip=AGCY,
                                execution_us=et(2024, 3, 4, 10, 30, 0), price=Decimal("99.75")))
    # across the year end: reported 2024-12-30, cancelled 2025-01-02
    cn["year_end"], = ok(e, new("DLRA", et(2024, 12, 30, 10, 0, 1), execution_us=et(2024, 12, 30, 10, 0, 0),
                                quantity=Decimal("93000")))
    ok(e, act("CANCEL", cn["year_end"], "DLRA", et(2025, 1, 2, 10, 0, 0)))
    return cn


def text_rows(out: Path) -> list[list[str]]:
    rows = []
    for f in sorted((out / "ehts").iterdir()):
        lines = f.read_text().split("\n")
        rows += [line.split("|") for line in lines[1:-2]]
    return rows


def parquet(out: Path, view: str = "parquet") -> list[dict]:
    rel = duckdb.sql(f"SELECT * FROM read_parquet('{out}/{view}/*.parquet') ORDER BY trd_rpt_dt, rec_ct_nb")
    return [dict(zip(rel.columns, row)) for row in rel.fetchall()]


@pytest.fixture
def built(market, tmp_path):
    cn = scenario(market)
    out = tmp_path / "corp2024"
    build_data_set(market, "corporate", 2024, AS_OF_2024, out)
    return market, cn, out


def test_header_is_the_reference_header_and_every_line_has_37_fields(built):
    _, _, out = built
    assert HEADER == REFERENCE_HEADER and len(HEADER.split("|")) == 37
    files = sorted((out / "ehts").iterdir())
    assert [f.name for f in files] == ["enhanced-time-and-sales-cusip-2024-03-04.txt",
                                       "enhanced-time-and-sales-cusip-2024-03-05.txt",
                                       "enhanced-time-and-sales-cusip-2024-05-01.txt",
                                       "enhanced-time-and-sales-cusip-2024-05-02.txt",
                                       "enhanced-time-and-sales-cusip-2024-12-30.txt"]
    for f in files:
        lines = f.read_text().split("\n")
        assert lines[0] == REFERENCE_HEADER and lines[-1] == ""
        data, trailer = lines[1:-2], lines[-2]
        assert all(len(line.split("|")) == 37 for line in data)
        assert [int(line.split("|")[0]) for line in data] == list(range(1, len(data) + 1))
        day = f.name[-14:-4].replace("-", "")
        assert trailer == f"{day}235959{len(data):010d}"
        assert all(line.split("|")[16] == day for line in data)  # the file holds its report date


def test_value_formats(built):
    _, cn, out = built
    rows = text_rows(out)
    for r in rows:
        for i in (14, 16, 18, 35):
            assert re.fullmatch(r"\d{8}", r[i]), (i, r)
        assert r[33] == "" or re.fullmatch(r"\d{8}", r[33])
        assert re.fullmatch(r"\d{6}", r[15]) and re.fullmatch(r"\d{6}", r[17])
        assert re.fullmatch(r"\d+\.\d{2}", r[9]) and re.fullmatch(r"\d+\.\d{6}", r[10])
        assert re.fullmatch(r"\d{7}", r[1]) and re.fullmatch(r"\d{7}", r[36])
        assert r[26] == "D" and r[27] in ("C", "D")
    big = next(r for r in rows if r[1] == reference_number(cn["big"]))
    assert big[4] != "" and big[9] == "12345678.50" and big[10] == "87.123456"  # uncapped, exact
    assert (big[11], big[12]) == ("-", "0.250000")
    assert (big[21], big[22], big[23], big[24], big[25]) == ("B", "125.00", "A", "0.00", "")
    asof = next(r for r in rows if r[1] == reference_number(cn["asof"]))
    assert (asof[13], asof[14], asof[15], asof[16]) == ("A", "20240301", "150000", "20240305")
    customer = next(r for r in rows if r[1] == reference_number(cn["customer"]))
    assert customer[:9] == ["1", reference_number(cn["customer"]), "T", "ACME4012345", IG, "", "CORP", "N", ""]
    assert customer[14:19] == ["20240304", "100000", "20240304", "100001", "20240306"]
    assert customer[32:] == ["Y", "", "", "20240304", reference_number(cn["customer"])]


def test_excluded_reports_and_no_identities_anywhere(built):
    db, cn, out = built
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet")
    cells = [str(v) for view in ("parquet", "final") for row in parquet(out, view) for v in row.values()]
    columns = duckdb.sql(f"SELECT * FROM read_parquet('{out}/parquet/*.parquet')").columns
    for mpid in MPIDS:
        assert mpid.encode() not in blob and not any(mpid in v for v in cells)
    assert not [c for c in columns if "mpid" in c and c != "cntra_mp_id" or "client" in c]
    assert {row["cntra_mp_id"] for row in parquet(out)} == {"C", "D"}
    assert R144A.encode() not in blob and AGCY.encode() not in blob
    assert not any(R144A in v or AGCY in v for v in cells)
    refs = {r[1] for r in text_rows(out)}
    for name in ("r144a", "test", "cert", "agency", "agency_r"):
        assert reference_number(cn[name]) not in refs
    assert "777000.00" not in {r[9] for r in text_rows(out)}
    agency = builder_module.build_data_set(db, "agency", 2024, AS_OF_2024, out.parent / "agcy")
    arows = text_rows(agency.out)
    assert {r[6] for r in arows} == {"AGCY"} and [r[2] for r in arows] == ["T", "C", "R"]


def test_dissemination_flag_as_decided_at_the_time(built):
    db, cn, out = built
    by_ref = {(r[1], r[2]): r for r in text_rows(out)}
    assert by_ref[(reference_number(cn["id_sell"]), "T")][32] == "Y"
    assert by_ref[(reference_number(cn["id_buy"]), "T")][32] == "N"
    assert by_ref[(reference_number(cn["p1"]), "T")][32] == "N"
    assert by_ref[(reference_number(cn["p1"]), "T")][9] == "5000000.00"
    with db.connect() as conn:
        flags = dict(conn.execute(sa.select(trade_reports.c.control_number, trade_reports.c.disseminated)).all())
    for r in parquet(out):
        if r["trc_st"] in ("T", "R"):
            assert (r["dissem_fl"] == "Y") == bool(flags[r["control_number"]])


def test_every_x_c_r_y_links_to_its_original(built):
    _, cn, out = built
    rows = parquet(out)
    by_key = {(r["msg_seq_nb"], r["trd_rpt_dt"]): r for r in rows if r["trc_st"] in ("T", "R")}
    statuses = [r["trc_st"] for r in rows]
    assert {s: statuses.count(s) for s in "TXCRY"} == {"T": 10, "X": 1, "C": 2, "R": 2, "Y": 2}
    terms = ("cusip_id", "entrd_vol_qt", "rptd_pr", "trd_exctn_dt", "trd_exctn_tm", "rpt_side_cd", "cntra_mp_id")
    for r in rows:
        if r["trc_st"] == "T":
            assert r["orig_msg_seq_nb"] is None and r["pr_trd_dt"] is None
            assert (r["first_trade_ctrl_num"], r["first_trade_ctrl_date"]) == (r["msg_seq_nb"], r["trd_rpt_dt"])
            continue
        original = by_key[(r["orig_msg_seq_nb"], r["pr_trd_dt"])]
        assert original["control_number"] == r["prior_control_number"]
        assert original["first_control_number"] == r["first_control_number"]
        if r["trc_st"] in ("X", "C", "Y"):  # repeat the original's terms
            assert all(r[k] == original[k] for k in terms)
        if r["trc_st"] in ("X", "C"):
            assert r["msg_seq_nb"] == original["msg_seq_nb"]
        if r["trc_st"] == "Y":
            assert r["asof_cd"] == "R" and r["msg_seq_nb"] in (reference_number(cn["reversal"]),
                                                               reference_number(cn["reversal_of_r"]))
            assert r["orig_msg_seq_nb"] in (reference_number(cn["to_reverse"]), reference_number(cn["r2"]))
    c_rows = [r for r in rows if r["trc_st"] == "C"]
    r_rows = [r for r in rows if r["trc_st"] == "R"]
    # each correction: C (old terms) immediately followed by its R
    for c_row, r_row in zip(c_rows, r_rows):
        assert (c_row["trd_rpt_dt"], c_row["rec_ct_nb"] + 1) == (r_row["trd_rpt_dt"], r_row["rec_ct_nb"])
        assert r_row["orig_msg_seq_nb"] == c_row["msg_seq_nb"]
    assert r_rows[1]["control_number"] == cn["r2"] and r_rows[1]["entrd_vol_qt"] == Decimal("71000.00")
    assert r_rows[1]["first_trade_ctrl_num"] == reference_number(cn["to_correct"])


DICK_NIELSEN_POST_2012 = """
WITH d AS (SELECT * FROM read_parquet('{out}/parquet/*.parquet') WHERE cusip_id IS NOT NULL),
keep AS (SELECT * FROM d WHERE trc_st IN ('T', 'R')),
xc AS (SELECT * FROM d WHERE trc_st IN ('X', 'C')),
y AS (SELECT * FROM d WHERE trc_st = 'Y'),
step2 AS (
  SELECT k.* FROM keep k ANTI JOIN xc ON k.cusip_id = xc.cusip_id AND k.entrd_vol_qt = xc.entrd_vol_qt
    AND k.rptd_pr = xc.rptd_pr AND k.trd_exctn_dt = xc.trd_exctn_dt AND k.trd_exctn_tm = xc.trd_exctn_tm
    AND k.rpt_side_cd = xc.rpt_side_cd AND k.cntra_mp_id = xc.cntra_mp_id AND k.msg_seq_nb = xc.msg_seq_nb),
step3 AS (
  SELECT k.* FROM step2 k ANTI JOIN y ON k.cusip_id = y.cusip_id AND k.entrd_vol_qt = y.entrd_vol_qt
    AND k.rptd_pr = y.rptd_pr AND k.trd_exctn_dt = y.trd_exctn_dt AND k.trd_exctn_tm = y.trd_exctn_tm
    AND k.rpt_side_cd = y.rpt_side_cd AND k.cntra_mp_id = y.cntra_mp_id AND k.msg_seq_nb = y.orig_msg_seq_nb)
SELECT * FROM step3
"""


def assert_dick_nielsen_gives_final(out: Path) -> int:
    cleaned = duckdb.sql(DICK_NIELSEN_POST_2012.format(out=out))
    final = duckdb.sql(f"SELECT * FROM read_parquet('{out}/final/*.parquet')")
    assert cleaned.columns == final.columns
    a, b = sorted(cleaned.fetchall(), key=repr), sorted(final.fetchall(), key=repr)
    assert len(a) == len(b) and a == b
    return len(b)


def expected_final(db, sub: str, first: str, last: str) -> set[int]:
    """The truth from the trade state: reports of the period still standing at its end."""
    t = trade_reports
    end = dt.datetime.combine(dt.date.fromisoformat(last) + dt.timedelta(days=1), dt.time(0),
                              tzinfo=__import__("zoneinfo").ZoneInfo("America/New_York"))
    from bondtape.clock import to_us
    with db.connect() as conn:
        return {r[0] for r in conn.execute(sa.select(t.c.control_number).where(
            t.c.data_set == sub, t.c.is_test == sa.false(), t.c.rule_144a == sa.false(),
            t.c.report_date >= first, t.c.report_date <= last,
            sa.or_(t.c.closed_us.is_(None), t.c.closed_us >= to_us(end))))}


def test_dick_nielsen_post_2012_steps_give_exactly_the_final_view(built):
    db, cn, out = built
    n = assert_dick_nielsen_gives_final(out)
    final_cns = {r["control_number"] for r in parquet(out, "final")}
    assert final_cns == expected_final(db, "CORP", "2024-01-01", "2024-12-31")
    assert n == len(final_cns) == 7
    assert cn["year_end"] in final_cns  # cancelled only in 2025: stands at the end of 2024
    assert not {cn["to_cancel"], cn["to_correct"], cn["r1"], cn["r2"], cn["to_reverse"]} & final_cns


def test_dick_nielsen_on_a_simulated_market(db, tmp_path):
    from bondtape.simulate.market import simulate_market

    simulate_market(db, dt.date(2024, 10, 1), 40, 120, seed=5, n_securities=12)
    for data_set, sub in (("corporate", "CORP"), ("agency", "AGCY")):
        out = tmp_path / data_set
        result = build_data_set(db, data_set, 2024, AS_OF_2024, out)
        by_status = result.manifest["totals"]["by_status"]
        assert_dick_nielsen_gives_final(out)
        assert {r["control_number"] for r in parquet(out, "final")} == expected_final(db, sub, "2024-01-01", "2024-12-31")
        assert result.records == sum(by_status.values()) > 0
        if data_set == "corporate":  # every kind of record, so the check means something
            assert min(by_status.values()) > 0, by_status


def test_aging_refused_before_the_boundary_with_the_date(market, tmp_path):
    with pytest.raises(HistoricError) as err:
        check_available("corporate", 2024, dt.date(2026, 6, 30))
    assert err.value.code == "NOT_YET_AVAILABLE" and "2026-07-01" in err.value.message
    assert check_available("corporate", 2024, dt.date(2026, 7, 1)) == dt.date(2026, 7, 1)
    with pytest.raises(HistoricError):
        build_data_set(market, "agency", 2024, dt.date(2026, 6, 30), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_refuses_unaged_year_and_builds(market, tmp_path, db_url):
    from bondtape.cli import cli

    scenario(market)
    runner = CliRunner()
    res = runner.invoke(cli, ["historic", "build", "--data-set", "corporate", "--year", "2024", "--as-of",
                              "2026-06-30", "--out", str(tmp_path / "o"), "--db", db_url])
    assert res.exit_code == 1 and "NOT_YET_AVAILABLE" in res.output and "2026-07-01" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(cli, ["historic", "build", "--data-set", "corporate", "--year", "2024", "--as-of",
                              "2026-07-01", "--out", str(tmp_path / "o"), "--db", db_url])
    assert res.exit_code == 0, res.output
    assert "17 records" in res.output and (tmp_path / "o" / "manifest.json").exists()
    res = runner.invoke(cli, ["historic", "build", "--data-set", "corporate", "--year", "2024", "--as-of",
                              "2026-07-01", "--out", str(tmp_path / "o"), "--db", db_url])
    assert res.exit_code == 1 and "OUT_NOT_EMPTY" in res.output


def test_cli_refuses_what_it_cannot_build_before_building(market, tmp_path, db_url, monkeypatch):
    """Each with a code, nothing written: a database that is not there (not created empty),
    an as-of date after today, a year whose availability is past the calendar, the current
    folder as OUT. A symbolic link to an empty folder builds into that folder."""
    from bondtape.cli import cli

    scenario(market)
    runner = CliRunner()

    def build(*args: str):
        res = runner.invoke(cli, ["historic", "build", "--data-set", "corporate", *args])
        assert "Traceback" not in res.output and "internal error" not in res.output, res.output
        return res

    missing = tmp_path / "typo.db"
    res = build("--year", "2024", "--as-of", "2026-07-01", "--out", str(tmp_path / "m"), "--db", f"sqlite:///{missing}")
    assert res.exit_code == 1 and "DATABASE_NOT_FOUND (db)" in res.output and str(missing) in res.output
    assert not missing.exists() and not (tmp_path / "m").exists()
    tomorrow = dt.date.today() + dt.timedelta(days=2)
    res = build("--year", "2024", "--as-of", tomorrow.isoformat(), "--out", str(tmp_path / "f"), "--db", db_url)
    assert res.exit_code == 1 and "AS_OF_IN_FUTURE (as_of)" in res.output
    for year in ("9998", "99999"):
        res = build("--year", year, "--out", str(tmp_path / "y"), "--db", db_url)
        assert res.exit_code == 1 and "YEAR_INVALID (year)" in res.output and "to 9997" in res.output, res.output
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    res = build("--year", "2024", "--as-of", "2026-07-01", "--out", ".", "--db", db_url)
    assert res.exit_code == 1 and "OUT_INVALID (out)" in res.output and list(here.iterdir()) == []
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    res = build("--year", "2024", "--as-of", "2026-07-01", "--out", str(tmp_path / "link"), "--db", db_url)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "link").is_symlink() and (tmp_path / "link" / "manifest.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder, no lock left


def test_a_second_build_of_the_same_folder_is_refused_while_the_first_runs(market, tmp_path):
    """Two builds of one OUT: the second is refused (OUT_BUSY), never run over the first's
    half-built folder; the first publishes a whole data set."""
    import threading

    scenario(market)
    out = tmp_path / "sets" / "o"
    started, go_on = threading.Event(), threading.Event()

    def hold(day, n):  # the first build waits on its first day until the second was tried
        started.set()
        assert go_on.wait(60)

    first: dict = {}
    thread = threading.Thread(target=lambda: first.setdefault(
        "result", build_data_set(market, "corporate", 2024, AS_OF_2024, out, progress=hold)))
    thread.start()
    try:
        assert started.wait(60)
        with pytest.raises(HistoricError) as err:
            build_data_set(market, "corporate", 2024, AS_OF_2024, out)
        assert (err.value.code, err.value.field) == ("OUT_BUSY", "out")
    finally:
        go_on.set()
        thread.join(60)
    manifest = json.loads((out / "manifest.json").read_text())
    assert first["result"].records == 17 and all((out / f["path"]).exists() for f in manifest["files"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["o"]  # the lock file went with the build
    with pytest.raises(HistoricError) as err:  # and then it is simply there
        build_data_set(market, "corporate", 2024, AS_OF_2024, out)
    assert err.value.code == "OUT_NOT_EMPTY"


def test_the_parquet_files_hold_the_types_the_data_dictionary_names(market, tmp_path):
    import pyarrow.parquet as pq

    scenario(market)
    out = build_data_set(market, "corporate", 2024, AS_OF_2024, tmp_path / "o").out
    named = {c["name"]: c["type"] for c in json.loads((out / "data_dictionary.json").read_text())["columns"]}
    for path in sorted((out / "parquet").iterdir()) + sorted((out / "final").iterdir()):
        read = pq.read_table(path)  # as pandas, Polars and DuckDB get them: times in milliseconds
        assert {f.name: str(f.type) for f in read.schema} == named, path
        assert all(t is None or t.microsecond == 0 for t in read.column("trd_exctn_tm").to_pylist())


def test_2003_corporate_holds_2002(market, tmp_path):
    e = Engine(market)
    a, = ok(e, new("DLRA", et(2002, 8, 1, 10, 0, 1), execution_us=et(2002, 8, 1, 10, 0, 0)))
    b, = ok(e, new("DLRA", et(2003, 2, 3, 10, 0, 1), execution_us=et(2003, 2, 3, 10, 0, 0)))
    g, = ok(e, new("DLRA", et(2002, 8, 1, 11, 0, 1), cusip=AGCY, execution_us=et(2002, 8, 1, 11, 0, 0)))
    assert coverage("corporate", 2003) == (dt.date(2002, 7, 1), dt.date(2003, 12, 31))
    assert coverage("agency", 2003) == (dt.date(2003, 1, 1), dt.date(2003, 12, 31))
    corp = build_data_set(market, "corporate", 2003, dt.date(2005, 7, 1), tmp_path / "c")
    assert {r["control_number"] for r in parquet(corp.out)} == {a, b}
    assert corp.manifest["first_report_date"] == "2002-07-01"
    with pytest.raises(HistoricError) as err:
        build_data_set(market, "corporate", 2002, dt.date(2010, 3, 31), tmp_path / "d")
    assert err.value.code == "YEAR_INCLUDED_IN_NEXT"
    agency = build_data_set(market, "agency", 2002, dt.date(2010, 3, 31), tmp_path / "g")
    assert {r["control_number"] for r in parquet(agency.out)} == {g}


def test_rebuild_is_byte_identical_and_manifest_is_true(built):
    db, _, out = built
    again = build_data_set(db, "corporate", 2024, AS_OF_2024, out.parent / "again").out
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["data_set"], manifest["year"], manifest["as_of"]) == ("corporate", 2024, "2026-07-01")
    assert manifest["record_format"] and manifest["rulebook_version"]
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {str(p) for p in files if p.name != "manifest.json"}
    for f in manifest["files"]:
        path = out / f["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
        if f["kind"] == "ehts":
            assert int(path.read_text().split("\n")[-2][14:]) == f["rows"]
        elif f["kind"] in ("parquet", "final"):
            assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0][0] == f["rows"]
    assert manifest["totals"]["records"] == len(text_rows(out)) == 17


def test_plan_days_reads_a_day_from_its_control_numbers_only_where_they_are_mostly_its_own():
    from bondtape.historic.records import plan_days

    d = dt.date.fromisoformat
    # numbered as they arrived: each day read from its stretch of control numbers
    assert plan_days([(d("2024-03-04"), 10, 19, 10), (d("2024-03-05"), 20, 29, 9)]) == {
        d("2024-03-04"): (10, 19), d("2024-03-05"): (20, 29)}
    # a report sent in late with an earlier report time (number 35, dated the 4th): most
    # numbers in 10..35 are the 5th's, so the 4th is read through the report-date index
    assert plan_days([(d("2024-03-04"), 10, 35, 11), (d("2024-03-05"), 20, 34, 14)]) == {
        d("2024-03-04"): None, d("2024-03-05"): (20, 34)}
    assert plan_days([(d("2024-03-04"), 1, 100, 20)]) == {d("2024-03-04"): None}
    assert plan_days([(d("2024-03-04"), 1, 100, 20)], slack=5) == {d("2024-03-04"): (1, 100)}
    assert plan_days([]) == {}


def test_read_plan_gives_the_files_of_reading_by_report_date(built, monkeypatch):
    """The scenario reports 2024-03-04 trades after 2024-03-05 ones (out of arrival order):
    the planned reads (from control-number stretches where they can be) give byte for byte
    the files of reading every day through the report-date index."""
    db, _, out = built
    planned = {}
    real_plan = builder_module.plan_days
    monkeypatch.setattr(builder_module, "plan_days", lambda spans: planned.update(real_plan(spans)) or dict(planned))
    again = build_data_set(db, "corporate", 2024, AS_OF_2024, out.parent / "planned").out
    if db.dialect.name != "sqlite":  # the plan is SQLite's: PostgreSQL reads through the index
        assert planned == {}
        return
    assert any(planned.values()) and None in planned.values()
    monkeypatch.setattr(builder_module, "plan_days", lambda spans: {day: None for day, *_ in spans})
    ordered = build_data_set(db, "corporate", 2024, AS_OF_2024, out.parent / "ordered").out
    files = sorted(p.relative_to(ordered) for p in ordered.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (ordered / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_bad_requests_have_codes_and_leave_nothing_half_written(market, tmp_path, monkeypatch):
    tmp_path = tmp_path / "outputs"
    tmp_path.mkdir()
    with pytest.raises(HistoricError) as err:
        build_data_set(market, "muni", 2024, AS_OF_2024, tmp_path / "a")
    assert (err.value.code, err.value.field) == ("DATA_SET_INVALID", "data_set")
    with pytest.raises(HistoricError) as err:
        build_data_set(market, "agency", 1999, AS_OF_2024, tmp_path / "a")
    assert err.value.code == "YEAR_INVALID"
    scenario(market)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(builder_module, "_write_parquet", boom)
    with pytest.raises(OSError):
        build_data_set(market, "corporate", 2024, AS_OF_2024, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    def bad_records(*args, **kwargs):  # records are derived in their own thread: its failure still ends the build
        raise ValueError("a value does not fit decimal128(18, 2)")

    monkeypatch.setattr(builder_module, "records", bad_records)
    with pytest.raises(ValueError, match="does not fit"):
        build_data_set(market, "corporate", 2024, AS_OF_2024, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("symbol", ["BAD|SYM", "BAD\nSYM", "BAD\x1fSYM", "BAD\rSYM"])
def test_a_stored_value_the_files_cannot_hold_is_refused_with_a_code(market, tmp_path, symbol):
    """A symbol holding the text file's delimiter, a line break, or the reader's own separator
    (a value stored before the reference data refused it) ends the build with a code,
    through either reader, and leaves nothing half-written."""
    cn = scenario(market)
    with market.begin() as conn:
        conn.execute(sa.update(trade_reports).where(trade_reports.c.control_number == cn["customer"])
                     .values(symbol=symbol))
    for reader in ("auto", "inline"):
        with pytest.raises(HistoricError) as err:
            build_data_set(market, "corporate", 2024, AS_OF_2024, tmp_path / reader / "out", reader=reader)
        assert (err.value.code, err.value.field) == ("TEXT_FIELD_INVALID", "ehts"), err.value.message
        assert list((tmp_path / reader).iterdir()) == []


def test_an_empty_text_value_stays_empty_and_a_mistyped_one_is_refused(market, tmp_path):
    """The reader keeps an empty text as empty (as the driver's rows did), never null; a value
    not of its column's type ends the build with JOURNAL_INCONSISTENT."""
    cn = scenario(market)
    with market.begin() as conn:
        conn.execute(sa.update(trade_reports).where(trade_reports.c.control_number == cn["customer"])
                     .values(symbol=""))
    for reader in ("auto", "inline"):
        out = build_data_set(market, "corporate", 2024, AS_OF_2024, tmp_path / reader, reader=reader).out
        row = next(r for r in parquet(out) if r["control_number"] == cn["customer"])
        assert row["bond_sym_id"] == "" and row["trd_mod_3"] is None  # modifier3: empty is none
    with market.begin() as conn:
        conn.execute(sa.update(trade_reports).where(trade_reports.c.control_number == cn["customer"])
                     .values(settlement_date="next week"))
    for reader in ("auto", "inline"):
        with pytest.raises(HistoricError) as err:
            build_data_set(market, "corporate", 2024, AS_OF_2024, tmp_path / "bad" / reader, reader=reader)
        assert (err.value.code, err.value.field) == ("JOURNAL_INCONSISTENT", "trade_reports"), err.value.message
        assert "(reports of 2024-03-04)" in err.value.message  # its own date, though days are derived together


def test_data_dictionary_is_generated_and_documented(built):
    _, _, out = built
    assert (out / "data_dictionary.json").read_text() == data_dictionary_json()
    docs = Path(__file__).resolve().parents[1] / "docs" / "historic_data_dictionary.json"
    assert docs.read_text() == data_dictionary_json(), "regenerate: python -m bondtape.historic.layout"
    names = [c["name"] for c in json.loads(data_dictionary_json())["columns"]]
    assert names == duckdb.sql(f"SELECT * FROM read_parquet('{out}/parquet/*.parquet')").columns
