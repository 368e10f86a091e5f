from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

FIRST: int
SECOND: int

def decode_answer(
    answer: bytes, first: bytes, second: bytes
) -> tuple[
    int,
    str,
    list[str],
    npt.NDArray[np.float64],
    npt.NDArray[np.float64],
    npt.NDArray[np.uint8],
    list[str],
]: ...
def encode_request(head: bytes, keys: Iterable[str], tag: int = 0x12) -> bytes: ...
def take_positions(keys: list[str], waiting: dict[str, int]) -> npt.NDArray[np.intp]: ...
def decode_values(answer: bytes, first: bytes, second: bytes) -> tuple[int, float, float]: ...
