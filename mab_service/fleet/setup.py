"""``mab-service setup``: create the fleet's Pub/Sub topic and subscription and its Bigtable table, where missing.

What exists is left as it is (safe to run twice, or from every replica at start): a topic or table that exists is
not touched, a table that lacks one of the loop's column families gains it, a subscription without a dead-letter
policy gains one, and a subscription that exists on another topic is an error (events would silently go elsewhere).
Each step says what it did.

Dead letters: a message the learners cannot decode is nacked, never acknowledged; the subscription's dead-letter
policy forwards it after ``max_delivery_attempts`` deliveries to the topic ``<topic>-dead-letter``, which has a
subscription of its own (``<subscription>-dead-letter``) so that what lands there is kept for a person to read.

The table: family ``n`` holds the arms' absolute counts, one version per cell (written by the lease holder of the
arm's shard, ``fleet.learner``); family ``c`` is an aggregate family (int64 sums: the counts as learners of earlier
versions added them, read where ``n`` is not there); family ``d`` holds those learners' deduplication markers with a
garbage-collection policy of ``retention_s + MARKER_MARGIN_S``, kept while a table may still be written by them (an
upgrade); family ``e`` holds the serving replicas' event membership rows (``fleet.replica``), collected after the
same age; family ``s`` holds the fleet's own rows (the shard count, the learners' leases and the shards' windows and
applied sets), one version per cell and no age rule.

Shards: the arms are split into ``shards`` shards (``pubsub.shard_of``), fixed by the first ``setup`` and stored in
the table (``CONFIG_ROW``), where ``serve`` and ``learn`` read it. Each shard has a topic of its own
(``<topic>-shard-<n>``) and a subscription on it (``<subscription>-shard-<n>``, the same dead-letter policy); the
fleet's topic and subscription stay, for messages of replicas that do not shard yet (an upgrade) or of other
publishers. A deployment made before shards gains them when ``setup`` runs again. See docs/fleet.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mab_service.errors import MabError
from mab_service.fleet.schema import (
    ABSOLUTE_FAMILY,
    CONFIG_ROW,
    COUNTS_FAMILY,
    EVENTS_FAMILY,
    FLEET_FAMILY,
    MARKERS_FAMILY,
    SHARDS,
    TablePath,
)
from mab_service.fleet.sink import SHARD_SUFFIX, shard_topic
from mab_service.specs import SUBSCRIPTION, TOPIC

#: How long a deduplication marker outlives the subscription's message retention.
MARKER_MARGIN_S = 3600
DEFAULT_RETENTION_S = 86400
DEFAULT_ACK_DEADLINE_S = 60
#: Deliveries of a message before the subscription forwards it to the dead-letter topic; Pub/Sub takes 5 to 100.
DEFAULT_MAX_DELIVERY_ATTEMPTS = 5
MIN_DELIVERY_ATTEMPTS, MAX_DELIVERY_ATTEMPTS = 5, 100
#: What the dead-letter topic and its subscription are called after the events topic and the learners' subscription.
DEAD_LETTER_SUFFIX = "-dead-letter"
#: How long the dead-letter subscription keeps a message: Pub/Sub's longest retention, 7 days.
DEAD_LETTER_RETENTION_S = 7 * 86400
#: Arm shards of a new deployment: up to this many learners share the work.
DEFAULT_SHARDS = 16
MAX_SHARDS = 1000


def shard_subscription(subscription: str, shard: int) -> str:
    """The subscription of shard ``shard`` (on ``pubsub.shard_topic``): ``<subscription>-shard-<n>``."""
    return f"{subscription}{SHARD_SUFFIX}{shard}"


class SetupError(MabError):
    """The fleet's resources cannot be created or do not fit (a bad name, a subscription on another topic)."""

    code = "setup_failed"


def topic_path(spec: str) -> str:
    """``projects/P/topics/T`` from ``pubsub:projects/P/topics/T`` (the prefix is optional)."""
    path = spec.removeprefix("pubsub:")
    if TOPIC.match(path) is None:
        raise SetupError(f"--events must be pubsub:projects/P/topics/T (got {spec!r})")
    return path


def subscription_path(spec: str) -> str:
    """``projects/P/subscriptions/S`` from ``pubsub:projects/P/subscriptions/S`` (the prefix is optional)."""
    path = spec.removeprefix("pubsub:")
    if SUBSCRIPTION.match(path) is None:
        raise SetupError(f"a subscription must be projects/P/subscriptions/S (got {spec!r})")
    return path


