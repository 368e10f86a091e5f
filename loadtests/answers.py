"""What a correct answer is. The load test checks every response against these, so a server that answers
fast but wrong shows up as failures, not as throughput. Plain Python, no Locust: tests import it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Expected:
    """What a /predict answer to one request body must satisfy."""

    user_id: str
    candidates: frozenset[str]
    n_ids: int
    """min(top_k, distinct candidates): duplicates are ranked once."""


def expect(body: bytes) -> Expected:
    """The expectation for a /predict request body (``top_k`` absent means every distinct candidate)."""
    doc = orjson.loads(body)
    candidates = frozenset(doc["candidates"])
    top_k = doc.get("top_k")
    n_ids = len(candidates) if top_k is None else min(int(top_k), len(candidates))
    return Expected(doc["user_id"], candidates, n_ids)


def check_predict(expected: Expected, status: int, content: bytes | None) -> str | None:
    """None if the answer is right, else what is wrong with it.

    Right means: status 200; a JSON object echoing ``user_id``; ``ids`` holding ``n_ids`` distinct ids, all
    among the candidates; ``scores`` as many numbers in [0, 1], in descending order.
    """
    if status != 200:
        return f"status {status}: {(content or b'')[:200]!r}"
    try:
        answer = orjson.loads(content or b"")
    except orjson.JSONDecodeError as exc:
        return f"answer is not JSON: {exc}"
    if not isinstance(answer, dict):
        return f"answer is not an object: {str(answer)[:200]}"
    ids, scores = answer.get("ids"), answer.get("scores")
    if answer.get("user_id") != expected.user_id:
        return f"user_id {answer.get('user_id')!r}, sent {expected.user_id!r}"
    if not isinstance(ids, list) or not isinstance(scores, list):
        return "ids and scores must be arrays"
    if len(ids) != expected.n_ids or len(scores) != expected.n_ids:
        return f"{len(ids)} ids and {len(scores)} scores, expected {expected.n_ids}"
    unique = set(ids)
    if len(unique) != len(ids):
        return "an id is ranked twice"
    if not unique <= expected.candidates:
        return f"ids that were not candidates: {sorted(unique - expected.candidates)[:5]}"
    if not all(type(s) is float or type(s) is int for s in scores):
        return "scores must be numbers"
    if any(not 0.0 <= s <= 1.0 for s in scores):
        return "a score outside [0, 1]"
    if any(a < b for a, b in zip(scores, scores[1:])):
        return "scores are not in descending order"
    return None


def check_health(status: int, content: bytes | None) -> str | None:
    """None if ``GET /health`` says the server is ready, else why not."""
    if status != 200:
        return f"status {status}: {(content or b'')[:200]!r}"
    try:
        answer = orjson.loads(content or b"")
    except orjson.JSONDecodeError as exc:
        return f"answer is not JSON: {exc}"
    if not isinstance(answer, dict) or answer.get("status") != "ok":
        return f"unexpected answer {str(answer)[:200]}"
    return None
