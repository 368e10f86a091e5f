from typing import Literal

import numpy as np
import numpy.typing as npt

Isa = Literal["baseline", "avx2", "avx512"]

def sample_beta(
    alpha: npt.ArrayLike,
    beta: npt.ArrayLike,
    *,
    seed: int | None = None,
    out: npt.NDArray[np.float64] | None = None,
) -> npt.NDArray[np.float64]: ...
def sample_top_k(
    alpha: npt.ArrayLike, beta: npt.ArrayLike, k: int, *, seed: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]: ...
def isa() -> Isa: ...
def best_isa_name() -> Isa: ...
def use_isa(name: str) -> Isa: ...
