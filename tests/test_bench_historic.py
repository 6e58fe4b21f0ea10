"""benchmarks/bench_historic.py end to end on a small market: the figures it prints hold
together, and its floor measures the same rows the build writes (it refuses otherwise)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bondtape_historic_bench", ROOT / "benchmarks" / "bench_historic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_benchmark_prints_build_copy_and_floor(tmp_path):
    result = _bench().main(["--days", "4", "--trades-per-day", "150", "--repeat", "1", "--floor",
                            "--db", str(tmp_path / "bench.db")])
    assert result["records"] > 0 and result["records"] == result["plain_copy_rows"]
    assert result["records_per_s"] > 0 and result["ratio_to_plain_copy"] > 0
    floor = result["floor"]
    assert floor["records"] == result["records"]  # the floor wrote what the build wrote
    parts = floor["us_per_record"]
    assert set(parts) == {"read_sqlite", "parquet", "final_parquet", "ehts_text", "total"}
    assert all(v > 0 for v in parts.values())
    assert abs(parts["total"] - sum(v for k, v in parts.items() if k != "total")) < 0.05
    assert floor["records_per_s_ceiling"] < floor["records_per_s_ceiling_text_free"]
    assert result["small_year"]["records"] > 0
