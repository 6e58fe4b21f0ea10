"""The record layout of Historic TRACE Data: one list of columns for every output.

Each column has its WRDS ``trace_enhanced`` name (the Parquet column), its FINRA Enhanced
Time and Sales header (the text-file column, or None when the text layout has no such
column), its Arrow type and its meaning. The text files, the Parquet files, the final-state
view and the data dictionary are all generated from :data:`COLUMNS`, so they cannot drift.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

LAYOUT = "ehts-2012"
RECORD_FORMAT = "bondtape-ehts-2012/1"  # changes whenever a column, type or code changes

QUANTITY = pa.decimal128(18, 2)
PRICE = pa.decimal128(18, 6)
MONEY = pa.decimal128(18, 2)
TIME = pa.time32("s")  # whole seconds, as the text files show them (HHMMSS)
# Parquet has no unit of seconds: a time is stored in milliseconds (still whole seconds),
# and that is the type every reader gets back; the Parquet files declare it.
PARQUET_TIME = pa.time32("ms")


@dataclass(frozen=True)
class Column:
    name: str  # WRDS trace_enhanced name (Parquet)
    finra: str | None  # FINRA post-2012 header name (text file), in order
    type: pa.DataType
    meaning: str
    codes: dict[str, str] | None = None
    source: str = "FINRA post-2012 Enhanced Time and Sales"


_FLAG = {"Y": "yes", "(null / blank)": "no"}

COLUMNS: tuple[Column, ...] = (
    Column("rec_ct_nb", "Record Count Num", pa.int64(), "Row number within the daily file, from 1."),
    Column("msg_seq_nb", "Reference Number", pa.string(),
           "Last 7 digits of the control number, zero-padded. X and C rows repeat the number of the "
           "report they remove; T, R and Y rows carry their own."),
    Column("trc_st", "Trade Status", pa.string(), "Status of the record.",
           {"T": "trade report", "X": "cancel of the report with the same msg_seq_nb",
            "C": "cancelled correction: the corrected report's old terms, same msg_seq_nb",
            "R": "a correction's new terms (a new report)",
            "Y": "reversal (a withdrawal after the cancel/correct window); orig_msg_seq_nb names the report"}),
    Column("bond_sym_id", "TRACE Symbol", pa.string(), "TRACE symbol of the security (up to 14 characters)."),
    Column("cusip_id", "CUSIP", pa.string(), "CUSIP (9 characters)."),
    Column("bloomberg_identifier", "Bloomberg Identifier", pa.string(),
           "Bloomberg identifier; blank: bondtape reference data holds no FIGI."),
    Column("sub_prdct", "Sub Product", pa.string(), "Data set of the security.",
           {"CORP": "corporate bond", "AGCY": "agency debt security"}),
    Column("wis_fl", "When Issued Indicator", pa.string(), "When-issued trade.", {"Y": "when issued", "N": "not"}),
    Column("cmsn_trd", "Remuneration", pa.string(),
           "Remuneration as reported (from 2016-07-18); for trades executed before 2016-07-18 and "
           "reported without it, the commission indicator of the seed (Y a commission was reported, N none).",
           {"C": "commission", "M": "mark-up/mark-down", "N": "none", "Y": "commission (before 2016-07-18)"}),
    Column("entrd_vol_qt", "Quantity", QUANTITY, "Par value as reported, never capped (2 decimals)."),
    Column("rptd_pr", "Price", PRICE, "Price in percent of par (6 decimals)."),
    Column("yld_sign_cd", "Yield Direction", pa.string(), "Sign of the yield.", {"-": "negative", "(blank)": "positive or no yield"}),
    Column("yld_pt", "Yield", PRICE, "Absolute value of the reported yield, percent (6 decimals); blank if none."),
    Column("asof_cd", "As Of Indicator", pa.string(), "As-of and reversal indicator.",
           {"A": "as-of: reported on a later date than executed", "R": "reversal (Y rows)"}),
    Column("trd_exctn_dt", "Execution Date", pa.date32(), "Execution date, America/New_York (text: YYYYMMDD)."),
    Column("trd_exctn_tm", "Execution Time", TIME, "Execution time, America/New_York (text: HHMMSS)."),
    Column("trd_rpt_dt", "Trade Report Date", pa.date32(),
           "Date the record's event was reported (the report, cancel, correction or reversal); names the file."),
    Column("trd_rpt_tm", "Trade Report Time", TIME, "Time the record's event was reported, America/New_York."),
    Column("stlmnt_dt", "Settlement Date", pa.date32(), "Settlement date."),
    Column("trd_mod_3", "Trade Modifier 3", pa.string(), "Timeliness modifier.",
           {"Z": "reported late", "T": "executed outside system hours, reported on time",
            "U": "executed outside system hours, reported late"}),
    Column("trd_mod_4", "Trade Modifier 4", pa.string(), "Special condition.", {"W": "weighted average price"}),
    Column("rpt_side_cd", "Buy/Sell Indicator", pa.string(), "Side of the reporting party.", {"B": "buy", "S": "sell"}),
    Column("buy_cmsn_rt", "Buyer Commission", MONEY, "Commission reported on the buy side, dollars; 0.00 if none."),
    Column("buy_cpcty_cd", "Buyer Capacity", pa.string(), "Capacity of the reporting party when it buys.",
           {"P": "principal", "A": "agency"}),
    Column("sell_cmsn_rt", "Seller Commission", MONEY, "Commission reported on the sell side, dollars; 0.00 if none."),
    Column("sell_cpcty_cd", "Seller Capacity", pa.string(), "Capacity of the reporting party when it sells.",
           {"P": "principal", "A": "agency"}),
    Column("rptg_party_type", "Reporting Party Type", pa.string(), "Type of the reporting party.", {"D": "dealer (FINRA member)"}),
    Column("cntra_mp_id", "Contra Party Indicator", pa.string(),
           "Type of the contra party, never its identity.",
           {"D": "dealer (FINRA member)", "C": "customer, including non-members and non-member affiliates"}),
    Column("lckd_in_ind", "Locked In Indicator", pa.string(), "Locked-in trade.", {"Y": "locked in"}),
    Column("ats_indicator", "ATS Indicator", pa.string(), "ATS trade; bondtape records none (blank)."),
    Column("spcl_trd_fl", "Special Price Indicator", pa.string(), "Special price.", {"Y": "special price"}),
    Column("trdg_mkt_cd", "Trading Market Indicator", pa.string(), "Market.",
           {"S1": "secondary market", "P1": "primary market (list or fixed offering price, takedown)"}),
    Column("dissem_fl", "Dissemination Flag", pa.string(),
           "Whether the report was disseminated at the time (X, C and Y rows: the report acted on).",
           {"Y": "disseminated", "N": "not disseminated (inter-dealer buy side, P1, merger transfer, ...)"}),
    Column("pr_trd_dt", "Prior Trade Report Date", pa.date32(),
           "X, C, R, Y rows: report date of the report acted on; blank on T rows."),
    Column("orig_msg_seq_nb", "Prior Reference Number", pa.string(),
           "X, C, R, Y rows: reference number of the report acted on (FINRA column 35); blank on T rows."),
    Column("first_trade_ctrl_date", "First Trade Control Date", pa.date32(), "Report date of the first report of the chain."),
    Column("first_trade_ctrl_num", "First Trade Control Number", pa.string(), "Reference number of the first report of the chain."),
    # Parquet only: the pre-2012 trace_enhanced columns WRDS code may use, derived.
    Column("days_to_sttl_ct", None, pa.int32(), "Business days from execution to settlement.", source="WRDS trace_enhanced (derived)"),
    Column("sale_cndtn_cd", None, pa.string(), "Pre-2012 sale condition derived from the modifiers (assumed mapping).",
           {"@": "regular", "W": "weighted average", "Z": "late", "A": "outside hours"}, source="WRDS trace_enhanced (derived)"),
    Column("sale_cndtn2_cd", None, pa.string(), "Second pre-2012 sale condition (A or Z) when two apply.",
           {"A": "outside hours", "Z": "late"}, source="WRDS trace_enhanced (derived)"),
    Column("agu_qsr_id", None, pa.string(), "Automatic give-up.", {"A": "AGU trade"}, source="WRDS trace_enhanced"),
    # bondtape links: explicit, so no key matching is needed.
    Column("control_number", None, pa.int64(),
           "bondtape: full 10-digit control number of the row's report (X, C: the report removed).", source="bondtape"),
    Column("prior_control_number", None, pa.int64(),
           "bondtape: full control number of the report acted on (X, C, R, Y); null on T rows.", source="bondtape"),
    Column("first_control_number", None, pa.int64(),
           "bondtape: full control number of the chain's first report: a trade id that survives corrections.",
           source="bondtape"),
    Column("record_format", None, pa.string(), f"bondtape: record format version ({RECORD_FORMAT}).", source="bondtape"),
)

FINRA_COLUMNS: tuple[Column, ...] = tuple(c for c in COLUMNS if c.finra is not None)
HEADER = "|".join(c.finra for c in FINRA_COLUMNS)  # type: ignore[misc]


def arrow_schema(**metadata: str) -> pa.Schema:
    meta = {"bondtape.record_format": RECORD_FORMAT, "bondtape.layout": LAYOUT, **metadata}
    return pa.schema([pa.field(c.name, c.type) for c in COLUMNS], metadata=meta)


def parquet_type(column: Column) -> pa.DataType:
    """The column's type in the Parquet files (what pandas, Polars and DuckDB read)."""
    return PARQUET_TIME if column.type == TIME else column.type


