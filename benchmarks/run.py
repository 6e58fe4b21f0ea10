#!/usr/bin/env python3
"""Benchmarks: ``python benchmarks/run.py NAME [options]`` prints one JSON object.

Each NAME is a module ``benchmarks/bench_NAME.py`` with ``main(argv) -> dict``. Every
benchmark measures a baseline in the same run and prints a ratio against it: these
machines are noisy, so absolute times mean little.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in available():
        print(__doc__)
        print("available:", ", ".join(available()))
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    name = argv[0]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"bench_{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    result = module.main(argv[1:])
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
