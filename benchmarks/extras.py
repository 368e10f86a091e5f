"""Install the ``bench`` extra's tools on demand, so one command works on a fresh checkout.

The requirement strings come from pyproject.toml (or, on Python 3.10, from the installed project's metadata),
so the versions stay pinned in one place.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
EXTRA = "bench"


def bench_requirements() -> dict[str, str]:
    """Distribution name (lower case) -> requirement string, for every entry of the ``bench`` extra."""
    try:
        import tomllib

        reqs = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"][EXTRA]
    except ModuleNotFoundError:  # Python 3.10: read the installed metadata instead
        marker = re.compile(rf"""extra\s*==\s*["']{EXTRA}["']""")
        reqs = [r.split(";")[0].strip() for r in importlib.metadata.requires("mab-service") or [] if marker.search(r)]
    out = {}
    for req in reqs:
        match = re.match(r"[A-Za-z0-9_.\-]+", req)
        if match:
            out[match.group(0).lower()] = req
    return out


def ensure(names: Iterable[str]) -> None:
    """``pip install`` whichever of ``names`` (distributions of the ``bench`` extra) is not installed.

    Raises:
        KeyError: If a name is not in the ``bench`` extra.
        subprocess.CalledProcessError: If pip fails.
    """
    reqs = bench_requirements()
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(reqs[name.lower()])
    if missing:
        print(f"installing {' '.join(missing)} (the project's {EXTRA} extra)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
