"""The learning loop's dashboard: one self-contained HTML page (inline CSS and JavaScript, nothing fetched but
the service's own ``arms`` and ``loop`` answers), served at ``GET /dashboard``."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def page() -> bytes:
    """The page as UTF-8 bytes, read from the installed package on first use and held after."""
    return resources.files(__name__).joinpath("index.html").read_bytes()
