"""A TCP proxy on a loopback port, for taking an emulator away from the processes that use it and giving it back.

The replicas and learners of a fault test are pointed at the proxy; the test cuts it (every connection closed, new
ones refused: the engine is down for them) and later points it at an emulator again, possibly a new one on another
port, so that an emulator can be restarted and set up before anyone reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading


class Proxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target`` while up."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._up = True
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(10)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._accept, sock=self._sock)
            self._started.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
            self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def down(self) -> None:
        """Close every connection and refuse new ones."""

        def cut() -> None:
            self._up = False
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(cut)

    def up(self, target: int | None = None) -> None:
        """Accept again, forwarding to ``target`` if given."""

        def restore() -> None:
            if target is not None:
                self.target = target
            self._up = True

        self._loop.call_soon_threadsafe(restore)

    def close(self) -> None:
        async def shut() -> None:
            self._up = False
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
            self._server.close()
            # Aborted and closing transports finish on the loop's next turns: stopped before, they are left unclosed.
            await asyncio.sleep(0.2)

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
