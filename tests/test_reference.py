import pytest
from click.testing import CliRunner

from bondtape.cli import cli
from bondtape.reference.cusip import cusip_check_digit, cusip_problem, is_valid_cusip
from bondtape.reference.store import import_firms, import_securities, load_firms, load_securities


@pytest.mark.parametrize("cusip", ["037833100", "459200101", "38259P508", "912828U24", "3133EKWV4"])
def test_real_cusips_are_valid(cusip):
    assert is_valid_cusip(cusip)


def test_check_digit_errors():
    assert cusip_check_digit("03783310") == 0
    assert "check digit" in cusip_problem("037833101")
    assert "9 characters" in cusip_problem("03783310")
    assert "8 characters" in cusip_problem("03783310a")


def test_import_securities_rejects_bad_rows_and_loads_good(db, tmp_path):
    f = tmp_path / "s.csv"
    f.write_text(
        "cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a\n"
        "037833100,AAPL4000001,Apple Inc,3.85,2043-05-04,CORP,IG,N\n"
        "037833101,AAPL4000002,Apple Inc,3.85,2043-05-04,CORP,IG,N\n"
        "459200101,IBM4000001,IBM,4,2030-01-01,MUNI,IG,N\n"
        "3133EKWV4,FHLB4000001,FHLB,2.5,2029-01-01,AGCY,IG,maybe\n"
        "38259P508,GOOG4000001,Alphabet,,2031-13-01,CORP,HY,Y\n"
        "912828U24,UST4000001,Treasury,2,2026-11-15,AGCY,IG,N\n"
        "037833100,AAPL4000003,Apple Inc,3.85,2043-05-04,CORP,IG,N\n"
    )
    result = import_securities(db, f)
    assert result.loaded == 2
    lines = dict(result.errors)
    assert "check digit" in lines[3]
    assert "data_set must be CORP or AGCY" in lines[4]
    assert "rule_144a must be Y or N" in lines[5]
    assert "maturity" in lines[6]
    assert "repeats line 2" in lines[8]
    with db.connect() as conn:
        assert set(load_securities(conn)) == {"037833100", "912828U24"}


def test_an_unterminated_quote_refuses_the_file_naming_its_line(db, tmp_path):
    """Before: the quote took in every line after it as one cell; the lines vanished, the
    import reported one bad row and loaded the good ones before it."""
    header = "cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a\n"
    good = "037833100,AAPL4000001,Apple Inc,3.85,2043-05-04,CORP,IG,N\n"
    rest = "".join(f"912828U24,UST40000{i:02d},Treasury,2,2026-11-15,AGCY,IG,N\n" for i in range(50))
    f = tmp_path / "s.csv"
    for bad in ('459200101,IBM4000001,"IBM, Inc,4,2030-01-01,CORP,IG,N\n',  # no closing quote
                '459200101,IBM4000001,"IBM\nInc",4,2030-01-01,CORP,IG,N\n'):  # a cell over two lines
        f.write_text(header + good + bad + rest)
        result = import_securities(db, f)
        assert result.loaded == 0, result
        assert result.errors == [(3, result.errors[0][1])] and "line 3 is not CSV" in result.errors[0][1]
        assert "nothing was loaded" in result.errors[0][1]
    with db.connect() as conn:
        assert "037833100" not in set(load_securities(conn))


def test_import_needs_columns(db, tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("cusip,symbol\n037833100,AAPL\n")
    result = import_securities(db, f)
    assert result.loaded == 0 and "header lacks" in result.errors[0][1]


def test_firms_import_and_cli_list(db_url, tmp_path):
    f = tmp_path / "f.csv"
    f.write_text("mpid,name,finra_member\nDLRA,Dealer A,Y\nC,Customer?,Y\nNMB1,Non member,N\n,Nameless,Y\n")
    runner = CliRunner()
    out = runner.invoke(cli, ["firms", "import", str(f), "--db", db_url])
    assert out.exit_code == 0, out.output
    assert "2 firms loaded, 2 rows rejected" in out.output
    assert "line 3: mpid 'C'" in out.output
    listing = runner.invoke(cli, ["firms", "list", "--format", "csv", "--db", db_url])
    assert listing.output.splitlines() == ["mpid,name,finra_member,test_only", "DLRA,Dealer A,Y,N", "NMB1,Non member,N,N"]


def test_securities_cli(db_url, tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a,eligible_from\n"
                 "037833100,AAPL4000001,Apple Inc,3.85,2043-05-04,CORP,IG,N,2013-05-01\n")
    runner = CliRunner()
    assert runner.invoke(cli, ["securities", "import", str(f), "--db", db_url]).exit_code == 0
    out = runner.invoke(cli, ["securities", "list", "--format", "json", "--db", db_url])
    assert '"eligible_from": "2013-05-01"' in out.output
    bad = tmp_path / "bad.csv"
    bad.write_text("cusip,symbol,issuer,coupon,maturity,data_set,grade,rule_144a\nX,Y,Z,1,2030-01-01,CORP,IG,N\n")
    res = runner.invoke(cli, ["securities", "import", str(bad), "--db", db_url])
    assert res.exit_code == 1 and "line 2" in res.output
