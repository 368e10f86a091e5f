"""How a Vertex source reads: bounds, retries, back-pressure and readiness, shared by every Vertex backend.

``ReadPolicy`` runs a fan-out: parts run concurrently under one deadline, each call holds a permit of a
per-worker semaphore and gets ``timeout=min(call timeout, time left)``, and UNAVAILABLE, DEADLINE_EXCEEDED and
broken streams are retried with jittered exponential backoff while the deadline allows. ``StoreHealth`` turns the
outcomes into readiness for ``/health``.

The policy tells a store that fails from a worker that overloads itself:

- **the store fails** when a call ends in an error status (after its retries) or the channel is dead, or when
  its calls only time out and it answered none for ``unready_after_failures`` x ``probe_interval_s`` (a hung
  store). Only that counts toward ``/health``. Under ``on_failure = "degrade"`` what was not read keeps the prior
  and the answer is marked degraded; under ``"fail"`` the first failure cancels the other parts and raises
  ``FeatureSourceError`` (503). While the store is known to be failing (``StoreHealth.ready`` is false), a
  request's fan-out does not call it at all: only the background check (``probe=True``) reads it;
- **the worker is overloaded** when its own deadline passes while parts still wait for a permit or for an
  answer, or its calls time out while the store still answers others, with no error status. That is
  back-pressure, not a failure: the fan-out reports ``overloaded`` and the request is shed (503 ``overloaded``);
  ``/health`` does not move. New fan-outs are shed at once, before they queue, while a whole wave of calls waits
  for permits or the oldest has waited half a deadline (``admits``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import TYPE_CHECKING

from mab_service.errors import FeatureSourceError
from mab_service.features.source import Health

if TYPE_CHECKING:
    from mab_service.features.options import VertexOptions

logger = logging.getLogger("mab_service.vertex")


_READY = Health(True)


class StoreHealth:
    """Readiness from the outcome of reads: cached state, never a live call."""

    def __init__(self, unready_after_failures: int) -> None:
        self.unready_after_failures = unready_after_failures
        self.succeeded_once = False
        self.consecutive_failures = 0
        self.last_error = ""

    def success(self) -> None:
        if self.consecutive_failures >= self.unready_after_failures:
            logger.warning("feature store recovered after %d failed reads", self.consecutive_failures)
        self.succeeded_once = True
        self.consecutive_failures = 0

    def failure(self, reason: str) -> None:
        self.consecutive_failures += 1
        self.last_error = reason
        if self.consecutive_failures == self.unready_after_failures and self.succeeded_once:
            logger.warning(
                "feature store failing (%d reads in a row): %s; requests skip it until a check succeeds",
                self.consecutive_failures,
                reason,
            )

    @property
    def ready(self) -> bool:
        return self.succeeded_once and self.consecutive_failures < self.unready_after_failures

    @property
    def reason(self) -> str:
        """Why the store is not ready; empty when it is."""
        if not self.succeeded_once:
            detail = f": {self.last_error}" if self.last_error else ""
            return f"no successful read from the feature store yet{detail}"
        if self.consecutive_failures >= self.unready_after_failures:
            return f"feature store failing ({self.consecutive_failures} reads in a row): {self.last_error}"
        return ""

    def status(self) -> Health:
        return _READY if self.ready else Health(False, self.reason)


class _FanOut:
    """One fan-out's calls on the wire -> since when (loop time), the errors its calls met (retried or not) and how
    many of those were error statuses rather than timeouts; its parts see it through ``_fan_out``."""

    __slots__ = ("error_statuses", "on_wire", "store_errors")

    def __init__(self) -> None:
        self.on_wire: dict[object, float] = {}
        self.store_errors = 0
        self.error_statuses = 0


#: The fan-out a part runs for: each part's task is created with it set, so ``attempt`` can record its calls.
_fan_out: ContextVar[_FanOut | None] = ContextVar("fan_out", default=None)


class TimedOut(FeatureSourceError):
    """Every attempt of a read timed out, and the store answered none of them with an error: the store may be slow,
    or this worker too busy to take its answers in time. It counts toward the breaker (a store that answers nothing
    opens it), but while the store answers other calls, the request is shed rather than answered degraded."""


class OwnDeadline(Exception):
    """A part stopped because this worker's own deadline passed (in its queue, or cutting a call short)."""


class Retryable(Exception):
    """A read that may succeed if tried again: UNAVAILABLE, DEADLINE_EXCEEDED, or a stream that ended early."""


class CallTimeout(Retryable):
    """No answer within the call's timeout, on a stream shared with other reads (DEADLINE_EXCEEDED)."""