def table_path(spec: str) -> TablePath:
    if not spec.startswith("bigtable:"):
        raise SetupError(f"--posteriors must be bigtable:projects/P/instances/I/tables/T (got {spec!r})")
    try:
        return TablePath.parse(spec)
    except MabError as exc:
        raise SetupError(exc.message) from None


@dataclass(frozen=True)
class FleetResources:
    """What ``setup`` makes: a topic, one subscription on it, a table; a dead-letter topic and its subscription."""

    topic: str
    subscription: str
    table: TablePath
    retention_s: int = DEFAULT_RETENTION_S
    ack_deadline_s: int = DEFAULT_ACK_DEADLINE_S
    max_delivery_attempts: int = DEFAULT_MAX_DELIVERY_ATTEMPTS
    shards: int | None = None
    """Arm shards; None: those the table has, or ``DEFAULT_SHARDS`` for a table without."""

    def __post_init__(self) -> None:
        if self.shards is not None and not 1 <= self.shards <= MAX_SHARDS:
            raise SetupError(f"--shards must be in [1, {MAX_SHARDS}] (got {self.shards})")
        if not MIN_DELIVERY_ATTEMPTS <= self.max_delivery_attempts <= MAX_DELIVERY_ATTEMPTS:
            raise SetupError(
                f"--max-delivery-attempts must be in [{MIN_DELIVERY_ATTEMPTS}, {MAX_DELIVERY_ATTEMPTS}] "
                f"(got {self.max_delivery_attempts})"
            )

    @property
    def marker_ttl_s(self) -> int:
        return self.retention_s + MARKER_MARGIN_S

    @property
    def dead_letter_topic(self) -> str:
        return self.topic + DEAD_LETTER_SUFFIX

    @property
    def dead_letter_subscription(self) -> str:
        return self.subscription + DEAD_LETTER_SUFFIX


