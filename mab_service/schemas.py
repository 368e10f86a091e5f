"""The /predict request and answer: decoding, validation, encoding.

Validation is a handful of type checks on the decoded object; the per-candidate work (type check and
duplicate removal) runs in C (``features._index.unique``). Duplicate candidates are dropped, keeping the
first occurrence: each id is ranked once, so an answer never lists an id twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from mab_service.errors import MalformedBody, ValidationFailed
from mab_service.features._index import unique

MAX_SEED = 2**64
MAX_USER_ID_CHARS = 1024
#: Floats up to this magnitude hold every integer exactly, so ``3.0`` may stand for ``3`` (JSON Schema's ``integer``,
#: which the OpenAPI document uses, includes it); past it a float need not be the number the client wrote.
EXACT_FLOAT_INT = 2**53


@dataclass(frozen=True, slots=True)
class PredictRequest:
    user_id: str
    candidates: list[str]
    """Distinct candidate ids, in the order of their first occurrence in the request."""
    top_k: int | None
    seed: int | None


def decode_predict(body: bytes, max_candidates: int) -> PredictRequest:
    """Parse and validate a /predict body.

    Raises:
        MalformedBody: the body is not JSON.
        ValidationFailed: the JSON does not match the contract; ``field`` names where.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise ValidationFailed(f"body must be a JSON object (got {_json_type(doc)})")

    user_id = doc.get("user_id")
    if type(user_id) is not str:
        raise ValidationFailed(_expected("a string", user_id, "user_id"), field="user_id")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise ValidationFailed(f"user_id must be at most {MAX_USER_ID_CHARS} characters", field="user_id")

    candidates = doc.get("candidates")
    if type(candidates) is not list:
        raise ValidationFailed(_expected("an array of strings", candidates, "candidates"), field="candidates")
    if not candidates:
        raise ValidationFailed("candidates must not be empty", field="candidates")
    if len(candidates) > max_candidates:
        raise ValidationFailed(
            f"candidates must hold at most {max_candidates} ids (got {len(candidates)})", field="candidates"
        )
    try:
        candidates = unique(candidates)
    except TypeError as exc:
        # The message is "candidates[3] must be a string (got int)": the path is its first word.
        message = str(exc)
        raise ValidationFailed(message, field=message.split(" ", 1)[0]) from None

    top_k = doc.get("top_k")
    if type(top_k) is float:
        top_k = _whole(top_k)
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise ValidationFailed(_expected("an integer >= 1", top_k, "top_k"), field="top_k")
    seed = doc.get("seed")
    if type(seed) is float:
        seed = _whole(seed)
    if seed is not None and (type(seed) is not int or not 0 <= seed < MAX_SEED):
        raise ValidationFailed(_expected("an integer in [0, 2**64)", seed, "seed"), field="seed")
    return PredictRequest(user_id, candidates, top_k, seed)


def encode_predict(user_id: str, ids: list[str], scores: npt.NDArray[np.float64], degraded: bool) -> dict[str, Any]:
    """The /predict answer: ids best first, with their samples (descending); ``degraded`` when some candidates
    got the prior because the feature store could not be read."""
    return {"user_id": user_id, "ids": ids, "scores": scores, "degraded": degraded}


def _whole(value: float) -> int | float:
    """``value`` as an int if it is a whole number that a float holds exactly (``3.0``), else unchanged."""
    return int(value) if value.is_integer() and abs(value) <= EXACT_FLOAT_INT else value


def _expected(what: str, got: object, name: str) -> str:
    if got is None:
        return f"{name} must be {what} (missing)"
    preview = _preview(got)
    return f"{name} must be {what} (got {_json_type(got)}{' ' + preview if preview else ''})"


def _json_type(value: object) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _preview(value: object) -> str:
    """A short JSON rendering of a scalar; arrays and objects are named by their type alone."""
    if isinstance(value, (dict, list)):
        return ""
    text = orjson.dumps(value).decode()
    return text if len(text) <= 40 else text[:37] + "..."
