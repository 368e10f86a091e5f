"""JSON responses rendered by orjson (numpy arrays included)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from mab_service.errors import MabError

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class OrjsonResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)


def error_body(exc: MabError) -> bytes:
    """The JSON body every error answer carries: ``{"error": code, "message": text, "field": where}``."""
    return orjson.dumps(exc.to_json())