def setup(resources: FleetResources, say: Callable[[str], None] = print) -> None:
    """Create what is missing of ``resources``; ``say`` gets one line per resource (created, or exists).

    The learners' subscription gets a dead-letter policy (to ``resources.dead_letter_topic``, after
    ``max_delivery_attempts``), also when it exists without one. On real Pub/Sub the forwarding also needs the
    project's Pub/Sub service agent to hold the publisher role on the dead-letter topic and the subscriber role on
    the subscription (docs/fleet.md, "Dead letters"); the emulators need nothing.

    Raises:
        SetupError: If the client libraries are missing, or a subscription exists on another topic.
    """
    try:
        from google.api_core import exceptions
        from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient
    except ImportError as exc:
        raise SetupError(f"setup needs mab-service[fleet] installed ({exc})") from None

    with PublisherClient() as publisher:
        for topic in (resources.topic, resources.dead_letter_topic):
            try:
                publisher.create_topic(name=topic)
                say(f"created topic {topic}")
            except exceptions.AlreadyExists:
                say(f"topic {topic} exists")
        ensure_counts_topic(publisher, resources.topic, say)

    retention_s = resources.retention_s
    dead_letter_policy = {
        "dead_letter_topic": resources.dead_letter_topic,
        "max_delivery_attempts": resources.max_delivery_attempts,
    }
    subscriber = SubscriberClient()
    with subscriber:
        # The dead letters' own subscription first: a message forwarded to a topic nobody subscribes to is lost.
        try:
            subscriber.create_subscription(
                request={
                    "name": resources.dead_letter_subscription,
                    "topic": resources.dead_letter_topic,
                    "ack_deadline_seconds": resources.ack_deadline_s,
                    "message_retention_duration": {"seconds": DEAD_LETTER_RETENTION_S},
                }
            )
            say(f"created subscription {resources.dead_letter_subscription}")
        except exceptions.AlreadyExists:
            say(f"subscription {resources.dead_letter_subscription} exists")
        try:
            subscriber.create_subscription(
                request={
                    "name": resources.subscription,
                    "topic": resources.topic,
                    "ack_deadline_seconds": resources.ack_deadline_s,
                    "message_retention_duration": {"seconds": resources.retention_s},
                    "dead_letter_policy": dead_letter_policy,
                }
            )
            say(
                f"created subscription {resources.subscription} (dead letters to {resources.dead_letter_topic} after "
                f"{resources.max_delivery_attempts} deliveries)"
            )
        except exceptions.AlreadyExists:
            existing = subscriber.get_subscription(subscription=resources.subscription)
            if existing.topic != resources.topic:
                raise SetupError(
                    f"subscription {resources.subscription} exists on topic {existing.topic}, not {resources.topic}"
                ) from None
            if existing.dead_letter_policy.dead_letter_topic:
                # One set by hand (another topic, other attempts) is the operator's choice: left as it is.
                say(
                    f"subscription {resources.subscription} exists (dead letters to "
                    f"{existing.dead_letter_policy.dead_letter_topic})"
                )
            else:
                subscriber.update_subscription(
                    request={
                        "subscription": {"name": resources.subscription, "dead_letter_policy": dead_letter_policy},
                        "update_mask": {"paths": ["dead_letter_policy"]},
                    }
                )
                say(
                    f"subscription {resources.subscription} exists; added its dead-letter policy (to "
                    f"{resources.dead_letter_topic} after {resources.max_delivery_attempts} deliveries)"
                )
            if existing.message_retention_duration:
                retention_s = int(existing.message_retention_duration.total_seconds())

    marker_ttl_s = ensure_table(resources.table, resources.marker_ttl_s, say)
    # Exactly once rests on a marker outliving every redelivery of the message that wrote it (docs/fleet.md).
    if marker_ttl_s is None or marker_ttl_s <= retention_s:
        kept = "with no max-age rule" if marker_ttl_s is None else f"for {marker_ttl_s} s"
        raise SetupError(
            f"table {resources.table} keeps its deduplication markers (family {MARKERS_FAMILY}) {kept}, not longer "
            f"than subscription {resources.subscription} keeps a message ({retention_s} s): a message redelivered "
            f"after its marker is collected would count twice; give family {MARKERS_FAMILY} a max age over the "
            "retention, or lower the retention"
        )
    shards = ensure_shards(resources.table, resources.shards, say)
    with PublisherClient() as publisher:
        created = 0
        for shard in range(shards):
            try:
                publisher.create_topic(name=shard_topic(resources.topic, shard))
                created += 1
            except exceptions.AlreadyExists:
                pass
    say(f"shard topics {resources.topic}{SHARD_SUFFIX}0 to {shards - 1}: {created} created, {shards - created} exist")
    with SubscriberClient() as subscriber:
        created = updated = 0
        for shard in range(shards):
            name, topic = shard_subscription(resources.subscription, shard), shard_topic(resources.topic, shard)
            try:
                subscriber.create_subscription(
                    request={
                        "name": name,
                        "topic": topic,
                        "ack_deadline_seconds": resources.ack_deadline_s,
                        "message_retention_duration": {"seconds": resources.retention_s},
                        "dead_letter_policy": dead_letter_policy,
                    }
                )
                created += 1
                continue
            except exceptions.AlreadyExists:
                pass
            existing = subscriber.get_subscription(subscription=name)
            if existing.topic != topic:
                raise SetupError(f"subscription {name} exists on topic {existing.topic}, not {topic}")
            if not existing.dead_letter_policy.dead_letter_topic:
                subscriber.update_subscription(
                    request={
                        "subscription": {"name": name, "dead_letter_policy": dead_letter_policy},
                        "update_mask": {"paths": ["dead_letter_policy"]},
                    }
                )
                updated += 1
    say(
        f"shard subscriptions {resources.subscription}{SHARD_SUFFIX}0 to {shards - 1}: {created} created, "
        f"{shards - created} exist" + (f" ({updated} given a dead-letter policy)" if updated else "")
    )


def ensure_shards(path: TablePath, shards: int | None, say: Callable[[str], None] = print) -> int:
    """The table's shard count: stored by the first ``setup`` (``shards``, or ``DEFAULT_SHARDS``), read after.

    Raises:
        SetupError: If ``shards`` differs from the stored count (a change would need every learner and replica
            stopped; not done in place).
    """
    from google.cloud import bigtable
    from google.cloud.bigtable import row_filters

    with warnings.catch_warnings():
        # The client warns that it connects to an emulator, on creation and on its first call.
        warnings.filterwarnings("ignore", message="Connecting to Bigtable emulator", category=RuntimeWarning)
        client = bigtable.Client(project=path.project)  # type: ignore[no-untyped-call]
        table: Any = client.instance(path.instance).table(path.table)  # type: ignore[no-untyped-call]
        wanted = shards or DEFAULT_SHARDS
        # Written only if absent, atomically: two setups racing agree on the first one's count.
        row = table.conditional_row(
            CONFIG_ROW,
            filter_=row_filters.RowFilterChain(
                [row_filters.FamilyNameRegexFilter(FLEET_FAMILY), row_filters.ColumnQualifierRegexFilter(b"^shards$")]
            ),
        )
        row.set_cell(FLEET_FAMILY, SHARDS, str(wanted).encode(), state=False)
        if not row.commit():
            say(f"table {path} has {wanted} shards (written)")
            return wanted
        stored = table.read_row(CONFIG_ROW).cells[FLEET_FAMILY][SHARDS][0].value
    count = int(stored) if stored.isdigit() else 0
    if count < 1:
        raise SetupError(f"table {path} holds a shard count of {stored!r}, not a number")
    if shards is not None and shards != count:
        raise SetupError(f"table {path} has {count} shards; --shards {shards} cannot change them in place")
    say(f"table {path} has {count} shards")
    return count


