"""API keys: who may call the service when ``api_keys_file`` is set (off by default).

The file holds one key per line; blank lines and lines starting with ``#`` are skipped, surrounding whitespace is
stripped. A key is at least ``MIN_KEY_CHARS`` characters with no whitespace or control characters inside.

Only the keys' SHA-256 digests are kept, in a dict: a request's key is hashed and looked up, so the time the check
takes depends on the digest of what the client sent, never on how much of a real key it matched (a comparison of the
keys themselves, byte by byte, would stop at the first difference). The digest also names the client in the logs
and to the loop (``key:<first 8 hex>``), never the key.

The file is checked once a second (``watch``, from the app's lifespan) by its modification time, size and inode, so
a Kubernetes Secret edited in place or swapped by its symlink takes effect without a restart; a file that cannot be
used keeps the keys last loaded, with an error in the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re

logger = logging.getLogger("mab_service.auth")

#: Fewest characters of a key: shorter ones are guessable.
MIN_KEY_CHARS = 16
#: Seconds between checks of the keys file for a change.
CHECK_INTERVAL_S = 1.0
#: Whitespace and control characters (C0, DEL, C1): not allowed inside a key.
_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the file and, for a bad key, its line."""


def parse_keys(text: str, path: str) -> list[str]:
    """The keys of a keys file's ``text``, in file order.

    Raises:
        KeysFileError: If a key is too short or holds whitespace or control characters (naming its line, not the
            key), or if the file holds no key.
    """
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if _BAD_CHARS.search(key):
            raise KeysFileError(f"{path} line {number}: a key must not hold whitespace or control characters")
        if len(key) < MIN_KEY_CHARS:
            raise KeysFileError(f"{path} line {number}: a key must be at least {MIN_KEY_CHARS} characters")
        keys.append(key)
    if not keys:
        raise KeysFileError(f"{path} holds no key (one key per line, # for comments)")
    return keys


def client_label(digest: bytes) -> str:
    """How a key's holder is named to the loop and in the logs: ``key:`` and the first 8 hex of its SHA-256."""
    return "key:" + digest.hex()[:8]


class ApiKeys:
    """The keys of one keys file, as SHA-256 digest -> client label, reloaded when the file changes.

    Args:
        path: The keys file.

    Raises:
        KeysFileError: If the file cannot be read or holds no usable keys (at start nothing is kept to fall back on).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.digests: dict[bytes, str] = {}
        self._seen: tuple[int, int, int] | None = None  # (mtime_ns, size, inode) of the file last read
        self._failed: str | None = None  # the last error reported, so that a bad file is logged once, not each check
        error = self.check()
        if error is not None:
            raise KeysFileError(error)

    def client(self, authorization: bytes | None) -> str | None:
        """The client label of a request whose ``Authorization`` header is ``authorization``; None if it carries no
        known key."""
        if authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        return self.digests.get(hashlib.sha256(token.strip()).digest())

    def check(self) -> str | None:
        """Reload the keys if the file changed since it was last read; the error if it cannot be used (the keys
        loaded before are kept), else None."""
        try:
            stat = os.stat(self.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if seen == self._seen:
                return None
            with open(self.path, encoding="utf-8") as file:
                text = file.read()
            keys = parse_keys(text, self.path)
        except (OSError, UnicodeDecodeError) as exc:
            return self._fail(f"cannot read {self.path}: {exc.strerror if isinstance(exc, OSError) else exc}")
        except KeysFileError as exc:
            return self._fail(str(exc))
        self._seen = seen
        self._failed = None
        digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        self.digests = {digest: client_label(digest) for digest in digests}
        return None

    def _fail(self, error: str) -> str:
        if error != self._failed and self.digests:
            logger.error("api keys not reloaded, the %d keys loaded before still hold: %s", len(self.digests), error)
        self._failed = error
        return error

    async def watch(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        """Check the file every ``interval_s`` seconds until cancelled."""
        previous = len(self.digests)
        while True:
            await asyncio.sleep(interval_s)
            before = self.digests
            if self.check() is None and self.digests is not before:
                logger.info("api keys reloaded from %s: %d keys (were %d)", self.path, len(self.digests), previous)
                previous = len(self.digests)
