"""The fault schedule (a quiet warm-up, then each fault followed by as long a quiet period) and its injection
into the emulator."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loadtests.soak.processes import Emulator

QUIET = "quiet"
FAULT_KINDS = ("unavailable", "latency", "breaks", "kill")


@dataclass(frozen=True)
class Phase:
    """One period of the schedule: ``kind`` is ``quiet`` or a fault, from ``start_s`` to ``end_s`` of the soak."""

    kind: str
    start_s: float
    end_s: float
    label: str
    faults: dict[str, float] = field(default_factory=dict)
    """Emulator settings for the phase (empty for ``kill``, which has none to set)."""


def base_faults(args: argparse.Namespace) -> dict[str, float]:
    return {"latency_ms": args.latency_ms, "jitter_ms": args.jitter_ms, "unavailable_rate": 0.0, "break_rate": 0.0}


def fault_phase(kind: str, start_s: float, end_s: float, args: argparse.Namespace) -> Phase:
    quiet = base_faults(args)
    if kind == "unavailable":
        label = f"unavailable {args.unavailable_rate:.0%}"
        return Phase(kind, start_s, end_s, label, quiet | {"unavailable_rate": args.unavailable_rate})
    if kind == "latency":
        label = f"latency {args.spike_latency_ms:g}+-{args.spike_jitter_ms:g} ms"
        return Phase(kind, start_s, end_s, label, quiet | {"latency_ms": args.spike_latency_ms,
                                                           "jitter_ms": args.spike_jitter_ms})  # fmt: skip
    if kind == "breaks":
        return Phase(kind, start_s, end_s, f"breaks {args.break_rate:.0%}", quiet | {"break_rate": args.break_rate})
    if kind == "kill":
        return Phase(kind, start_s, end_s, "emulator killed")
    raise ValueError(f"unknown fault {kind!r}")


def schedule(args: argparse.Namespace) -> list[Phase]:
    """A quiet warm-up, then each fault followed by a quiet period of the same length, repeated to the end."""
    phases = [Phase(QUIET, 0.0, min(args.warmup_s, args.duration_s), "quiet (warm-up)", base_faults(args))]
    t = phases[0].end_s
    kinds = [k for kind in args.faults for k in (kind, QUIET)]
    i = 0
    while kinds and t < args.duration_s - 1e-9:
        kind = kinds[i % len(kinds)]
        end = min(t + args.phase_s, args.duration_s)
        quiet = Phase(QUIET, t, end, QUIET, base_faults(args))
        phases.append(quiet if kind == QUIET else fault_phase(kind, t, end, args))
        t, i = end, i + 1
    if t < args.duration_s - 1e-9:  # no faults: one quiet phase to the end
        phases.append(Phase(QUIET, t, args.duration_s, QUIET, base_faults(args)))
    return phases


class FaultInjector:
    """Applies each phase to the emulator from worker threads, so the event loop keeps sending load: faults set
    through its Control service; for ``kill``, the process killed and started again in the background."""

    def __init__(self, emulator: Emulator, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.emulator = emulator
        self.pool = pool
        self._restarts: list[concurrent.futures.Future[None]] = []

    async def apply(self, phase: Phase, t0: float) -> None:
        """Set the phase's faults; for ``kill``, return at the phase's end (``t0`` + ``end_s``, monotonic)."""
        loop = asyncio.get_running_loop()
        if phase.kind == "kill":
            await self.restarted()  # the last kill's restart, if still under way, comes first
            await loop.run_in_executor(self.pool, self.emulator.kill)
            await asyncio.sleep(max(0.0, t0 + phase.end_s - time.monotonic()))
            # Started in the background: the next phase begins on time, with the store still down.
            self._restarts.append(self.pool.submit(self.emulator.restart))
        else:
            await loop.run_in_executor(self.pool, self.emulator.set_faults, phase.faults)

    async def restarted(self) -> None:
        """Wait for every restart started so far."""
        for restart in self._restarts:
            await asyncio.wrap_future(restart)
