# The native /predict on a node (mab_service/learning/_answer.pyx, csrc/mab/answer.cpp, csrc/yyjson).
from typing import Any

from mab_service.learning._arms import ArmTable
from mab_service.learning._events import EventRing

class NativeAnswer:
    n: int
    k: int
    held: int
    new_arms: int
    seed: int
    t: float
    fetch_s: float
    sample_s: float
    encode_s: float
    def __init__(
        self,
        arms: ArmTable,
        events: EventRing,
        max_candidates: int,
        prior_alpha: float,
        prior_beta: float,
        segment_weight: float,
        max_held_ids: int,
    ) -> None: ...
    def rank(self, body: bytes, seed: int) -> bool: ...
    @property
    def candidates(self) -> list[str]: ...
    @property
    def event_id(self) -> str | None: ...
    @property
    def segment(self) -> str | None: ...
    def segment_tag(self) -> int: ...
    def hold(self, event_id: str, now: float, tag: int) -> bool: ...
    def commit(self, event_id: str, now: float) -> tuple[int, int, bytes, bytes]: ...
    def decision(self, event_id: str, now: float, sample_rate: float) -> tuple[int, tuple[Any, ...]]: ...

def json_double(value: float) -> bytes: ...
