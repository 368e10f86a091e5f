"""uvicorn, whose internals the edge uses, is pinned, and the installed version is the one tested."""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]

#: Libraries whose internals the service uses: each must carry an upper bound in pyproject.toml.
PINNED = ("uvicorn",)


def _requirements() -> dict[str, Requirement]:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is in the standard library from 3.11 on")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


@pytest.mark.parametrize("name", PINNED)
def test_internals_are_used_only_on_the_tested_version(name: str) -> None:
    requirement = _requirements()[name]
    assert any(spec.operator == "<" for spec in requirement.specifier), f"{name} needs an upper bound: {requirement}"
    installed = version(name)
    assert requirement.specifier.contains(installed), (
        f"{name} {installed} is installed, but mab-service is tested with {requirement}: the HTTP edge "
        "subclasses its httptools protocol and uses its internals: run the suite on it, then move the pin"
    )
