"""Historic TRACE Data build: throughput, peak memory, and a plain copy as the baseline.

``python benchmarks/run.py historic [--days N] [--trades-per-day N] [--db PATH] [--repeat N] [--phases] [--floor]``

1. Simulates a market (through the engine) over the end of 2024 and the start of 2025,
   so that 2024 is a large year and 2025 a small one with the same daily volume.
2. In a child process each: builds the 2024 Corporate and Agency data sets (every
   record type, three output formats); builds 2025; and, as the baseline, copies the same
   rows the 2024 builds read (each data set's reports created in the year and reports
   closed in it, every column the build reads, as stored) to Parquet with no
   transformation, through the same reader (``bondtape.historic.source``: day by day, one
   text of delimited lines a statement, parsed by pyarrow; on SQLite in a process of its own).
3. Runs the plain copy and the 2024 build ``--repeat`` times (default 5), alternating, and
   prints the medians: records/s of the build, the ratio copy time / build time (1.0: the
   build costs no more than copying the rows), the build's CPU time a record and the cores
   it kept busy; each pair's figures under ``runs``; and each child's peak RSS (its own
   ``VmHWM``; the highest of the runs), so that memory for the large and the small year can
   be compared.
4. With ``--phases``: each step of the 2024 build timed on its own (reading the texts,
   parsing them, deriving the records, putting each day in file order, the pipe-delimited text, the two Parquet files
   with their SHA-256), in microseconds a record, to show which step bounds the build.
5. With ``--floor``: the least CPU a record that any build of the 2024 sets costs on this
   machine, each part measured alone: SQLite (APSW, as the reader process) visiting every
   column of every row the build reads, and the builder's own functions writing each day's
   two Parquet files and its text file, with their SHA-256, from records already derived.
   ``records_per_s_ceiling`` = cores / that CPU: the most a build could reach here with
   deriving, ordering and hand-overs free and every core busy (and ``..._text_free``: with
   the text file free as well).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_HWM = '''
def _hwm_mb():  # this process's own peak RSS (VmHWM: a fresh count since exec)
    with open("/proc/self/status") as fh:
        return next(round(int(line.split()[1]) / 1024, 1) for line in fh if line.startswith("VmHWM:"))

def _cpu_s():  # CPU seconds of this process and of its children that have ended (the readers)
    import resource
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
'''

_BUILD = _HWM + """
import datetime as dt, json, sys, time
from pathlib import Path
from bondtape.db import connect
from bondtape.historic import build_data_set
db = connect(sys.argv[1])
out, year = Path(sys.argv[2]), int(sys.argv[3])
records = 0
cpu = _cpu_s()
start = time.perf_counter()
for data_set in ("corporate", "agency"):
    as_of = dt.date(year + 2, 7, 1)  # the first day the year is available: "today" for this build
    records += build_data_set(db, data_set, year, as_of, out / data_set, today=as_of).records
print(json.dumps({"seconds": time.perf_counter() - start, "records": records, "peak_rss_mb": _hwm_mb(),
                  "cpu_s": _cpu_s() - cpu}))
"""

_COPY = _HWM + """
import datetime as dt, json, sys, time
import pyarrow as pa, pyarrow.parquet as pq
import sqlalchemy as sa
from bondtape.db import connect
from bondtape.historic.builder import PARQUET_OPTIONS, _midnight_us, _plan, coverage
from bondtape.historic.records import _NoIndex, lines_select, parse, t
from bondtape.historic.source import open_source
db = connect(sys.argv[1])
out, year = sys.argv[2], int(sys.argv[3])
# every column of trade_reports the build reads, as stored
INTS = ["control_number", "seq", "report_us", "first_control_number", "prior_control_number", "quantity_c",
        "price_u", "yield_u", "execution_us", "commission_c", "closed_seq", "closed_us", "successor_control_number"]
