"""The /predict request and answer: decoding, validation, encoding.

Validation is a handful of type checks on the decoded object; the per-candidate work (type check, the id rule of
``mab_service.ids`` and duplicate removal) runs in C (``features._index.unique``). Duplicate candidates are dropped,
keeping the first occurrence: each id is ranked once, so an answer never lists an id twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from mab_service.errors import MalformedBody, ValidationFailed
from mab_service.features._index import unique
from mab_service.ids import EVENT_ID_RULE, SEGMENT_RULE, id_message, id_problem, is_event_id, segment_problem

MAX_SEED = 2**64
MAX_USER_ID_CHARS = 1024
#: Floats up to this magnitude hold every integer exactly, so ``3.0`` may stand for ``3`` (JSON Schema's ``integer``,
#: which the OpenAPI document uses, includes it); past it a float need not be the number the client wrote.
EXACT_FLOAT_INT = 2**53


@dataclass(slots=True)  # not frozen: a frozen dataclass is built at ~3x the cost, once per request
class PredictRequest:
    user_id: str
    candidates: list[str]
    """Distinct candidate ids, in the order of their first occurrence in the request."""
    top_k: int | None
    seed: int | None
    event_id: str | None = None
    """The client's own event id, if it sent one."""
    segment: str | None = None
    """The audience the candidates are ranked for (``ids.SEGMENT_RULE``), if the client sent one."""


@dataclass(frozen=True, slots=True)
class RewardRequest:
    event_id: str
    id: str
    reward: float


def decode_predict(body: bytes, max_candidates: int) -> PredictRequest:
    """Parse and validate a /predict body.

    Raises:
        MalformedBody: the body is not JSON.
        ValidationFailed: the JSON does not match the contract; ``field`` names where.
    """
    doc = _json_object(body)

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
    except (TypeError, ValueError) as exc:
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
    event_id = doc.get("event_id")
    if event_id is not None:
        _check_event_id(event_id)
    segment = doc.get("segment")
    if segment is not None:
        check_segment(segment)
    return PredictRequest(user_id, candidates, top_k, seed, event_id, segment)


def check_segment(segment: object) -> str:
    """``segment`` if it keeps the segment rule.

    Raises:
        ValidationFailed: It does not (field ``segment``).
    """
    if type(segment) is not str:
        raise ValidationFailed(_expected(f"a string of {SEGMENT_RULE}", segment, "segment"), field="segment")
    problem = segment_problem(segment)
    if problem is not None:
        raise ValidationFailed(f"segment must be {SEGMENT_RULE} (got {problem})", field="segment")
    return segment


def decode_reward(body: bytes) -> RewardRequest:
    """Parse and validate a /reward body: ``{"event_id": str, "id": str, "reward": number in [0, 1] (default 1)}``.

    Raises:
        MalformedBody: the body is not JSON.
        ValidationFailed: the JSON does not match the contract; ``field`` names where.
    """
    return _reward_item(_json_object(body))


def decode_rewards(body: bytes, max_items: int) -> list[RewardRequest]:
    """Parse and validate a /rewards body: ``{"rewards": [reward, ...]}``, each as /reward takes it.

    Raises:
        MalformedBody: the body is not JSON.
        ValidationFailed: the JSON does not match the contract; ``field`` names where (``rewards[3].reward``).
    """
    doc = _json_object(body)
    items = doc.get("rewards")
    if type(items) is not list or not items:
        raise ValidationFailed(_expected("a non-empty array of rewards", items, "rewards"), field="rewards")
    if len(items) > max_items:
        raise ValidationFailed(f"rewards must hold at most {max_items} items (got {len(items)})", field="rewards")
    decoded = []
    for i, item in enumerate(items):
        try:
            decoded.append(_reward_item(item))
        except ValidationFailed as exc:
            where = f"rewards[{i}]" + (f".{exc.field}" if exc.field else "")
            raise ValidationFailed(f"{where}: {exc.message}", field=where) from None
    return decoded


def _json_object(body: bytes) -> dict[str, Any]:
    """The body parsed as a JSON object (MalformedBody if it is not JSON, ValidationFailed if not an object)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise ValidationFailed(f"body must be a JSON object (got {_json_type(doc)})")
    return doc


def _reward_item(doc: object) -> RewardRequest:
    if type(doc) is not dict:
        raise ValidationFailed(f"a reward must be a JSON object (got {_json_type(doc)})")
    event_id = doc.get("event_id")
    _check_event_id(event_id)
    arm_id = doc.get("id")
    if type(arm_id) is not str:
        raise ValidationFailed(_expected("a string", arm_id, "id"), field="id")
    problem = id_problem(arm_id)
    if problem is not None:
        raise ValidationFailed(id_message("id", problem), field="id")
    reward = doc.get("reward", 1.0)
    if type(reward) is int:
        reward = float(reward)
    if type(reward) is not float or not 0.0 <= reward <= 1.0:
        raise ValidationFailed(_expected("a number in [0, 1]", reward, "reward"), field="reward")
    return RewardRequest(event_id, arm_id, reward)  # type: ignore[arg-type]  # checked above


def _check_event_id(event_id: object) -> None:
    if type(event_id) is not str:
        raise ValidationFailed(_expected(f"a string of {EVENT_ID_RULE}", event_id, "event_id"), field="event_id")
    if not is_event_id(event_id):
        raise ValidationFailed(f"event_id must be {EVENT_ID_RULE} (got {_preview(event_id)})", field="event_id")


def encode_predict(
    user_id: str, ids: list[str], scores: npt.NDArray[np.float64], degraded: bool, event_id: str | None = None
) -> dict[str, Any]:
    """The /predict answer: ids best first, with their samples (descending); ``degraded`` when some candidates
    got the prior because the feature store could not be read; ``event_id`` when the loop is on."""
    answer = {"user_id": user_id, "ids": ids, "scores": scores, "degraded": degraded}
    if event_id is not None:
        answer["event_id"] = event_id
    return answer


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
