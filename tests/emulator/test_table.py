from __future__ import annotations

import pytest

from mab_service.emulator import TableError, load_table, parse_table


def test_integer_columns_are_int64_and_others_double() -> None:
    table = parse_table(["entity_id,alpha,beta,clicks", "a,1.5,2,3", "b,2,4,-1", ""], "t.csv")
    assert table.features == ("alpha", "beta", "clicks")
    assert table.is_int == (False, True, True)
    assert table.rows == {"a": (1.5, 2, 3), "b": (2.0, 4, -1)}


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["alpha,beta", "1,2"], "line 1: the header must name entity_id"),
        (["entity_id,alpha", "a"], "line 2: expected 2 fields, got 1"),
        (["entity_id,alpha", ",1"], "line 2: entity_id is empty"),
        (["entity_id,alpha", "a,1", "a,2"], "line 3: duplicate entity_id 'a'"),
        (["entity_id,alpha", "a,x"], "entity 'a': alpha is not a number"),
        (["entity_id,alpha", "a,nan"], "entity 'a': alpha is not finite"),
    ],
)
def test_bad_tables_name_the_line(lines: list[str], message: str) -> None:
    with pytest.raises(TableError, match=message):
        parse_table(lines, "t.csv")


def test_the_demo_catalogue_is_the_default() -> None:
    table = load_table(None)
    assert len(table.rows) == 2000 and table.features[:2] == ("alpha", "beta")


def test_a_table_may_hold_values_that_are_no_parameters_when_asked(tmp_path) -> None:
    lines = ["entity_id,alpha,beta", "a,nan,1", "b,inf,-inf", "c,0,-2"]
    table = parse_table(lines, "t.csv", allow_non_finite=True)
    assert str(table.rows["a"][0]) == "nan" and table.rows["b"] == (float("inf"), float("-inf"))
    assert table.rows["c"] == (0.0, -2.0)  # 0 and negative values load either way
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(TableError, match="entity 'a': alpha is not finite"):
        load_table(path)
    assert load_table(path, allow_non_finite=True).rows["b"][1] == float("-inf")