TEXT = ["report_date", "first_report_date", "cusip", "symbol", "side", "capacity", "contra_type", "trading_market",
        "execution_date", "settlement_date", "status", "remuneration", "modifier3"]
FLAGS = ["when_issued", "special_price", "weighted_average", "locked_in", "agu", "as_of", "disseminated"]
columns = [t.c[n] for n in INTS + TEXT + FLAGS]
schema = pa.schema([(n, pa.int64()) for n in INTS] + [(n, pa.string()) for n in TEXT] + [(n, pa.int64()) for n in FLAGS])
rows = 0
start = time.perf_counter()
for sub, data_set in (("CORP", "corporate"), ("AGCY", "agency")):
    first, last = coverage(data_set, year)
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    kept = sa.and_(t.c.data_set == sub, t.c.is_test == sa.false(), t.c.rule_144a == sa.false())

    day_, low, high = sa.bindparam("day", type_=sa.String), sa.bindparam("low"), sa.bindparam("high")
    by_index = lines_select(columns).where(kept, t.c.report_date == day_)
    by_stretch = lines_select(columns).where(kept, t.c.control_number.between(low, high), _NoIndex(t.c.report_date) == day_)
    closed = lines_select(columns).where(kept, t.c.closed_us >= sa.bindparam("lo_us"), t.c.closed_us < sa.bindparam("hi_us"))

    def statements(plan):  # the build's rows, read the way the build reads them, one day at a time
        for day in days:
            if day in plan:
                stretch = plan[day]
                yield ((by_index, {"day": day.isoformat()}) if stretch is None else
                       (by_stretch, {"day": day.isoformat(), "low": stretch[0], "high": stretch[1]}))
            yield closed, {"lo_us": _midnight_us(day), "hi_us": _midnight_us(day + dt.timedelta(days=1))}

    # the plainest copy: every column dictionary-encoded where it repeats, nothing compressed
    # (as it always was: the build's per-column compression names the build's columns, not these)
    plain = {**PARQUET_OPTIONS, "use_dictionary": True, "compression": "none", "compression_level": None}
    with open_source(db) as source, pq.ParquetWriter(f"{out}.{sub}.parquet", schema, **plain) as writer:
        for text in source.texts(statements(_plan(source, True, first, last))):
            if text:
                table = parse(text, schema)
                writer.write_table(table)
                rows += table.num_rows
print(json.dumps({"seconds": time.perf_counter() - start, "records": rows, "reader": source.name,
                  "peak_rss_mb": _hwm_mb()}))
"""


_PHASES = """
import datetime as dt, json, sys, tempfile, time
from pathlib import Path
import pyarrow as pa, pyarrow.compute as pc
from bondtape.db import connect
from bondtape.historic import builder as B, layout
from bondtape.historic.records import SOURCE_SCHEMA, SettlementDays, day_table, parse, records
from bondtape.historic.source import open_source
db = connect(sys.argv[1])
year = int(sys.argv[2])
from bondtape.rulebook import default_rulebook
rulebook = default_rulebook()
clock = time.perf_counter
seconds = dict.fromkeys(("read", "parse", "derive", "order", "ehts", "parquet_and_sha"), 0.0)
records_n = 0
for sub, data_set in (("CORP", "corporate"), ("AGCY", "agency")):
    first, last = B.coverage(data_set, year, rulebook)
    end = B._midnight_us(last + dt.timedelta(days=1))
    days = [first + dt.timedelta(days=i) for i in range((last - first).days + 1)]
    t = clock()
    with open_source(db) as source:  # every day's texts in memory: only to time each step on its own
        plan = B._plan(source, True, first, last)
        texts = list(source.texts(B._statements(sub, days, plan, end)))
    seconds["read"] += clock() - t
    kinds = [kind for day in days for kind in ((True, False) if day in plan else (False,))]
    t = clock()
    tables = [(kind, parse(text, SOURCE_SCHEMA)) for kind, text in zip(kinds, texts) if text]
    seconds["parse"] += clock() - t
    t = clock()
    settlement_days = SettlementDays(rulebook.at(last).calendar)
    table = pa.concat_tables([records(tab, kind, sub, settlement_days) for kind, tab in tables])
    seconds["derive"] += clock() - t
    records_n += table.num_rows
    schema = layout.arrow_schema()
    with tempfile.TemporaryDirectory() as out:  # the files written as the build writes them
        for day in pc.unique(table.column("trd_rpt_dt")).to_pylist():
            piece = table.filter(pc.equal(table.column("trd_rpt_dt"), pa.scalar(day, pa.date32())))  # not timed
            t = clock()
            day_records, standing, _ = day_table([piece], schema)
            t1 = clock()
            B._write_file(Path(out) / "day.txt", B.ehts_lines(day_records))
            t2 = clock()
            B._write_parquet(Path(out) / "day.parquet", day_records)
            B._write_parquet(Path(out) / "final.parquet", day_records.filter(standing))
            t3 = clock()
            seconds["order"] += t1 - t
            seconds["ehts"] += t2 - t1
            seconds["parquet_and_sha"] += t3 - t2
