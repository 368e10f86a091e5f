"""Long-lived ``StreamingFetchFeatureValues`` streams that every batched read of a worker shares.

Opening a gRPC stream costs the Python client about 400 us, four times what 100 keys cost to decode; a stream per
chunk of 100 keys would spend most of a cold request there. So a worker keeps a few bidirectional streams open
(one per channel) and multiplexes its reads over them: a read writes one request message of up to 100 keys and
waits for its keys' answers. The API allows this: answers may come in any order and carry their keys, so one
reader task per stream decodes each answer (``_wire.decode_answer``, from the bytes) and hands every key to the
read that asked for it.

A read sends all its request messages on one stream and waits for them together, so a request costs one wait,
not one per chunk. Failures stay per key where they can: an answer with an error status fails the keys it lists
(every read on the stream if it lists none), and a read with such keys ends with that error once its other keys
are answered; a stream that breaks fails every read waiting on it, and the next read opens a new one. Errors
reach ``read_policy.ReadPolicy.attempt`` as they would from a call of its own: retryable ones (UNAVAILABLE,
DEADLINE_EXCEEDED, a stream that ends) are retried, for the keys still unanswered, on a new or another stream.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from mab_service.errors import FeatureSourceError
from mab_service.features._wire import decode_answer, take_positions
from mab_service.features.read_policy import CallTimeout, Retryable
from mab_service.features.source import Lookup

logger = logging.getLogger("mab_service.vertex")

_OK = 0
_NOT_FOUND = 5  # google.rpc.Code.NOT_FOUND: the keys listed are unknown, and keep the prior
_RETRYABLE_CODES = (14, 4)  # UNAVAILABLE, DEADLINE_EXCEEDED

#: Places decoded answers: (out, positions, first values, second values, present bits).
Place = Callable[
    [Lookup, npt.NDArray[np.intp], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.uint8]], None
]
#: Places one decoded answer: (out, position, present bits, first value, second value).
PlaceOne = Callable[[Lookup, int, int, float, float], None]
#: Up to this many keys of an answer for one read are placed one by one: numpy costs more on tiny arrays.
_FEW = 8


class _Read:
    """One request message in flight: the keys it still waits for -> their positions, where to put the values."""

    __slots__ = ("done", "error", "failed", "out", "waiting")

    def __init__(self, waiting: dict[str, int], out: Lookup, done: asyncio.Future[None]) -> None:
        self.waiting = waiting
        self.out = out
        self.done = done
        # Keys the store answered with an error: they stay in ``waiting`` (unread, or asked for again), and the
        # read ends with ``error`` once every other key is answered.
        self.failed = 0
        self.error: Exception | None = None


class _Stream:
    """One open bidirectional call, its reader task and the reads waiting on it, by key."""

    def __init__(self, call: Any, owner: FetchStreams) -> None:
        self.call = call
        self.owner = owner
        # Key -> the read waiting for it; a key two reads wait for at once sits in ``shared`` (rare: the cache
        # coalesces reads of one id).
        self.pending: dict[str, _Read] = {}
        self.shared: dict[str, list[_Read]] = {}
        self.write_lock = asyncio.Lock()
        self.broken: BaseException | None = None
        self.reader = asyncio.create_task(self._read_answers(), name="vertex-fos-stream-reader")

    def register(self, read: _Read) -> None:
        pending = self.pending
        if pending.keys().isdisjoint(read.waiting):
            pending.update(dict.fromkeys(read.waiting, read))
            return
        for key in read.waiting:
            other = pending.setdefault(key, read)
            if other is not read:
                self.shared.setdefault(key, []).append(read)

    def unregister(self, read: _Read) -> None:
        pending = self.pending
        for key in read.waiting:
            if pending.get(key) is read:
                del pending[key]
                others = self.shared.pop(key, None)
                if others:
                    pending[key] = others.pop(0)
                    if others:
                        self.shared[key] = others
            elif key in self.shared:
                others = [r for r in self.shared[key] if r is not read]
                if others:
                    self.shared[key] = others
                else:
                    del self.shared[key]

    def _take(self, key: str) -> list[_Read]:
        """The reads waiting for ``key``, no longer waiting for it."""
        read = self.pending.pop(key, None)
        if read is None:
            return []
        others = self.shared.pop(key, None)
        return [read, *others] if others else [read]

    async def _read_answers(self) -> None:
        call = self.call
        first, second = self.owner.feature_names
        place = self.owner.place
        try:
            while True:
                answer = await call.read()
                if not isinstance(answer, bytes):  # grpc.aio.EOF: the server closed the stream
                    raise Retryable("the feature store closed the stream")
                try:
                    code, message, keys, a, b, present, missing = decode_answer(answer, first, second)
                except ValueError as exc:
                    raise FeatureSourceError(f"an answer of the feature store does not decode: {exc}") from None
                if code == _OK and keys:
                    self._place(keys, a, b, present, place)
                if code in (_OK, _NOT_FOUND) and missing:
                    # Unknown keys, in a NOT_FOUND answer of their own (as the emulator sends them) or beside the
                    # found ones.
                    touched = []
                    for key in missing:
                        for read in self._take(key):
                            read.waiting.pop(key, None)  # unknown: keeps the prior
                            touched.append(read)
                    _finish(touched)
                elif code not in (_OK, _NOT_FOUND):
                    error: Exception = (
                        Retryable(f"status {code}: {message}")
                        if code in _RETRYABLE_CODES
                        else FeatureSourceError(f"the feature store answered status {code}: {message}")
                    )
                    if not missing:
                        raise error  # not said for which keys: every read on this stream fails
                    touched = []
                    for key in missing:
                        for read in self._take(key):
                            read.failed += 1
                            read.error = error
                            touched.append(read)
                    _finish(touched)
        except asyncio.CancelledError:
            self._fail(Retryable("the stream was closed"))
            raise
        except Exception as exc:
            self._fail(exc)

    def _place(
        self,
        keys: list[str],
        a: npt.NDArray[np.float64],
        b: npt.NDArray[np.float64],
        present: npt.NDArray[np.uint8],
        place: Place,
    ) -> None:
        """Hand the keys of one OK answer to the reads waiting for them.

        Nearly every key belongs to the read whose request message this answers (its ``main`` read): those go in
        one vectorised step. Without a cache in front, concurrent requests share some ids, so a few keys may
        belong to other reads as well, or have been delivered already with another read's answer; those go one
        by one.
        """
        owners = [self.pending.pop(key, None) for key in keys]
        main = next((owner for owner in owners if owner is not None), None)
        if main is None:
            return  # every key was delivered already, or its read gave up
        positions = take_positions(keys, main.waiting)
        mine = positions >= 0
        if mine.all():
            place(main.out, positions, a, b, present)
        else:
            place(main.out, positions[mine], a[mine], b[mine], present[mine])
        others: dict[_Read, tuple[list[int], list[int]]] = {}
        for i, owner in enumerate(owners):
            if owner is not None and owner is not main:
                _add(others, owner, i, keys[i])
        shared = self.shared
        if shared and not shared.keys().isdisjoint(keys):
            for i, key in enumerate(keys):
                for other in shared.pop(key, ()):
                    if other is not main:
                        _add(others, other, i, key)
        place_one = self.owner.place_one
        for owner, (rows, at) in others.items():
            if len(rows) <= _FEW:
                for row, position in zip(rows, at):
                    place_one(owner.out, position, int(present[row]), float(a[row]), float(b[row]))
            else:
                index = np.asarray(rows, dtype=np.intp)
                place(owner.out, np.asarray(at, dtype=np.intp), a[index], b[index], present[index])
        _finish((main, *others))

    def _fail(self, exc: BaseException) -> None:
        self.broken = exc
        reads = {id(r): r for r in self.pending.values()}
        reads.update((id(r), r) for rs in self.shared.values() for r in rs)
        self.pending.clear()
        self.shared.clear()
        for read in reads.values():
            if not read.done.done():
                read.done.set_exception(exc)
        self.owner.forget(self)

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


def _add(groups: dict[_Read, tuple[list[int], list[int]]], read: _Read, row: int, key: str) -> None:
    """Note that answer row ``row`` (of ``key``) goes to ``read``, at the position it waits for it."""
    position = read.waiting.pop(key, None)
    if position is not None:
        rows, at = groups.setdefault(read, ([], []))
        rows.append(row)
        at.append(position)


def _finish(reads: Sequence[_Read]) -> None:
    """End the reads whose every key is answered (or answered with an error)."""
    for read in reads:
        if len(read.waiting) <= read.failed and not read.done.done():
            if read.error is None:
                read.done.set_result(None)
            else:
                read.done.set_exception(read.error)


class FetchStreams:
    """The worker's shared streams, one per method (one method per channel), opened on first use.

    Args:
        methods: ``channel.stream_stream(path, response_deserializer=None)`` of each channel.
        metadata: What the client library sends with each call.
        feature_names: UTF-8 names of the two features read per key.
        place: Puts decoded values at their positions in a read's ``out``.
        place_one: The same for one value.
    """

    def __init__(
        self,
        methods: Sequence[Callable[..., Any]],
        metadata: Any,
        feature_names: tuple[bytes, bytes],
        place: Place,
        place_one: PlaceOne,
    ) -> None:
        self.methods = list(methods)
        self.metadata = metadata
        self.feature_names = feature_names
        self.place = place
        self.place_one = place_one
        self._streams: list[_Stream | None] = [None] * len(self.methods)
        self._next = itertools.cycle(range(len(self.methods)))
        self.opened = 0

    def _stream(self) -> _Stream:
        i = next(self._next)
        stream = self._streams[i]
        if stream is None:
            stream = self._streams[i] = _Stream(self.methods[i](metadata=self.metadata), self)
            self.opened += 1
        return stream

    def forget(self, stream: _Stream) -> None:
        """Stop using a broken stream: the next read on its channel opens a new one."""
        for i, s in enumerate(self._streams):
            if s is stream:
                self._streams[i] = None
        stream.call.cancel()

    async def fetch(self, requests: Sequence[bytes], waiting: dict[str, int], out: Lookup, timeout_s: float) -> None:
        """Send ``requests`` (serialised StreamingFetchFeatureValuesRequests for the keys of ``waiting``, at most 100
        each) on one stream and wait up to ``timeout_s`` for their answers, which are placed in ``out``; answered
        keys leave ``waiting``.

        Raises:
            Retryable: If the stream broke, the store said UNAVAILABLE / DEADLINE_EXCEEDED for these keys, or
                ``timeout_s`` passed (as DEADLINE_EXCEEDED).
            grpc.aio.AioRpcError: The stream's own error.
            FeatureSourceError: If the store answered another error for these keys.
        """
        stream = self._stream()
        read = _Read(waiting, out, asyncio.get_running_loop().create_future())
        stream.register(read)
        try:
            try:
                async with stream.write_lock:
                    for request in requests:
                        await stream.call.write(request)
            except Exception as exc:
                if stream.broken is None:
                    self.forget(stream)  # a write that failed: the stream is gone
                raise (stream.broken or exc) from exc
            await asyncio.wait_for(read.done, timeout_s)
        except TimeoutError:
            raise CallTimeout(
                f"DEADLINE_EXCEEDED: no answer for {len(waiting)} keys within {timeout_s:.3f} s"
            ) from None
        finally:
            stream.unregister(read)

    async def close(self) -> None:
        streams = [s for s in self._streams if s is not None]
        self._streams = [None] * len(self.methods)
        for stream in streams:
            await stream.close()
