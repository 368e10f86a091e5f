"""The embedded feature source: a table loaded into memory at start, looked up in C++.

The table comes from a CSV file with the header ``entity_id,alpha,beta`` (more columns are ignored) or
from the bundled demo catalogue, read by the one catalogue loader (``learning._arms.read_catalogue``, the
parser the arm table loads with). Every row is checked when it loads; all bad rows are reported with
their line numbers and the service does not start on a bad file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from mab_service.errors import FeatureSourceError
from mab_service.features._index import IdIndex
from mab_service.features.source import Features, Health
from mab_service.learning._arms import read_catalogue

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
            demo = resources.files("mab_service.data").joinpath("demo.csv").read_bytes()
            self._index = load_catalogue(io.BytesIO(demo), "demo.csv")
        else:
            try:
                self._index = load_catalogue(self.path, str(self.path))
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
    """Read and check an ``entity_id,alpha,beta`` CSV given as lines of text (as a file opened with
    ``newline=""`` gives them); raise FeatureSourceError listing every bad line."""
    text = "".join(line if line.endswith(("\n", "\r")) else line + "\n" for line in lines)
    # A lone surrogate becomes bytes that are not UTF-8, which the loader reports with its line.
    return load_catalogue(io.BytesIO(text.encode("utf-8", "surrogatepass")), where)


def load_catalogue(source: str | Path | BinaryIO, where: str) -> IdIndex:
    """Read and check the catalogue at the path ``source`` (or in a seekable binary file) into an index; raise
    FeatureSourceError listing every bad line (``where`` names the file), OSError if it cannot be read."""
    try:
        ids, alpha, beta = read_catalogue(source, where, MAX_REPORTED_ERRORS)
    except ValueError as exc:
        raise FeatureSourceError(str(exc)) from None
    return IdIndex(ids, alpha, beta)
