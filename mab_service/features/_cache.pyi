import numpy as np
import numpy.typing as npt

class CacheTable:
    def __init__(self, max_entries: int) -> None: ...
    def __len__(self) -> int: ...
    def lookup(
        self, ids: list[str], now: float, stale_s: float, retry_s: float, prior_alpha: float, prior_beta: float
    ) -> tuple[
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
        int,
        int,
        npt.NDArray[np.intp] | None,
        npt.NDArray[np.intp] | None,
    ]: ...
    def insert(
        self,
        ids: list[str],
        alpha: npt.ArrayLike,
        beta: npt.ArrayLike,
        found: npt.ArrayLike,
        expires_at: npt.ArrayLike,
    ) -> None: ...
    def clear(self) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def evictions(self) -> int: ...
    @staticmethod
    def entry_bytes() -> int: ...
    @staticmethod
    def inline_key_bytes() -> int: ...
