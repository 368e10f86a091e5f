"""The grammar of the settings' specs: what ``--features`` and ``--events`` may name, as pure functions.

``config.py`` checks its values here and imports nothing else of the project; each spec's own module knows how
to use it (``features.factory`` builds the source a ``SourceSpec`` names, ``fleet.setup`` the fleet's resources).
This module imports nothing of the project, so anything may import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The resource each Vertex backend reads; group 2 is the location (which names the regional endpoint).
ENTITY_TYPE = re.compile(r"^projects/([^/]+)/locations/([^/]+)/featurestores/([^/]+)/entityTypes/([^/]+)$")
FEATURE_VIEW = re.compile(r"^projects/([^/]+)/locations/([^/]+)/featureOnlineStores/([^/]+)/featureViews/([^/]+)$")
#: A Bigtable table (``bigtable:`` sources, the fleet's table).
TABLE = re.compile(r"^projects/([^/]+)/instances/([^/]+)/tables/([^/]+)$")
#: Pub/Sub names (the fleet's events).
TOPIC = re.compile(r"^projects/([^/]+)/topics/([^/]+)$")
SUBSCRIPTION = re.compile(r"^projects/([^/]+)/subscriptions/([^/]+)$")

#: What ``parse_spec`` accepts, for error messages.
SPEC_FORMS = "demo or csv:PATH or vertex-fos:FEATURE_VIEW or vertex:ENTITY_TYPE or bigtable:TABLE"
#: The Vertex backends by spec prefix, and the resource name each reads.
_RESOURCES = {"vertex": ENTITY_TYPE, "vertex-fos": FEATURE_VIEW}
#: What ``events_topic`` accepts, for error messages.
EVENTS_FORM = "pubsub:projects/P/topics/T"


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``--features`` value: the backend and what it reads (a path or a Vertex resource name)."""

    kind: str
    target: str = ""

    @property
    def vertex(self) -> bool:
        return self.kind in _RESOURCES


def parse_spec(features: str) -> SourceSpec:
    """Check ``features`` and split it into backend and target.

    Raises:
        ValueError: If it is none of ``SPEC_FORMS``.
    """
    kind, _, target = features.partition(":")
    if features == "demo":
        return SourceSpec("demo")
    if kind == "csv" and target:
        return SourceSpec("csv", target)
    if kind == "bigtable" and TABLE.match(target):
        return SourceSpec("bigtable", target)
    resource = _RESOURCES.get(kind)
    if resource is not None and resource.match(target):
        return SourceSpec(kind, target)
    raise ValueError(f"features must be {SPEC_FORMS} (got {features!r})")


def events_topic(events: str) -> str | None:
    """The topic ``projects/P/topics/T`` of an ``--events`` value ``pubsub:projects/P/topics/T``; None if it is
    not one (the prefix is required)."""
    topic = events.removeprefix("pubsub:")
    if topic == events or TOPIC.match(topic) is None:
        return None
    return topic
