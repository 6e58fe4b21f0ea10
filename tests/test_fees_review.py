"""Fees as its users meet it: a member firm's billing contact checking an invoice against
Rule 7730, and the finance operator running, re-running and correcting a month."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from bondtape.cli import cli
from bondtape.fees import build_invoices, record_historic_order
from bondtape.fees.schedule import FeeError
from tests.test_fees_invoice import NOW, add_org, add_user, by_org, lines

D = Decimal


def test_a_data_set_year_is_billed_once_even_if_recorded_again_with_an_earlier_date(market):
    """The operator records CORP 2007 dated May, then (the date was wrong) again dated April:
    before, the second order was accepted (the duplicate check looked only at orders on or
    before the new order's date) and the vendor paid $2,000 twice, in April and in May."""
    with market.begin() as conn:
        vendor = add_org(conn, "Vendor V", "VENDOR")
        taxex = add_org(conn, "Endowment T", "TAX_EXEMPT")
    for org in (vendor, taxex):
        record_historic_order(market, org, "SETUP", order_date="2010-04-01", now_us=NOW)
        record_historic_order(market, org, "DATA", order_date="2010-05-03", data_set="CORP", year=2007, now_us=NOW)
        with pytest.raises(FeeError) as err:
            record_historic_order(market, org, "DATA", order_date="2010-04-02", data_set="CORP", year=2007, now_us=NOW)
        assert err.value.code == "DATA_ALREADY_PURCHASED" and err.value.field == "year"
        # a re-distribution still needs the data bought on or before its own date
        with pytest.raises(FeeError) as err:
            record_historic_order(market, org, "REDISTRIBUTION", order_date="2010-04-20", data_set="CORP", year=2007,
                                  recipient="Client X", cusips=10, now_us=NOW)
        assert err.value.code == "DATA_REQUIRED"
    data_lines = [(inv.organisation.name, month, x.code, x.amount)
                  for month in ("2010-04", "2010-05") for inv in build_invoices(market, month)[0]
                  for x in inv.lines if x.code.startswith("HIS_DATA")]
    assert data_lines == [("Vendor V", "2010-05", "HIS_DATA", D("2000.00")),
                          ("Endowment T", "2010-05", "HIS_DATA_TAX_EXEMPT", D("500.00"))]


def test_a_month_with_an_organisation_id_of_seven_digits_can_be_run_again(market, db_url, tmp_path):
    """Invoice numbers are YYYY-MM-<id, at least 6 digits>: organisation 1234567 (every
    Non-Professional is an organisation) makes 2010-04-1234567.json. Before, a re-run of the
    month into its folder was refused with OUT_NOT_EMPTY: the file was not recognised as part
    of the earlier run."""
    with market.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO organisations (id, name, kind, created_us) VALUES (1234567, 'Pat Investor', "
            "'PROFESSIONAL', 0)"))
        add_user(conn, 1234567, "pat", "LEVEL_I", activated=NOW)
    out = tmp_path / "april"
    runner = CliRunner()
    for _ in range(2):
        r = runner.invoke(cli, ["fees", "invoice", "--month", "2010-04", "--out", str(out), "--db", db_url])
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == [
        "2010-04-1234567.csv", "2010-04-1234567.html", "2010-04-1234567.json", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["invoices"][0]["total"] == "20.00"
    # another month's seven-digit invoice is still refused
    (out / "2010-03-1234567.json").write_text("{}")
    r = runner.invoke(cli, ["fees", "invoice", "--month", "2010-04", "--out", str(out), "--db", db_url])
    assert r.exit_code == 2 and "OUT_NOT_EMPTY" in r.output


def test_a_user_id_deactivated_at_the_first_instant_of_the_month_is_not_billed_for_it(market):
    """A user ID is in service from its activation up to (not including) its deactivation.
    One switched off at 00:00:00 on April 1 (market time), the end of the March 31 business
    day, served no day of April; before, April billed it a full $20 (and March did too)."""
    from tests.conftest import et

    with market.begin() as conn:
        org = add_org(conn, "Dealer A", "FIRM", "DLRA")
        add_user(conn, org, "olga", "LEVEL_I", activated=et(2010, 1, 4, 9, 0), deactivated=et(2010, 4, 1, 0, 0))
        add_user(conn, org, "omar", "LEVEL_I", activated=et(2010, 1, 4, 9, 0), deactivated=et(2010, 4, 1, 0, 0, 1))
        add_user(conn, org, "otto", "LEVEL_I", activated=et(2010, 5, 1, 0, 0))  # from May 1: not April
    [april] = build_invoices(market, "2010-04")[0]
    assert [(x.code, x.quantity, [u.split(":")[1] for u in x.sources["users"]]) for x in april.lines] == [
        ("SYS_LEVEL_I", 1, ["omar"])]
    [march] = build_invoices(market, "2010-03")[0]
    assert lines(march)[("SYS_LEVEL_I", None)].quantity == 2  # olga and omar, both in service in March


def test_the_operator_voids_a_mistaken_record_and_reruns_the_month(market, db_url, tmp_path):
    """A record keyed wrong (the wrong organisation, product, start, terminals, CUSIPs) bills
    until it is voided. Before there was no way to: ``unsubscribe`` cannot end a subscription
    before its first day (so a mistaken one billed at least a month) and Historic orders
    could not be corrected at all. ``bondtape fees void`` keeps the record, with when and
    why, and leaves it out of every invoice; the corrected record is recorded anew."""
    with market.begin() as conn:
        vendor = add_org(conn, "Vendor V", "VENDOR")
    runner = CliRunner()

    def fees(*args):
        r = runner.invoke(cli, ["fees", *args, "--db", db_url])
        return r.exit_code, r.output

    assert fees("subscribe", "--org", "Vendor V", "--product", "BTDS_UNLIMITED", "--data-set", "CORP",
                "--start", "2010-04-01") == (0, "subscription 1 recorded\n")
    assert fees("historic-order", "--org", "Vendor V", "--product", "SETUP", "--date", "2010-04-01")[0] == 0  # order 1
    assert fees("historic-order", "--org", "Vendor V", "--product", "DATA", "--data-set", "CORP", "--year", "2007",
                "--date", "2010-04-01")[0] == 0  # order 2
    assert fees("historic-order", "--org", "Vendor V", "--product", "REDISTRIBUTION", "--data-set", "CORP",
                "--year", "2007", "--recipient", "Client X", "--cusips", "9000", "--date", "2010-04-02")[0] == 0  # 3
    out = tmp_path / "april"
    assert fees("invoice", "--month", "2010-04", "--out", str(out))[0] == 0
    assert json.loads((out / "summary.json").read_text())["total"] == "12500.00"  # 7,500 + 2,000 + 2,000 + 1,000

    # the terminals were keyed as unlimited use, the 900 CUSIPs as 9000
    code, text = fees("unsubscribe", "--subscription", "1", "--end", "2010-03-31")
    assert code == 2 and "END_BEFORE_START" in text  # ending it cannot undo it
    assert fees("void", "--subscription", "1", "--reason", "keyed as unlimited use; 4 terminals") == (
        0, "subscription 1 voided\n")
    assert fees("void", "--order", "3", "--reason", "900 CUSIPs, not 9000") == (0, "historic order 3 voided\n")
    assert fees("subscribe", "--org", "Vendor V", "--product", "BTDS_TERMINAL", "--data-set", "CORP",
                "--quantity", "4", "--start", "2010-04-01")[0] == 0
    assert fees("historic-order", "--org", "Vendor V", "--product", "REDISTRIBUTION", "--data-set", "CORP",
                "--year", "2007", "--recipient", "Client X", "--cusips", "900", "--date", "2010-04-02")[0] == 0
    assert fees("invoice", "--month", "2010-04", "--out", str(out))[0] == 0
    doc = json.loads((out / ("2010-04-%06d.json" % vendor)).read_text())
    assert [(x["code"], x["amount"], x["sources"]) for x in doc["lines"]] == [
        ("MD_BTDS_TERMINAL", "240.00", {"subscriptions": ["2"]}),
        ("HIS_SETUP", "2000.00", {"historic_orders": ["1"]}),
        ("HIS_DATA", "2000.00", {"historic_orders": ["2"]}),
        ("HIS_REDISTRIBUTION", "900.00", {"historic_orders": ["4"]}),
    ]
    assert doc["total"] == "5140.00"
    # a voided re-distribution does not count towards the recipient's cap in later months
    record_historic_order(market, vendor, "REDISTRIBUTION", order_date="2010-05-03", data_set="CORP", year=2007,
                          recipient="Client X", cusips=100, now_us=NOW)
    [may] = build_invoices(market, "2010-05")[0]
    assert [(x.code, x.amount) for x in may.lines] == [("MD_BTDS_TERMINAL", D("240.00")),
                                                       ("HIS_REDISTRIBUTION", D("100.00"))]
    # the records keep the voided ones, with when and why
    recs = json.loads(fees("records", "--org", "Vendor V")[1])
    assert recs["subscriptions"][0]["void_reason"] == "keyed as unlimited use; 4 terminals"
    assert recs["subscriptions"][0]["voided_us"] > 0 and recs["subscriptions"][1]["voided_us"] is None
    assert recs["historic_orders"][2]["void_reason"] == "900 CUSIPs, not 9000"

    # refused, with a code, the field and what is accepted; nothing changed
    for args, code, field in [
        (["--subscription", "1", "--reason", "again"], "ALREADY_VOIDED", "subscription"),
        (["--order", "3", "--reason", "again"], "ALREADY_VOIDED", "order"),
        (["--subscription", "99", "--reason", "x"], "SUBSCRIPTION_UNKNOWN", "subscription"),
        (["--order", "99", "--reason", "x"], "ORDER_UNKNOWN", "order"),
        (["--order", "2", "--reason", " "], "REASON_REQUIRED", "reason"),
        (["--order", "2"], "REASON_REQUIRED", "reason"),
        (["--reason", "x"], "RECORD_REQUIRED", "record"),
        (["--order", "2", "--subscription", "2", "--reason", "x"], "RECORD_REQUIRED", "record"),
        (["--order", "2", "--reason", "x"], "ORDER_IN_USE", "order"),  # order 4 re-distributes it
        (["--order", "1", "--reason", "x"], "ORDER_IN_USE", "order"),  # order 2 needs the set-up
    ]:
        got, text = fees("void", *args)
        assert got == 2 and f"error {code} ({field}):" in text and "Traceback" not in text, (args, text)
    code, text = fees("unsubscribe", "--subscription", "1", "--end", "2010-06-30")
    assert code == 2 and "ALREADY_VOIDED (subscription)" in text
    assert json.loads(fees("records", "--org", "Vendor V")[1]) == recs

    # once nothing depends on them, the data and the set-up can be voided, and ordered again
    for order in ("5", "4", "2", "1"):
        assert fees("void", "--order", order, "--reason", "wrong organisation")[0] == 0
    assert fees("historic-order", "--org", "Vendor V", "--product", "SETUP", "--date", "2010-04-01")[0] == 0
    assert fees("historic-order", "--org", "Vendor V", "--product", "DATA", "--data-set", "CORP", "--year", "2007",
                "--date", "2010-04-01")[0] == 0
    [april] = build_invoices(market, "2010-04")[0]
    assert [(x.code, x.sources) for x in april.lines if x.code.startswith("HIS_")] == [
        ("HIS_SETUP", {"historic_orders": ["6"]}), ("HIS_DATA", {"historic_orders": ["7"]})]


def test_an_order_dated_before_the_fee_schedule_names_the_order_date(market, db_url):
    """Historic TRACE Data and its fees begin 2010-03-31. An order dated before was refused
    as ``NO_SCHEDULE (month)``, naming a --month the command does not have."""
    with market.begin() as conn:
        add_org(conn, "Vendor V", "VENDOR")
    r = CliRunner().invoke(cli, ["fees", "historic-order", "--org", "Vendor V", "--product", "SETUP",
                                 "--date", "2010-03-30", "--db", db_url])
    assert r.exit_code == 2 and r.output.startswith("error NO_SCHEDULE (order_date): ") and "2010-03-31" in r.output


def test_reports_of_an_mpid_go_to_the_organisation_holding_it_that_month(market):
    """Access allows one open organisation per MPID: a firm that left (closed) and the firm
    that took its MPID later. Before, every later month's reports of that MPID were unbilled
    as MPID_AMBIGUOUS; they are billed to the organisation open in the month. A month in
    which both were open (the hand-over) is still listed as ambiguous, for the operator."""
    from bondtape.engine import Engine
    from tests.conftest import et
    from tests.helpers import new

    with market.begin() as conn:
        old = add_org(conn, "Dealer A", "FIRM", "DLRA")
        conn.execute(sa.text("UPDATE organisations SET closed_us = :c WHERE id = :i"),
                     {"c": et(2010, 4, 15, 17, 0), "i": old})
        new_org = conn.execute(sa.text(
            "INSERT INTO organisations (name, kind, mpid, created_us) VALUES ('Dealer A Successor', 'FIRM', 'DLRA', :c) "
            "RETURNING id"), {"c": et(2010, 4, 20, 9, 0)}).scalar_one()
    engine = Engine(market)
    for ref, day in (("apr", 21), ("may", None)):
        when = et(2010, 4, day, 10, 0) if day else et(2010, 5, 4, 10, 0)
        assert engine.submit([new(ref=ref, quantity=D("100000"), execution_us=when, report_us=when + 60_000_000)])[0].accepted
    invoices, unbilled, _ = build_invoices(market, "2010-05")
    assert unbilled == [] and [(i.organisation.name, i.total) for i in invoices] == [("Dealer A Successor", D("0.48"))]
    assert by_org(invoices)["Dealer A Successor"].organisation.id == new_org
    invoices, unbilled, _ = build_invoices(market, "2010-04")  # both held DLRA in April
    assert invoices == [] and [(u.mpid, u.reason, u.reports) for u in unbilled] == [("DLRA", "MPID_AMBIGUOUS", 1)]


@pytest.mark.parametrize("args, code, field", [
    (["subscribe", "--org", "DLRA", "--product", "LUNCH", "--start", "2010-04-01"], "PRODUCT_INVALID", "product"),
    (["subscribe", "--org", "DLRA", "--product", "BTDS_TERMINAL", "--data-set", "CORP", "--quantity", "0",
      "--start", "2010-04-01"], "QUANTITY_INVALID", "quantity"),
    (["subscribe", "--org", "DLRA", "--product", "BTDS_TERMINAL", "--data-set", "CORP", "--quantity", "many",
      "--start", "2010-04-01"], "QUANTITY_INVALID", "quantity"),
    (["unsubscribe", "--subscription", "0", "--end", "2010-04-30"], "SUBSCRIPTION_UNKNOWN", "subscription"),
    (["unsubscribe", "--subscription", "one", "--end", "2010-04-30"], "SUBSCRIPTION_UNKNOWN", "subscription"),
    (["historic-order", "--org", "DLRA", "--product", "LUNCH", "--date", "2010-04-01"], "PRODUCT_INVALID", "product"),
    (["historic-order", "--org", "DLRA", "--product", "DATA", "--data-set", "CORP", "--year", "1800",
      "--date", "2010-04-01"], "YEAR_INVALID", "year"),
    (["historic-order", "--org", "DLRA", "--product", "REDISTRIBUTION", "--data-set", "CORP", "--year", "2007",
      "--recipient", "X", "--cusips", "-1", "--date", "2010-04-01"], "CUSIPS_INVALID", "cusips"),
    (["web-access", "--user", "alice", "--level", "LEVEL_III"], "WEB_ACCESS_INVALID", "level"),
])
def test_cli_bad_input_is_a_stable_code_not_a_usage_error(market, db_url, args, code, field):
    """Before, click refused these itself ("Usage: ... Error: Invalid value for '--product'"),
    without the documented code (PRODUCT_INVALID, QUANTITY_INVALID, WEB_ACCESS_INVALID...)."""
    with market.begin() as conn:
        org = add_org(conn, "Dealer A", "FIRM", "DLRA")
        add_user(conn, org, "alice", "NONE", activated=NOW)
    record_historic_order(market, org, "SETUP", order_date="2010-04-01", now_us=NOW)
    record_historic_order(market, org, "DATA", order_date="2010-04-01", data_set="CORP", year=2007, now_us=NOW)
    r = CliRunner().invoke(cli, ["fees", *args, "--db", db_url])
    assert r.exit_code == 2 and r.output.startswith(f"error {code} ({field}): "), r.output
    assert "Usage:" not in r.output and "Traceback" not in r.output


def test_cli_out_that_is_a_file_is_out_not_empty(market, db_url, tmp_path):
    (tmp_path / "april").write_text("not a folder")
    r = CliRunner().invoke(cli, ["fees", "invoice", "--month", "2010-04", "--out", str(tmp_path / "april"),
                                 "--db", db_url])
    assert r.exit_code == 2 and r.output.startswith("error OUT_NOT_EMPTY (out): "), r.output