print(json.dumps({k: round(v / records_n * 1e6, 2) for k, v in seconds.items()}))
"""


# --- the floor: what any build of these files costs on this machine, with nothing derived ---

_READ_FLOOR = _HWM + """
import json, sys, time
import apsw  # SQLite 3.54, as the build's reader process uses; this child imports nothing of bondtape
path, year = sys.argv[1], int(sys.argv[2])
first, last = f"{year}-01-01", f"{year}-12-31"
COLUMNS = ("control_number seq report_us first_control_number prior_control_number quantity_c price_u yield_u "
           "execution_us commission_c closed_seq closed_us successor_control_number report_date first_report_date "
           "cusip symbol side capacity contra_type trading_market execution_date settlement_date status remuneration "
           "modifier3 when_issued special_price weighted_average locked_in agu as_of disseminated").split()
visit = " + ".join(f"count({c})" for c in COLUMNS)  # SQLite reads each column of each row, and makes nothing of it
con = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
from datetime import datetime
from zoneinfo import ZoneInfo
lo_us, hi_us = (int(datetime(y, 1, 1, tzinfo=ZoneInfo("America/New_York")).timestamp()) * 1_000_000
                for y in (year, year + 1))  # the year's report dates, in market time, as the build bounds them
(low, high), = con.execute("SELECT min(control_number), max(control_number) FROM trade_reports "
                           "WHERE report_date BETWEEN ? AND ?", (first, last))
kept = "data_set IN ('CORP', 'AGCY') AND is_test = 0 AND rule_144a = 0"  # both data sets in one pass: the least
rows = values = 0
cpu = time.process_time()
con.execute("BEGIN")
for sql, args in ((f"SELECT count(*), {visit} FROM trade_reports WHERE {kept} AND control_number BETWEEN ? AND ? "
                   "AND +report_date BETWEEN ? AND ?", (low, high, first, last)),  # created: in table order
                  (f"SELECT count(*), {visit} FROM trade_reports WHERE {kept} AND closed_us >= ? AND closed_us < ?",
                   (lo_us, hi_us))):  # closed: through their index
    (n, v), = con.execute(sql, args)
    rows, values = rows + n, values + v
con.execute("COMMIT")
print(json.dumps({"rows": rows, "values": values, "cpu_s": time.process_time() - cpu}))
"""

_WRITE_FLOOR = _HWM + """
import datetime as dt, hashlib, json, sys, tempfile, time
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq
from bondtape.db import connect
from bondtape.historic import build_data_set, builder as B, layout
db = connect(sys.argv[1])
year = int(sys.argv[2])
seconds = dict.fromkeys(("parquet", "final_parquet", "ehts_text"), 0.0)
records = 0
schema = layout.arrow_schema()

