"""How a Vertex source reads: bounds, retries and readiness, shared by both backends.

``ReadPolicy`` runs a fan-out: parts run concurrently under one deadline, each call holds a permit of a
per-worker semaphore and gets ``timeout=min(call timeout, time left)``, and UNAVAILABLE, DEADLINE_EXCEEDED and
broken streams are retried with jittered exponential backoff while the deadline allows. ``StoreHealth`` turns the
outcomes into readiness for ``/health``.

``fan_out`` is where a failing store is handled, for both backends and the cache's reads alike:

- ``on_failure = "degrade"``: every part gets the whole deadline (one failed chunk does not cancel the others);
  what was not read keeps the prior and ``fan_out`` returns False, so the answer is marked degraded;
- ``on_failure = "fail"``: the first failure cancels the other parts and raises ``FeatureSourceError`` (503);
- while the store is known to be failing (``StoreHealth.ready`` is false), a request's fan-out does not call the
  store at all: it degrades (or fails) at once, so a dead store costs nobody the deadline. Only the background
  check (``probe=True``) reads it, and its first success closes the circuit again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

from mab_service.errors import FeatureSourceError
from mab_service.features.source import Health

if TYPE_CHECKING:
    from mab_service.features.vertex import VertexOptions

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


class Retryable(Exception):
    """A read that may succeed if tried again: UNAVAILABLE, DEADLINE_EXCEEDED, or a stream that ended early."""


class ReadPolicy:
    """Bounds for one worker's reads: a semaphore, a deadline per fan-out, per-call timeouts and retries.

    Args:
        options: Limits, from settings.
        store: What to name in error messages (the resource being read).
    """

    def __init__(self, options: VertexOptions, store: str) -> None:
        self.options = options
        self.store = store
        self.health = StoreHealth(options.unready_after_failures)
        # One per worker: every read of this process shares the cap. Created lazily inside the running loop.
        self._semaphore: asyncio.Semaphore | None = None
        self._random = random.Random()
        self.degrade = options.on_failure == "degrade"
        self.calls = 0
        self.retries = 0
        self.failures = 0
        self.skipped = 0
        self.latency_s_total = 0.0

    def stats(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "retries": self.retries,
            "failed_reads": self.failures,
            "skipped_reads": self.skipped,
            "consecutive_failures": self.health.consecutive_failures,
            "latency_s_total": self.latency_s_total,
        }

    async def fan_out(self, parts: Iterable[Callable[[float], Awaitable[None]]], *, probe: bool = False) -> bool:
        """Run every part concurrently under one deadline; each gets that deadline (loop time) to pass on.

        A part raises ``Retryable`` or a gRPC error for ``attempt`` to handle, or FeatureSourceError to fail at
        once. The deadline cancels the parts still running; so does the first failure when the policy fails fast.

        Args:
            parts: The reads; each leaves what it did not read at the prior.
            probe: The background check: read even while the store is known to be failing, and raise on failure.

        Returns:
            True if every part finished; False if the store failed and the policy degrades.

        Raises:
            FeatureSourceError: If the store fails (or is known to be failing) and the policy fails fast, or on
                any failure of a probe.
        """
        if not probe and not self.health.ready:
            self.skipped += 1
            return self._failed(FeatureSourceError(f"feature store {self.store} is not ready: {self.health.reason}"))
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.options.deadline_s
        tasks = [asyncio.ensure_future(part(deadline)) for part in parts]
        degrade = self.degrade and not probe
        try:
            done, pending = await asyncio.wait(
                tasks,
                timeout=self.options.deadline_s,
                return_when=asyncio.ALL_COMPLETED if degrade else asyncio.FIRST_EXCEPTION,
            )
            error: BaseException | None = None
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    break
            if error is None and pending:
                error = self._deadline_error()
        finally:
            # Deadlines cancel the work they abandon; so does a cancelled request.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.latency_s_total += loop.time() - started
        if error is None:
            self.health.success()
            return True
        self.failures += 1
        failure = (
            error
            if isinstance(error, FeatureSourceError)
            else FeatureSourceError(f"feature store {self.store} failed: {_describe(error)}")
        )
        self.health.failure(failure.message)
        if probe:
            raise failure from error
        return self._failed(failure)

    def _failed(self, failure: FeatureSourceError) -> bool:
        if self.degrade:
            return False
        raise failure

    async def attempt(self, deadline: float, call: Callable[[float], Awaitable[None]]) -> None:
        """Run ``call(timeout_s)`` holding a read permit, retrying what may succeed again while time is left.

        ``call`` keeps its own progress (a broken stream re-requests only what it has not received).

        Raises:
            FeatureSourceError: On an error that is not retryable, or when retries or time run out.
        """
        loop = asyncio.get_running_loop()
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.options.max_concurrent_reads)
        tries = 0
        while True:
            async with self._semaphore:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._deadline_error()
                self.calls += 1
                try:
                    await call(min(self.options.call_timeout_s, remaining))
                    return
                except FeatureSourceError:
                    raise
                except Exception as exc:
                    if not is_retryable(exc):
                        raise FeatureSourceError(f"feature store {self.store} failed: {_describe(exc)}") from exc
                    failure = exc
            tries += 1
            remaining = deadline - loop.time()
            if tries > self.options.retries or remaining <= 0:
                raise FeatureSourceError(
                    f"feature store {self.store} failed after {tries} attempts: {_describe(failure)}"
                ) from failure
            self.retries += 1
            # Full jitter: a uniform share of an exponentially growing cap, so retries of many workers spread out.
            cap = self.options.backoff_s * (2 ** (tries - 1))
            await asyncio.sleep(min(self._random.uniform(0, cap), remaining))

    def _deadline_error(self) -> FeatureSourceError:
        deadline_ms = self.options.deadline_s * 1000
        return FeatureSourceError(f"feature store {self.store} did not answer within the {deadline_ms:.0f} ms deadline")


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
