"""The id rules, defined once: what a candidate, a reward's ``id``, an arm id or a segment may be, and what an event
id may be.

An id is 1 to ``MAX_ID_BYTES`` bytes of UTF-8 with no control character (U+0000-U+001F, U+007F). Bytes, not
characters, because the tables, the journal and the fleet's Bigtable row keys hold bytes; no control characters
because ids end up in logs, journals and row keys where a NUL or a newline is trouble. Candidates are checked in C,
in one pass over their bytes (``features._index.unique``, which reads ``MAX_ID_BYTES`` from here and words its
message with ``id_message``); single ids are checked by ``id_problem``.

An event id is 1 to ``MAX_EVENT_ID_CHARS`` characters of ``A-Z a-z 0-9 . _ : -``, the service's own and a client's.
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
