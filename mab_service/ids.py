"""The id rules, defined once: what a candidate, a reward's ``id``, an arm id or a segment may be, and what an event
id may be.

An id is 1 to ``MAX_ID_BYTES`` bytes of UTF-8 with no control character (U+0000-U+001F, U+007F). Bytes, not
characters, because the tables, the journal and the fleet's Bigtable row keys hold bytes; no control characters
because ids end up in logs, journals and row keys where a NUL or a newline is trouble. Candidates are checked in C,
in one pass over their bytes (``features._index.unique``, which reads ``MAX_ID_BYTES`` from here and words its
message with ``id_message``); single ids are checked by ``id_problem``.

An event id is 1 to ``MAX_EVENT_ID_CHARS`` characters of ``A-Z a-z 0-9 . _ : -``, the service's own and a client's.

A segment is an id of at most ``MAX_SEGMENT_BYTES`` bytes. Its counts live beside the arms' under keys no id can be,
as ids hold no control character: ``"\0" + segment`` for the segment's own row and ``"\0" + segment + "\0" + id``
for an arm within it (``segment_key``, ``pair_key``; the arm table's C++ writes the same bytes). A feature store
(Vertex) holds an arm's posterior within a segment under the entity id made of the segment, U+001F and the id
(``store_pair_id``): U+001F, the unit separator, is a control character, so no arm's entity id is a pair's and no two
pairs share one; and unlike NUL it passes through CSV, BigQuery strings and C tooling unharmed.
"""

from __future__ import annotations

import re

MIN_ID_BYTES = 1
MAX_ID_BYTES = 1024
ID_RULE = f"{MIN_ID_BYTES} to {MAX_ID_BYTES} bytes of UTF-8 without control characters"
#: The control characters an id may not hold; in UTF-8 each is one byte below 0x80, so a byte scan finds them.
_CONTROL = re.compile("[\x00-\x1f\x7f]")
#: ``ID_RULE``'s character half as a JSON Schema pattern (the OpenAPI document); the byte length is in the text, as
#: JSON Schema's ``maxLength`` counts characters.
ID_PATTERN = "^[^\\u0000-\\u001f\\u007f]+$"

MAX_SEGMENT_BYTES = 128
SEGMENT_RULE = f"{MIN_ID_BYTES} to {MAX_SEGMENT_BYTES} bytes of UTF-8 without control characters"
#: Starts every segment key, and separates a segment from an arm in a pair key.
KEY_SEPARATOR = "\0"
#: Separates a segment from an arm in a feature store's entity id of the pair (``store_pair_id``).
STORE_SEPARATOR = "\x1f"

MAX_EVENT_ID_CHARS = 128
EVENT_ID_CHARS = "A-Za-z0-9._:-"
EVENT_ID_PATTERN = f"^[{EVENT_ID_CHARS}]{{1,{MAX_EVENT_ID_CHARS}}}$"
EVENT_ID = re.compile(EVENT_ID_PATTERN)
EVENT_ID_RULE = f"1 to {MAX_EVENT_ID_CHARS} characters of A-Z a-z 0-9 . _ : -"


def id_problem(value: str) -> str | None:
    """What breaks the id rule in ``value`` ("2000 bytes", "a control character U+000A at character 3"), or None
    if it keeps it."""
    if value.isascii():
        size = len(value)
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            return "a lone surrogate"
    if size < MIN_ID_BYTES:
        return "an empty string"
    if size > MAX_ID_BYTES:
        return f"{size} bytes"
    control = _CONTROL.search(value)
    if control is not None:
        return f"a control character U+{ord(control.group()):04X} at character {control.start()}"
    return None


def id_message(where: str, problem: str) -> str:
    """The validation message for an id at ``where`` (``candidates[3]``, ``id``) that has ``problem``."""
    return f"{where} must be {ID_RULE} (got {problem})"


def is_event_id(value: str) -> bool:
    """Whether ``value`` keeps the event id rule."""
    return EVENT_ID.fullmatch(value) is not None


def segment_problem(value: str) -> str | None:
    """What breaks the segment rule in ``value`` (the id rule, at most ``MAX_SEGMENT_BYTES`` bytes), or None."""
    problem = id_problem(value)
    if problem is None and len(value) * 4 > MAX_SEGMENT_BYTES and len(value.encode()) > MAX_SEGMENT_BYTES:
        return f"{len(value.encode())} bytes"
    return problem


def segment_key(segment: str) -> str:
    """The key of a segment's own row in the arm table."""
    return KEY_SEPARATOR + segment


def pair_key(segment: str, arm_id: str) -> str:
    """The key of an arm's row within a segment."""
    return KEY_SEPARATOR + segment + KEY_SEPARATOR + arm_id


def store_pair_id(segment: str, arm_id: str) -> str:
    """The entity id under which a feature store holds ``arm_id``'s posterior within ``segment``."""
    return f"{segment}{STORE_SEPARATOR}{arm_id}"


def split_key(key: str) -> tuple[str, str | None] | None:
    """``(segment, arm_id)`` of a pair key, ``(segment, None)`` of a segment key, None for an arm id."""
    if not key.startswith(KEY_SEPARATOR):
        return None
    segment, _, arm_id = key[1:].partition(KEY_SEPARATOR)
    return segment, (arm_id if _ else None)
