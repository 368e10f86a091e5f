from os import PathLike
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

FLAG_CATALOGUE: int
FLAG_RUNTIME: int
FLAG_WASTED: int
FLAG_SEGMENT: int
EPOCH_HALF_LIVES: float
CSV_BLOCK_BYTES: int
RECORD_DTYPE: np.dtype[np.void]

def narrowed(alpha: npt.NDArray[np.float64], beta: npt.NDArray[np.float64]) -> npt.NDArray[np.float32] | None: ...
def first_seen(arrays: list[npt.NDArray[np.int32]], seen: npt.NDArray[np.bool_]) -> list[int]: ...
def unnamed(rows: npt.NDArray[np.int32], ids: list[str]) -> bytes: ...
def read_catalogue(
    source: str | PathLike[str] | BinaryIO, where: str, errors_max: int = 20
) -> tuple[list[str], npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

class ArmTable:
    @staticmethod
    def bytes_needed(capacity: int, id_bytes: int, segment_rows: int = 0) -> int: ...
    @staticmethod
    def create(
        buffer: Any,
        capacity: int,
        id_bytes: int,
        segment_rows: int = 0,
        segment_id_bytes: int = 0,
        half_life_s: float = 0.0,
        landmark: float | None = None,
    ) -> ArmTable: ...
    @staticmethod
    def attach(buffer: Any) -> ArmTable: ...
    @staticmethod
    def csv_rows_upper_bound(path: str | PathLike[str]) -> tuple[int, int]: ...
    def __len__(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def id_bytes(self) -> int: ...
    @property
    def id_bytes_used(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def rows_wasted(self) -> int: ...
    @property
    def segment_rows(self) -> int: ...
    @property
    def segment_rows_used(self) -> int: ...
    @property
    def half_life_s(self) -> float: ...
    @property
    def landmark(self) -> float: ...
    def rebase(self, now: float | None = None) -> bool: ...
    def load(self, ids: list[str], alpha0: npt.ArrayLike, beta0: npt.ArrayLike) -> None: ...
    def load_csv(self, path: str | PathLike[str], errors_max: int = 20) -> int: ...
    def gather(
        self, ids: list[str], prior_alpha: float, prior_beta: float, now: float | None = None
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int, npt.NDArray[np.int32]]: ...
    def gather_segment(
        self,
        ids: list[str],
        segment: str,
        weight: float,
        prior_alpha: float,
        prior_beta: float,
        now: float | None = None,
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], int, npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
    def add_impressions(
        self,
        ids: list[str],
        rows: npt.NDArray[np.int32],
        picks: npt.NDArray[np.intp],
        prior_alpha: float,
        prior_beta: float,
        now: float | None = None,
        segment: str | None = None,
    ) -> int: ...
    def add(
        self,
        id: str,
        impressions: float,
        rewards: float,
        prior_alpha: float,
        prior_beta: float,
        now: float | None = None,
    ) -> bool: ...
    def find_or_insert(self, id: str, prior_alpha: float, prior_beta: float) -> int: ...
    def raise_counts(
        self,
        ids: list[str],
        impressions: npt.ArrayLike,
        rewards: npt.ArrayLike,
        prior_alpha: float,
        prior_beta: float,
    ) -> int: ...
    def raise_decayed(
        self,
        ids: list[str],
        impressions: npt.ArrayLike,
        rewards: npt.ArrayLike,
        landmarks: npt.ArrayLike,
        prior_alpha: float,
        prior_beta: float,
    ) -> int: ...
    def get(self, id: str, now: float | None = None) -> tuple[float, float, float, float, bool] | None: ...
    def counts(self, now: float | None = None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
    def records(self) -> npt.NDArray[np.void]: ...
    def id_at(self, row: int) -> str: ...
    def names(self, rows: list[int]) -> bytes: ...
