"""The embedded CSV source: loading, validation with line numbers, lookups and the prior."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from mab_service.errors import FeatureSourceError
from mab_service.features.local import LocalSource, load_table


def test_loads_and_looks_up(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("entity_id,alpha,beta,extra\nx,2,3,ignored\n\ny, 4.5 ,1e3,\n", encoding="utf-8")
    source = LocalSource(path, prior_alpha=1.0, prior_beta=7.0)
    assert not source.health().ready
    import asyncio

    async def go() -> None:
        await source.start()
        features = await source.fetch(["y", "nobody", "x"])
        np.testing.assert_array_equal(features.alpha, [4.5, 1.0, 2.0])
        np.testing.assert_array_equal(features.beta, [1000.0, 7.0, 3.0])
        assert features.known == 2

    asyncio.run(go())
    assert source.health().ready and source.size == 2


def test_demo_catalogue_loads() -> None:
    import asyncio

    source = LocalSource.demo(1.0, 1.0)
    asyncio.run(source.start())
    assert source.size == 2000 and source.health().ready


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("id,alpha,beta\n", "line 1: the header lacks entity_id"),
        ("entity_id,alpha,beta\na,1\n", "line 2: expected 3 fields, got 2"),
        ("entity_id,alpha,beta\na,x,1\n", "line 2: alpha must be a finite number > 0 (got 'x')"),
        ("entity_id,alpha,beta\na,1,inf\n", "line 2: beta must be a finite number > 0 (got 'inf')"),
        ("entity_id,alpha,beta\n,1,1\n", "line 2: entity_id is empty"),
        ("entity_id,alpha,beta\na,1,1\nb,1,1\na,1,1\n", "line 4: duplicate entity_id 'a' (first on line 2)"),
    ],
)
def test_bad_tables_are_reported_with_line_numbers(text: str, expected: str) -> None:
    with pytest.raises(FeatureSourceError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_table(io.StringIO(text), "t.csv")


def test_every_bad_row_is_reported() -> None:
    text = "entity_id,alpha,beta\n" + "".join(f"e{i},0,1\n" for i in range(30))
    with pytest.raises(FeatureSourceError) as info:
        load_table(io.StringIO(text), "t.csv")
    message = str(info.value)
    assert "30 bad rows" in message and "line 21:" in message and "and 10 more" in message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    import asyncio

    with pytest.raises(FeatureSourceError, match="cannot read feature table"):
        asyncio.run(LocalSource(tmp_path / "missing.csv", 1.0, 1.0).start())