def parquet_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` (:func:`arrow_schema`) as the Parquet files declare it."""
    return pa.schema([pa.field(c.name, parquet_type(c)) for c in COLUMNS], metadata=schema.metadata)


def data_dictionary() -> dict:
    """The machine-readable data dictionary (also written as data_dictionary.json)."""
    return {
        "record_format": RECORD_FORMAT,
        "layout": LAYOUT,
        "text_file": {
            "name": "enhanced-time-and-sales-cusip-YYYY-MM-DD.txt (one per trade report date)",
            "delimiter": "|",
            "header": HEADER,
            "trailer": "YYYYMMDD235959 of the file's date, then the record count, 10 digits zero-filled",
            "formats": {"date": "YYYYMMDD", "time": "HHMMSS", "quantity": "2 decimals", "price": "6 decimals",
                        "yield": "6 decimals", "commission": "2 decimals", "blank": "empty field"},
        },
        "parquet": {"names": "WRDS trace_enhanced", "blank": "null", "numbers": "exact decimals",
                    "times": "time32[ms], whole seconds"},
        "columns": [
            {"position": (FINRA_COLUMNS.index(c) + 1) if c.finra else None, "name": c.name, "finra_header": c.finra,
             "type": str(parquet_type(c)), "meaning": c.meaning, "codes": c.codes, "source": c.source}
            for c in COLUMNS
        ],
    }


def data_dictionary_json() -> str:
    return json.dumps(data_dictionary(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":  # python -m bondtape.historic.layout > docs/historic_data_dictionary.json
    import sys

    sys.stdout.write(data_dictionary_json())
