"""The embedded feature source: a table loaded into memory at start, looked up in C++.

The table comes from a CSV file with the header ``entity_id,alpha,beta`` (more columns are ignored) or
from the bundled demo catalogue. Every row is checked when it loads; all bad rows are reported with
their line numbers and the service does not start on a bad file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np

from mab_service.errors import FeatureSourceError
from mab_service.features._index import IdIndex
from mab_service.features.source import Features, Health

REQUIRED_COLUMNS = ("entity_id", "alpha", "beta")
MAX_REPORTED_ERRORS = 20


class LocalSource:
    """Serves parameters from an in-memory table."""

    name = "local"

    def __init__(self, path: Path | None, prior_alpha: float, prior_beta: float) -> None:
        self.path = path
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta
        self._index: IdIndex | None = None

    @classmethod
    def demo(cls, prior_alpha: float, prior_beta: float) -> LocalSource:
        """The bundled demo catalogue, so that ``mab-service serve`` works with no configuration."""
        return cls(None, prior_alpha, prior_beta)

    async def start(self) -> None:
        if self.path is None:
            with resources.files("mab_service.data").joinpath("demo.csv").open(encoding="utf-8") as f:
                self._index = load_table(f, "demo.csv")
        else:
            try:
                with self.path.open(encoding="utf-8", newline="") as f:
                    self._index = load_table(f, str(self.path))
            except OSError as exc:
                raise FeatureSourceError(f"cannot read feature table {self.path}: {exc.strerror}") from None

    async def fetch(self, ids: list[str]) -> Features:
        assert self._index is not None, "fetch before start"
        alpha, beta, known = self._index.gather(ids, self.prior_alpha, self.prior_beta)
        return Features(alpha, beta, known)

    def health(self) -> Health:
        if self._index is None:
            return Health(False, "feature table not loaded")
        return Health(True)

    async def close(self) -> None:
        self._index = None

    @property
    def size(self) -> int:
        return 0 if self._index is None else len(self._index)

    @property
    def prior(self) -> tuple[float, float]:
        return self.prior_alpha, self.prior_beta


def load_table(lines: Iterable[str], where: str) -> IdIndex:
    """Read and check an ``entity_id,alpha,beta`` CSV; raise FeatureSourceError listing every bad line."""
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise FeatureSourceError(f"{where}: the file is empty (expected the header entity_id,alpha,beta)")
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise FeatureSourceError(f"{where}: line 1: the header lacks {', '.join(missing)} (got {','.join(header)})")
    col_id, col_a, col_b = (header.index(c) for c in REQUIRED_COLUMNS)
    width = max(col_id, col_a, col_b) + 1

    ids: list[str] = []
    alpha: list[float] = []
    beta: list[float] = []
    first_line: dict[str, int] = {}
    errors: list[str] = []
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if len(row) < width:
            errors.append(f"line {line}: expected {len(header)} fields, got {len(row)}")
            continue
        entity = row[col_id].strip()
        a, b = _parameter(row[col_a]), _parameter(row[col_b])
        if not entity:
            errors.append(f"line {line}: entity_id is empty")
        elif entity in first_line:
            errors.append(f"line {line}: duplicate entity_id {entity!r} (first on line {first_line[entity]})")
        if a is None:
            errors.append(f"line {line}: alpha must be a finite number > 0 (got {row[col_a]!r})")
        if b is None:
            errors.append(f"line {line}: beta must be a finite number > 0 (got {row[col_b]!r})")
        if entity and entity not in first_line:
            first_line[entity] = line
        if a is not None and b is not None and entity and first_line[entity] == line:
            ids.append(entity)
            alpha.append(a)
            beta.append(b)
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        more = len(errors) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise FeatureSourceError(f"{where}: {len(errors)} bad rows:\n  " + "\n  ".join(shown) + tail)
    return IdIndex(ids, np.array(alpha, dtype=np.float64), np.array(beta, dtype=np.float64))


def _parameter(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None
