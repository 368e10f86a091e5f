"""The one catalogue loader: ``read_catalogue`` and ``ArmTable.load_csv`` share a parser, its checks (the id rule
among them) and its messages, and ``features.local`` loads through it."""

from __future__ import annotations

import asyncio
import io
import mmap
from pathlib import Path

import numpy as np
import pytest

from mab_service.errors import FeatureSourceError
from mab_service.features.local import LocalSource, load_table
from mab_service.ids import MAX_ID_BYTES
from mab_service.learning._arms import ArmTable, read_catalogue


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cat.csv"
    path.write_bytes(text.encode("utf-8"))
    return path


def arm_report(path: Path, errors_max: int = 20) -> str:
    buffer = mmap.mmap(-1, ArmTable.bytes_needed(100, 100_000))
    try:
        return f"ok {ArmTable.create(buffer, 100, 100_000).load_csv(path, errors_max)}"
    except ValueError as exc:
        return str(exc)


def local_report(path: Path) -> str:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return f"ok {len(load_table(f, str(path)))}"
    except FeatureSourceError as exc:
        return str(exc)


def test_rows_come_back_in_file_order_with_their_parameters(tmp_path: Path) -> None:
    path = write(tmp_path, 'alpha,entity_id,beta\n2,b,3\n0.5," a ",1e3\n\n7,日本,0.25\n')
    ids, alpha, beta = read_catalogue(path, "cat.csv")
    assert ids == ["b", "a", "日本"]
    np.testing.assert_array_equal(alpha, [2.0, 0.5, 7.0])
    np.testing.assert_array_equal(beta, [3.0, 1000.0, 0.25])
    assert alpha.dtype == beta.dtype == np.float64


def test_quoted_line_breaks_count_lines_but_break_the_id_rule_in_an_id(tmp_path: Path) -> None:
    path = write(tmp_path, 'entity_id,alpha,beta,note\na,1,1,"two\nlines"\n"x\r\ny",1,1,\nb,1,1,\n')
    report = arm_report(path)
    assert report == (
        f"{path}: 1 bad rows:\n  line 5: entity_id must be 1 to 1024 bytes of UTF-8 without control characters "
        "(got a control character U+000D at character 1)"
    )
    path = write(tmp_path, 'entity_id,alpha,beta,note\na,1,1,"two\nlines"\nb,1,1,\nb,1,1,\n')
    assert arm_report(path) == f"{path}: 1 bad rows:\n  line 5: duplicate entity_id 'b' (first on line 4)"


def test_a_binary_file_is_read_and_left_open(tmp_path: Path) -> None:
    f = io.BytesIO(b"entity_id,alpha,beta\nx,1,2\ny,3,4\n")
    f.seek(5)  # read from the start whatever the position
    ids, alpha, _ = read_catalogue(f, "mem")
    assert ids == ["x", "y"] and list(alpha) == [1.0, 3.0] and not f.closed


def test_a_header_alone_is_an_empty_catalogue(tmp_path: Path) -> None:
    ids, alpha, beta = read_catalogue(write(tmp_path, "entity_id,alpha,beta\n"), "cat.csv")
    assert ids == [] and alpha.shape == beta.shape == (0,)
    assert arm_report(write(tmp_path, "entity_id,alpha,beta\n")) == "ok 0"


def test_ids_that_break_the_id_rule_are_bad_lines(tmp_path: Path) -> None:
    long_id = "x" * (MAX_ID_BYTES + 1)
    path = write(tmp_path, f'entity_id,alpha,beta\nok,1,1\n"tab\there",1,1\n{long_id},1,1\n"nul\x00",1,1\n')
    report = arm_report(path)
    assert report == (
        f"{path}: 3 bad rows:\n"
        "  line 3: entity_id must be 1 to 1024 bytes of UTF-8 without control characters "
        "(got a control character U+0009 at character 3)\n"
        "  line 4: entity_id must be 1 to 1024 bytes of UTF-8 without control characters (got 1025 bytes)\n"
        "  line 5: entity_id must be 1 to 1024 bytes of UTF-8 without control characters "
        "(got a control character U+0000 at character 3)"
    )
    assert local_report(path) == report
    with pytest.raises(ValueError, match="line 4: entity_id must be"):
        read_catalogue(path, str(path))
    # Exactly 1024 bytes (of 3-byte characters and one ASCII byte) keeps the rule.
    edge = "日" * 341 + "x"
    assert arm_report(write(tmp_path, f"entity_id,alpha,beta\n{edge},1,1\n")) == "ok 1"


def test_id_rule_lines_merge_in_order_with_the_parsers_problems(tmp_path: Path) -> None:
    lines = ["entity_id,alpha,beta"]
    for i in range(12):
        lines.append(f"bad{i}\x7f,1,1" if i % 2 else f"e{i},0,1")
    path = write(tmp_path, "\n".join(lines) + "\n")
    report = arm_report(path, errors_max=5)
    assert report.startswith(f"{path}: 12 bad rows:\n")
    listed = [row.split(":")[0].strip() for row in report.splitlines()[1:6]]
    assert listed == ["line 2", "line 3", "line 4", "line 5", "line 6"]
    assert "line 3: entity_id must be" in report and "line 2: alpha must be a finite number > 0" in report
    assert report.endswith("\n  ... and 7 more")


def test_an_id_bad_twice_is_reported_once_and_then_as_a_duplicate(tmp_path: Path) -> None:
    path = write(tmp_path, "entity_id,alpha,beta\na\x01,1,1\nb,1,1\na\x01,1,1\n")
    report = arm_report(path)
    assert "2 bad rows" in report and "line 2: entity_id must be" in report
    assert "line 4: duplicate entity_id 'a\\x01' (first on line 2)" in report


def test_local_source_checks_as_the_arm_table_does(tmp_path: Path) -> None:
    # One set of checks: digit separators, which Python's float() takes, are bad in both.
    path = write(tmp_path, "entity_id,alpha,beta\nx,1_000,1\n")
    assert arm_report(path) == local_report(path)
    assert "line 2: alpha must be a finite number > 0 (got '1_000')" in arm_report(path)
    source = LocalSource(path, 1.0, 1.0)
    with pytest.raises(FeatureSourceError, match="1 bad rows"):
        asyncio.run(source.start())


def test_local_source_loads_a_path_through_the_loader(tmp_path: Path) -> None:
    path = write(tmp_path, "entity_id,alpha,beta\nx,2,3\ny,4,5\n")
    source = LocalSource(path, 1.0, 9.0)

    async def go() -> None:
        await source.start()
        features = await source.fetch(["y", "z", "x"])
        np.testing.assert_array_equal(features.alpha, [4.0, 1.0, 2.0])
        np.testing.assert_array_equal(features.beta, [5.0, 9.0, 3.0])
        assert features.known == 2

    asyncio.run(go())
    assert source.size == 2


def test_local_lines_without_line_ends_keep_their_numbers() -> None:
    with pytest.raises(FeatureSourceError, match=r"^t\.csv: 1 bad rows:\n  line 3: entity_id is empty$"):
        load_table(["entity_id,alpha,beta", "a,1,1", ",1,1"], "t.csv")
    assert len(load_table(["entity_id,alpha,beta", "a,1,1", "b,1,1"], "t.csv")) == 2
