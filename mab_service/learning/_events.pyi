# The shared-memory event ring (mab_service/learning/_events.pyx, csrc/mab/event_ring.hpp).
#
# Memory: bytes_needed(max_events, max_members) = 256 (header) + 192 per event slot + 8 per index entry (the
# power of two >= 4 x max_events, so 32 to 64 bytes per slot) + 16 per member. 10,000 answers/s of top_k 50
# over a 600 s window: max_events = 6,000,000 (1.15 GB of slots, 268 MB of index), max_members = 300,000,000
# (4.8 GB): about 6.2 GB.
from typing import Any

import numpy as np
import numpy.typing as npt

ACCEPTED: int
DUPLICATE: int
UNKNOWN_EVENT: int
NOT_IN_EVENT: int
MAX_EVENT_ID_BYTES: int
EVENT_SLOT_BYTES: int
MEMBER_BYTES: int
PENDING_GRACE_S: float

class EventRing:
    @staticmethod
    def bytes_needed(max_events: int, max_members: int) -> int: ...
    @staticmethod
    def create(buffer: Any, max_events: int, max_members: int, window_s: float) -> EventRing: ...
    @staticmethod
    def attach(buffer: Any) -> EventRing: ...
    def close(self) -> None: ...
    def hold(self, event_id: str, ids: list[str], picks: npt.NDArray[np.intp], now: float, tag: int = 0) -> bool: ...
    def reward(self, event_id: str, id: str, now: float) -> int: ...
    def reward_tag(self, event_id: str, id: str, now: float) -> tuple[int, int]: ...
    def confirm(self, event_id: str, id: str) -> bool: ...
    def unmark(self, event_id: str, id: str) -> None: ...
    def restore(
        self,
        event_id: str,
        ids: list[str],
        created: float,
        rewarded: list[str],
        now: float | None = None,
        tag: int = 0,
    ) -> bool: ...
    def stats(self, now: float | None = None) -> dict[str, int | float]: ...
    @property
    def capacity_events(self) -> int: ...
    @property
    def capacity_members(self) -> int: ...
    @property
    def window_s(self) -> float: ...
    @property
    def memory_bytes(self) -> int: ...
