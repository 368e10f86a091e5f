"""A blocking client for the emulator's ``Control`` service: counters and faults of a running emulator."""

from __future__ import annotations

import json
from typing import Any

import grpc

from mab_service.emulator.server import CONTROL_SERVICE


class EmulatorControl:
    """Talks to the emulator at ``target`` (``host:port``) over an insecure channel.

    Args:
        target: The emulator's address.
        timeout_s: Deadline of each control call.
    """

    def __init__(self, target: str, timeout_s: float = 5.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(target)

    def stats(self) -> dict[str, Any]:
        """Counters (calls, ids, ids per call, peak concurrency, injected faults) and the current faults."""
        return self._call("Stats", {})

    def configure(self, **faults: float) -> dict[str, Any]:
        """Change some faults (latency_ms, jitter_ms, unavailable_rate, break_rate, unavailable_next, break_next);
        returns them all.

        Raises:
            grpc.RpcError: INVALID_ARGUMENT for an unknown name or a value out of range.
        """
        return self._call("Configure", faults)

    def reset(self) -> None:
        """Zero the counters."""
        self._call("Reset", {})

    def wait_ready(self, timeout_s: float) -> None:
        """Block until the emulator accepts connections.

        Raises:
            grpc.FutureTimeoutError: If it does not within ``timeout_s``.
        """
        grpc.channel_ready_future(self._channel).result(timeout=timeout_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> EmulatorControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        rpc = self._channel.unary_unary(f"/{CONTROL_SERVICE}/{method}")
        answer: dict[str, Any] = json.loads(rpc(json.dumps(body).encode(), timeout=self.timeout_s))
        return answer