class ReadPolicy:
    """Bounds for one worker's reads: a semaphore, a deadline per fan-out, per-call timeouts, retries, shedding.

    Args:
        options: Limits, from settings.
        store: What to name in error messages (the resource being read).
        max_calls: Calls in flight at once; default ``options.max_concurrent_reads``.
    """

    def __init__(self, options: VertexOptions, store: str, max_calls: int | None = None) -> None:
        self.options = options
        self.store = store
        self.max_calls = max_calls or options.max_concurrent_reads
        self.health = StoreHealth(options.unready_after_failures)
        # One per worker: every read of this process shares the cap. Created lazily inside the running loop.
        self._semaphore: asyncio.Semaphore | None = None
        # Calls waiting for a permit -> since when (loop time), oldest first: the semaphore serves in that order.
        self._waiting: dict[object, float] = {}
        self._in_use = 0
        self._random = random.Random()
        self.degrade = options.on_failure == "degrade"
        self.calls = 0
        self.retries = 0
        self.failures = 0
        self.skipped = 0
        self.overloads = 0
        self.shed = 0
        self.timeouts = 0
        # When a call of this worker last got an answer (loop time).
        self.answered_at = -math.inf
        self.latency_s_total = 0.0

    @property
    def _silent_s(self) -> float:
        """How long a store must have answered nothing for its timeouts to count toward the breaker: as long as
        ``unready_after_failures`` probes take to notice a store that is back."""
        return self.options.unready_after_failures * self.options.probe_interval_s

    @property
    def _fair_share_s(self) -> float:
        """How long a call must have been on the wire for its timeout to be the store's fault, not our queue's."""
        return min(self.options.call_timeout_s, self.options.deadline_s / 2)

    def stats(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "retries": self.retries,
            "failed_reads": self.failures,
            "skipped_reads": self.skipped,
            "overloaded_reads": self.overloads,
            "shed_reads": self.shed,
            "timed_out_calls": self.timeouts,
            "consecutive_failures": self.health.consecutive_failures,
            "latency_s_total": self.latency_s_total,
        }

    def admits(self) -> bool:
        """Whether a new fan-out may queue: False (and counted as shed) while a whole wave of calls (``max_calls``)
        already waits for permits, or the oldest has waited half a deadline, so that what is admitted can still be
        read in time."""
        waiting = self._waiting
        if not waiting:
            return True
        oldest = next(iter(waiting.values()))
        if len(waiting) < self.max_calls and asyncio.get_running_loop().time() - oldest < self.options.deadline_s / 2:
            return True
        self.shed += 1
        return False

    async def fan_out(self, parts: Iterable[Callable[[float], Awaitable[None]]], *, probe: bool = False) -> str | None:
        """Run every part concurrently under one deadline; each gets that deadline (loop time) to pass on.

        A part raises ``Retryable`` or a gRPC error for ``attempt`` to handle, or FeatureSourceError to fail at
        once. The deadline (``options.budget_s``; a probe's is ``deadline_s``) cancels the parts still running;
        so does the first failure when the policy fails fast.

        Args:
            parts: The reads; each leaves what it did not read at the prior.
            probe: The background check: read even while the store is known to be failing, and raise on failure.

        Returns:
            None if every part finished; ``"failed"`` if the store failed and the policy degrades;
            ``"overloaded"`` if this worker's own deadline passed with no store error.

        Raises:
            FeatureSourceError: If the store fails (or is known to be failing) and the policy fails fast, or on
                any failure of a probe.
        """
        if not probe and not self.health.ready:
            self.skipped += 1
            return self._failed(FeatureSourceError(f"feature store {self.store} is not ready: {self.health.reason}"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget_s = self.options.deadline_s if probe else self.options.budget_s
        state = _FanOut()
        token = _fan_out.set(state)
        try:
            tasks = [asyncio.ensure_future(part(started + budget_s)) for part in parts]
        finally:
            _fan_out.reset(token)
        degrade = self.degrade and not probe
        try:
            done, pending = await asyncio.wait(
                tasks, timeout=budget_s, return_when=asyncio.ALL_COMPLETED if degrade else asyncio.FIRST_EXCEPTION
            )
            error: BaseException | None = None
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, OwnDeadline):
                    pending.add(task)
                elif exc is not None and error is None:
                    error = exc
            done -= pending
            # The store erred, or a call had a fair share of the deadline on the wire and no answer: the store is
            # slow, not our queue.
            now = loop.time()
            slow = state.store_errors > 0 or any(now - t >= self._fair_share_s for t in state.on_wire.values())
        finally:
            # Deadlines cancel the work they abandon; so does a cancelled request.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.latency_s_total += loop.time() - started
        if error is None and pending:
            if not probe and not slow:
                # Our own queue did not get to everything in time: back-pressure, not a store failure. What was
                # answered shows the store works.
                self.overloads += 1
                if done:
                    self.health.success()
                return "overloaded"
            error = self._deadline_error(budget_s, timed_out=not state.error_statuses)
        if error is None:
            self.health.success()
            return None
        failure = (
            error
            if isinstance(error, FeatureSourceError)
            else FeatureSourceError(f"feature store {self.store} failed: {_describe(error)}")
        )
        if isinstance(failure, TimedOut) and not probe and loop.time() - self.answered_at < self._silent_s:
            # Only timeouts, and the store answered some call lately: too much asked of it, or of this worker (a
            # busy or starved event loop takes answers late), at once. Back-pressure: shed the request, leave
            # /health alone. Only a store silent for a while is failing.
            self.overloads += 1
            return "overloaded"
        self.failures += 1
        self.health.failure(failure.message)
        if probe:
            raise failure from error
        if isinstance(failure, TimedOut) and self.health.ready:
            self.overloads += 1
            return "overloaded"
        return self._failed(failure)

    def _failed(self, failure: FeatureSourceError) -> str:
        if self.degrade:
            return "failed"
        raise failure

    async def attempt(self, deadline: float, call: Callable[[float], Awaitable[None]]) -> None:
        """Run ``call(timeout_s)`` holding a read permit, retrying what may succeed again while time is left.

        ``call`` keeps its own progress (a broken stream re-requests only what it has not received).

        Raises:
            FeatureSourceError: On an error that is not retryable, or when retries or time run out.
        """
        loop = asyncio.get_running_loop()
        semaphore = self._semaphore
        if semaphore is None:
            semaphore = self._semaphore = asyncio.Semaphore(self.max_calls)
        fan_out = _fan_out.get()
        tries = 0
        store_erred = False
        while True:
            if self._in_use >= self.max_calls:  # (Semaphore.locked() walks its waiters: too slow here)
                token = object()
                self._waiting[token] = loop.time()
                try:
                    await semaphore.acquire()
                finally:
                    del self._waiting[token]
            else:
                await semaphore.acquire()
            self._in_use += 1
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise OwnDeadline("the deadline passed while the read waited for a permit")
                self.calls += 1
                call_started = loop.time()
                timeout_s = min(self.options.call_timeout_s, remaining)
                if fan_out is not None:
                    fan_out.on_wire[call] = call_started
                try:
                    await call(timeout_s)
                    # Any answer shows the store works: the breaker opens only when nothing gets through.
                    self.health.success()
                    self.answered_at = loop.time()
                    return
                except FeatureSourceError:
                    raise
                except Exception as exc:
                    if not is_retryable(exc):
                        raise FeatureSourceError(f"feature store {self.store} failed: {_describe(exc)}") from exc
                    now = loop.time()
                    if now >= deadline and now - call_started < self._fair_share_s and not tries:
                        # Cut short by our own deadline after a late start in our queue, not by a slow store.
                        raise OwnDeadline("the deadline passed during the call") from exc
                    failure = exc
                    if is_timeout(exc):
                        self.timeouts += 1  # a slow store, or a worker too busy to see the answer in time
                    else:
                        store_erred = True
                    if fan_out is not None:
                        fan_out.store_errors += 1
                        fan_out.error_statuses += store_erred
                finally:
                    if fan_out is not None:
                        fan_out.on_wire.pop(call, None)
            finally:
                self._in_use -= 1
                semaphore.release()
            tries += 1
            remaining = deadline - loop.time()
            if tries > self.options.retries or remaining <= 0:
                error = FeatureSourceError if store_erred else TimedOut
                raise error(
                    f"feature store {self.store} failed after {tries} attempts: {_describe(failure)}"
                ) from failure
            self.retries += 1
            # Full jitter: a uniform share of an exponentially growing cap, so retries of many workers spread out.
            cap = self.options.backoff_s * (2 ** (tries - 1))
            await asyncio.sleep(min(self._random.uniform(0, cap), remaining))

    def _deadline_error(self, budget_s: float, timed_out: bool = False) -> FeatureSourceError:
        error = TimedOut if timed_out else FeatureSourceError
        return error(f"feature store {self.store} did not answer within the {budget_s * 1000:.0f} ms deadline")


def is_timeout(exc: BaseException) -> bool:
    """DEADLINE_EXCEEDED: the call's own timeout passed (api_core, raw grpc.aio, or a shared stream's wait)."""
    if isinstance(exc, CallTimeout):
        return True
    import grpc
    from google.api_core import exceptions as api_exceptions

    if isinstance(exc, api_exceptions.DeadlineExceeded):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def is_retryable(exc: BaseException) -> bool:
    """UNAVAILABLE, DEADLINE_EXCEEDED (from api_core or raw grpc.aio), or an early end of stream."""
    if isinstance(exc, Retryable):
        return True
    import grpc
    from google.api_core import exceptions as api_exceptions

    if isinstance(exc, (api_exceptions.ServiceUnavailable, api_exceptions.DeadlineExceeded)):
        return True
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def grpc_code_name(exc: BaseException) -> str | None:
    """The gRPC status name of an api_core or grpc.aio error, else None."""
    import grpc
    from google.api_core import exceptions as api_exceptions

    if isinstance(exc, api_exceptions.GoogleAPICallError) and exc.grpc_status_code is not None:
        return str(exc.grpc_status_code.name)
    if isinstance(exc, grpc.aio.AioRpcError):
        return str(exc.code().name)
    return None


def _describe(exc: BaseException) -> str:
    code = grpc_code_name(exc)
    if code is not None:
        import grpc

        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else getattr(exc, "message", str(exc))
        return f"{code}: {detail}"
    return str(exc) or type(exc).__name__
