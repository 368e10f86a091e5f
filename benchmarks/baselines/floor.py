"""The floor: a bare ASGI app on uvicorn + httptools that reads the request and answers a constant.

Served with the configuration mab-service runs with (uvloop, httptools, one worker, no access log, no ``Server``
header, no WebSocket protocol, no proxy headers), it costs what uvicorn's ASGI cycle, the event loop and the kernel's
loopback TCP cost per request and nothing else: the distance of mab-service to it is the fixed cost that is ours
(less the second write per answer that the floor makes and mab-service does not: ``mab_service/http/protocol.py``).
Run it with::

    python -m benchmarks.baselines.floor --port 8002
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import uvicorn

#: About the size of a /predict answer of 10 candidates.
ANSWER = b'{"user_id":"u0","ids":[],"scores":[],"degraded":false,"event_id":"00000000000000000001"}'
_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))],
}
_BODY = {"type": "http.response.body", "body": ANSWER}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    message = await receive()
    while message.get("more_body", False):  # read the whole body, as a service must
        message = await receive()
    await send(_START)
    await send(_BODY)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="none",
        lifespan="off",
        workers=1,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # uvicorn's default is on, which costs a dict of the headers per request; ours is off
        log_level="warning",
    )


if __name__ == "__main__":
    main()