def ensure_counts_topic(publisher: Any, events_topic: str, say: Callable[[str], None] = print) -> None:
    """Create the learners' fan-out topic of ``events_topic`` (``fleet.fanout``) unless it exists. It has no
    subscription of its own: each replica node makes one at start and deletes it when it stops."""
    from google.api_core import exceptions

    from mab_service.fleet.fanout import counts_topic

    topic = counts_topic(events_topic)
    try:
        publisher.create_topic(name=topic)
        say(f"created topic {topic}")
    except exceptions.AlreadyExists:
        say(f"topic {topic} exists")


def ensure_table(path: TablePath, marker_ttl_s: int, say: Callable[[str], None] = print) -> int | None:
    """Create table ``path`` with the loop's column families, or add the families it lacks.

    Returns:
        The marker family's garbage-collection max age in seconds; None if its rule is not a plain max age.

    Raises:
        SetupError: If the client library is missing.
    """
    try:
        from google.api_core import exceptions
        from google.cloud import bigtable
        from google.cloud.bigtable_admin_v2.types import ColumnFamily, ModifyColumnFamiliesRequest, Table, Type
    except ImportError as exc:
        raise SetupError(f"setup needs mab-service[fleet] installed ({exc})") from None
    wanted: dict[str, Any] = {
        # The absolute counts: one version per cell; its timestamp is the window's version, so a late write of an
        # older window (a learner whose lease expired meanwhile) is never the newest.
        ABSOLUTE_FAMILY: ColumnFamily(gc_rule={"max_num_versions": 1}),
        COUNTS_FAMILY: ColumnFamily(
            value_type=Type(
                aggregate_type=Type.Aggregate(input_type=Type(int64_type=Type.Int64()), sum=Type.Aggregate.Sum())
            )
        ),
        MARKERS_FAMILY: ColumnFamily(gc_rule={"max_age": {"seconds": marker_ttl_s}}),
        # Events' membership rows: a reward is only taken within the replicas' reward window, far shorter.
        EVENTS_FAMILY: ColumnFamily(gc_rule={"max_age": {"seconds": marker_ttl_s}}),
        # The configuration and the leases: kept whatever their age (a lease is rewritten in place).
        FLEET_FAMILY: ColumnFamily(gc_rule={"max_num_versions": 1}),
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Connecting to Bigtable emulator", category=RuntimeWarning)
        # The handwritten admin client, because it (not the generated one) honours BIGTABLE_EMULATOR_HOST.
        client = bigtable.Client(project=path.project, admin=True)  # type: ignore[no-untyped-call]
    admin: Any = client.table_admin_client
    instance = f"projects/{path.project}/instances/{path.instance}"
    name = f"{instance}/tables/{path.table}"
    try:
        admin.create_table(parent=instance, table_id=path.table, table=Table(column_families=wanted))
        say(f"created table {name} (families {', '.join(wanted)})")
        return marker_ttl_s
    except exceptions.AlreadyExists:
        pass
    have = admin.get_table(name=name).column_families
    missing = [family for family in wanted if family not in have]
    if missing:
        modifications = [
            ModifyColumnFamiliesRequest.Modification(id=family, create=wanted[family]) for family in missing
        ]
        admin.modify_column_families(name=name, modifications=modifications)
        say(f"table {name} exists; added families {', '.join(missing)}")
    else:
        say(f"table {name} exists")
    if COUNTS_FAMILY not in missing and "aggregate_type" not in have[COUNTS_FAMILY].value_type:
        raise SetupError(
            f"table {name} has a family {COUNTS_FAMILY} that is not an aggregate (int64 sum) family: learners "
            "could not add to it; use another table"
        )
    if MARKERS_FAMILY in missing:
        return marker_ttl_s
    rule = have[MARKERS_FAMILY].gc_rule
    if "max_age" not in rule:
        return None
    return int(rule.max_age.total_seconds())