def as_built(path):  # a day's records as the builder holds them before writing (times in seconds)
    table = pq.read_table(path)
    return pa.Table.from_arrays([table.column(f.name).cast(f.type) for f in schema],
                                schema=schema.with_metadata(table.schema.metadata))

with tempfile.TemporaryDirectory() as tmp:
    for data_set in ("corporate", "agency"):
        as_of = dt.date(year + 2, 7, 1)
        built = build_data_set(db, data_set, year, as_of, Path(tmp) / data_set, today=as_of).out  # not timed
        for entry in json.loads((built / "manifest.json").read_text())["files"]:
            if entry["kind"] not in ("parquet", "final"):
                continue
            table = as_built(built / entry["path"])
            day = dt.date.fromisoformat(entry["report_date"])
            out = Path(tmp) / "floor"
            cpu = time.process_time()  # CPU, one thread: the builder's own writing functions, nothing else
            if entry["kind"] == "parquet":
                B._write_parquet(out, table)
                seconds["parquet"] += time.process_time() - cpu
                cpu = time.process_time()
                B._write_text(out, day, table)
                seconds["ehts_text"] += time.process_time() - cpu
                records += table.num_rows
            else:
                B._write_parquet(out, table)
                seconds["final_parquet"] += time.process_time() - cpu
