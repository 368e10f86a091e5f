"""The emulator's feature table: a CSV ``entity_id,<feature>,...`` loaded into memory, values typed as in Vertex.

Every column but ``entity_id`` is a feature named after its header. A column whose every value is an integer
literal is an INT64 feature, any other a DOUBLE feature, so one file can serve both the ``alpha``/``beta``
mapping (DOUBLE or INT64) and the ``clicks``/``impressions`` counts (INT64).

A real store holds whatever was written to it, valid Beta parameters or not. Zero and negative values always load;
``nan``, ``inf`` and ``-inf`` load only with ``allow_non_finite`` (``--allow-non-finite``), so that a typo in a table
meant to be valid is still caught, while a table meant to hold bad values can.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

ID_COLUMN = "entity_id"


class TableError(ValueError):
    """The CSV cannot be served; the message names the file and line."""


@dataclass(frozen=True)
class FeatureTable:
    """Feature names, their types, and each entity's values in column order."""

    features: tuple[str, ...]
    is_int: tuple[bool, ...]
    rows: dict[str, tuple[float | int, ...]]

    def column(self, name: str) -> int:
        return self.features.index(name)


def load_table(path: Path | None, *, allow_non_finite: bool = False) -> FeatureTable:
    """Load ``path``, or the bundled demo catalogue when None.

    Raises:
        TableError: If the file cannot be read, lacks ``entity_id``, or holds a bad or duplicate row (a value that
            is not finite is bad unless ``allow_non_finite``).
    """
    if path is None:
        with resources.files("mab_service.data").joinpath("demo.csv").open(encoding="utf-8") as f:
            return parse_table(f, "demo.csv")
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return parse_table(f, str(path), allow_non_finite=allow_non_finite)
    except OSError as exc:
        raise TableError(f"cannot read {path}: {exc.strerror}") from None


def parse_table(lines: Iterable[str], where: str, *, allow_non_finite: bool = False) -> FeatureTable:
    """Parse CSV text; see :func:`load_table`."""
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader, [])]
    if ID_COLUMN not in header:
        raise TableError(f"{where}: line 1: the header must name {ID_COLUMN} (got {','.join(header) or 'nothing'})")
    id_col = header.index(ID_COLUMN)
    feature_cols = [i for i, name in enumerate(header) if i != id_col and name]
    raw: dict[str, list[str]] = {}
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < len(header):
            raise TableError(f"{where}: line {reader.line_num}: expected {len(header)} fields, got {len(row)}")
        entity = row[id_col].strip()
        if not entity:
            raise TableError(f"{where}: line {reader.line_num}: entity_id is empty")
        if entity in raw:
            raise TableError(f"{where}: line {reader.line_num}: duplicate entity_id {entity!r}")
        raw[entity] = [row[i].strip() for i in feature_cols]
    is_int = tuple(all(_is_int_literal(values[j]) for values in raw.values()) for j in range(len(feature_cols)))
    rows: dict[str, tuple[float | int, ...]] = {}
    for entity, values in raw.items():
        parsed: list[float | int] = []
        for j, text in enumerate(values):
            if is_int[j]:
                parsed.append(int(text))
                continue
            try:
                value = float(text)
            except ValueError:
                raise TableError(f"{where}: entity {entity!r}: {header[feature_cols[j]]} is not a number") from None
            if not math.isfinite(value) and not allow_non_finite:
                raise TableError(f"{where}: entity {entity!r}: {header[feature_cols[j]]} is not finite")
            parsed.append(value)
        rows[entity] = tuple(parsed)
    return FeatureTable(tuple(header[i] for i in feature_cols), is_int, rows)


def _is_int_literal(text: str) -> bool:
    body = text[1:] if text[:1] in "+-" else text
    return body.isdigit()
