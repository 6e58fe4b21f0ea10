#!/usr/bin/env python3
"""The two set-up commands of bondtape.

    python3 dev.py demo   # builds .venv, installs bondtape, runs the demo on SQLite
    python3 dev.py test   # builds .venv, installs bondtape with its test tools, runs the tests

Anything after the command goes to it: ``python3 dev.py test -k journal``.
Only the standard library is used here, so this runs on a bare Python 3.11+.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".bondtape-installed"


def _python() -> str:
    return str(BIN / "python")


def ensure_environment() -> None:
    """Create the virtual environment and install the project when pyproject.toml changed."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("dev.py: creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing bondtape and its dependencies into .venv", flush=True)
    subprocess.run([_python(), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run(
        [_python(), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]"], check=True
    )
    STAMP.write_text(wanted)


# Debian packages the tests use, each with a file that shows it is installed. The browser
# tests drive Debian's chromium (never a downloaded browser); the FIX tests compile a
# QuickFIX (C++) client as the independent FIX engine.
SYSTEM_PACKAGES = {
    "chromium": "/usr/bin/chromium",
    "libquickfix-dev": "/usr/include/quickfix/Session.h",
    "g++": "/usr/bin/g++",
}


def ensure_system_packages() -> None:
    """Install the missing test packages with apt-get when we are root (CI on a fresh
    machine); otherwise the tests that need them skip, saying why."""
    missing = [name for name, marker in SYSTEM_PACKAGES.items() if not Path(marker).exists()]
    if not missing or os.name == "nt" or os.geteuid() != 0 or not Path("/usr/bin/apt-get").exists():
        return
    print(f"dev.py: installing {', '.join(missing)} (apt-get) for the tests", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "env": env}
    if subprocess.call(["apt-get", "update"], **quiet) == 0:
        subprocess.call(["apt-get", "install", "-y", "--no-install-recommends", *missing], **quiet)
    for name in missing:
        if not Path(SYSTEM_PACKAGES[name]).exists():
            print(f"dev.py: {name} could not be installed; the tests that need it will skip", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "install"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_environment()
    if command == "install":
        return 0
    if command == "demo":
        return subprocess.call([str(BIN / "bondtape"), "demo", *rest])
    ensure_system_packages()
    return subprocess.call([_python(), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