print(json.dumps({"records": records, **{k: v for k, v in seconds.items()}}))
"""


def _floor(url: str, path: Path, year: int, cores: int) -> dict:
    """The least CPU a record any build of this data set costs here: SQLite visiting the
    rows and columns the build reads, and the builder's own writers writing the files it
    writes (the two Parquet files and the text file, with their SHA-256), from records
    already derived and in file order. Deriving, ordering, moving texts between threads and
    processes are left out (free): ``records_per_s_ceiling`` is what the build could reach
    if every core of this machine did nothing else."""
    read = _child(_READ_FLOOR, str(path), str(year))
    write = _child(_WRITE_FLOOR, url, str(year))
    n = write["records"]
    if read["rows"] != n:
        raise RuntimeError(f"the read floor visited {read['rows']} rows, the build wrote {n} records")
    us = {"read_sqlite": read["cpu_s"], "parquet": write["parquet"], "final_parquet": write["final_parquet"],
          "ehts_text": write["ehts_text"]}
    us = {k: round(v / n * 1e6, 2) for k, v in us.items()}
    total = round(sum(us.values()), 2)
    no_text = round(total - us["ehts_text"], 2)
    return {"records": n, "us_per_record": {**us, "total": total},
            "records_per_s_ceiling": round(cores * 1e6 / total),
            "records_per_s_ceiling_text_free": round(cores * 1e6 / no_text)}


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, _usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(err.decode())
    # the child's own VmHWM: wait4's ru_maxrss also counts the RSS this process had when it
    # forked the child (the simulated market), which hides the child's own peak
    return json.loads(out)


def _start(days: int, days_2025: int) -> dt.date:
    from bondtape.rulebook import default_rulebook

    cal = default_rulebook().at(dt.date(2024, 12, 31)).calendar
    day, back = dt.date(2025, 1, 1), days - days_2025
    while back:
        day -= dt.timedelta(days=1)
        if cal.is_business_day(day):
            back -= 1
    return day


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not accepted: a whole number, 1 or more")
    return int(value)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="run.py historic")
    parser.add_argument("--days", type=int, default=30, help="business days simulated (about 1/6 in 2025)")
    parser.add_argument("--trades-per-day", type=int, default=3000)
    parser.add_argument("--db", help="reuse (or create) this SQLite file instead of a temporary one")
    parser.add_argument("--repeat", type=_positive, default=5,
                        help="alternating runs of the plain copy and the 2024 build; their medians are reported "
                             "(default 5)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the least CPU a record any build costs here (SQLite visiting the rows, "
                             "the builder's writers writing the files, nothing derived) and the records/s it "
                             "allows on this machine's cores")
    parser.add_argument("--phases", action="store_true",
                        help="also time each step of the 2024 build on its own, one after the other in one "
                             "process (reading in a process of its own): microseconds a record")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    from bondtape.db import connect
    from bondtape.simulate.market import simulate_market

    with tempfile.TemporaryDirectory(prefix="bench_historic_") as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "bench.db"
        url = f"sqlite:///{path}"
        days_2025 = max(1, args.days // 6)
        t0 = time.perf_counter()
        db = connect(url)
        with db.connect() as conn:  # a new file, or one made empty beforehand (e.g. to set its page size)
            fresh = not conn.exec_driver_sql("SELECT count(*) FROM journal").scalar_one()
        if fresh:
            simulate_market(db, _start(args.days, days_2025), args.days, args.trades_per_day, seed=11)
        simulate_s = time.perf_counter() - t0
        with db.connect() as conn:
            journal_rows = conn.exec_driver_sql("SELECT count(*) FROM journal").scalar_one()
        db.dispose()
        runs = []
        for i in range(args.repeat):  # alternating, so that a slow stretch of the machine hits both
            copy = _child(_COPY, url, str(Path(tmp) / f"copy-{i}.parquet"), "2024")
            big = _child(_BUILD, url, str(Path(tmp) / f"y2024-{i}"), "2024")
            runs.append((copy, big))
            shutil.rmtree(Path(tmp) / f"y2024-{i}")
            for name in Path(tmp).glob(f"copy-{i}.parquet.*"):
                name.unlink()
        copy_s = statistics.median(c["seconds"] for c, _ in runs)
        build_s = statistics.median(b["seconds"] for _, b in runs)
        cpu_s = statistics.median(b["cpu_s"] for _, b in runs)
        records, copy_rows = runs[0][1]["records"], runs[0][0]["records"]
        small = _child(_BUILD, url, str(Path(tmp) / "y2025"), "2025")
        phases = _child(_PHASES, url, "2024") if args.phases else None
        floor = _floor(url, path, 2024, os.cpu_count() or 1) if args.floor else None
        return {
            "benchmark": "historic build (corporate + agency, SQLite)",
            "journal_rows": journal_rows,
            "simulate_seconds": round(simulate_s, 2) if fresh else None,
            "repeat": args.repeat,  # the figures below: medians of the alternating runs
            "records": records,
            "build_seconds": round(build_s, 3),
            "records_per_s": round(records / build_s),
            "plain_copy_rows": copy_rows,
            "plain_copy_seconds": round(copy_s, 3),
            "plain_copy_rows_per_s": round(copy_rows / copy_s),
            "ratio_to_plain_copy": round(copy_s / build_s, 3),
            "peak_rss_mb": max(b["peak_rss_mb"] for _, b in runs),
            # CPU time a record over the build's processes (builder and reader); cores_busy
            # near the machine's core count means the build was CPU-bound
            "cpu_us_per_record": round(cpu_s / records * 1e6, 2),
            "cores_busy": round(cpu_s / build_s, 2), "cores": os.cpu_count(),
            "plain_copy_peak_rss_mb": max(c["peak_rss_mb"] for c, _ in runs),
            "reader": runs[0][0]["reader"],
            "runs": [{"records_per_s": round(b["records"] / b["seconds"]),
                      "plain_copy_rows_per_s": round(c["records"] / c["seconds"]),
                      "ratio_to_plain_copy": round(c["seconds"] / b["seconds"], 3),
                      "cpu_us_per_record": round(b["cpu_s"] / b["records"] * 1e6, 2)} for c, b in runs],
            "phases_us_per_record": phases,
            "floor": floor,
            "small_year": {"records": small["records"], "peak_rss_mb": small["peak_rss_mb"],
                           "records_per_s": round(small["records"] / small["seconds"])},
            "goal": {"records_per_s": 1_000_000, "ratio_to_plain_copy": 0.5,
                     "peak_rss": "not growing with the year's size (compare small_year)"},
        }
