"""``mab-service setup`` against both emulators: creates what is missing, leaves what exists, safe twice; the
learners' subscription forwards what they cannot decode to a dead-letter topic, also one that existed before."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
import warnings
from typing import Any

import pytest

from tests.fleet.conftest import Emulator


def run_setup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mab_service", "setup", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )


def names() -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return (
        f"projects/fleet/topics/events-{tag}",
        f"projects/fleet/subscriptions/learners-{tag}",
        f"projects/fleet/instances/mab/tables/arms-{tag}",
    )


def table_admin() -> Any:
    from google.cloud import bigtable

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Connecting to Bigtable emulator", category=RuntimeWarning)
        return bigtable.Client(project="fleet", admin=True).table_admin_client


def table_families(table: str) -> dict[str, Any]:
    return dict(table_admin().get_table(name=table).column_families)


def test_setup_creates_then_leaves(bigtable_emulator: Emulator, pubsub_emulator: Emulator) -> None:
    from google.cloud import pubsub_v1

    topic, subscription, table = names()
    args = ("--events", f"pubsub:{topic}", "--subscription", subscription, "--posteriors", f"bigtable:{table}")
    first = run_setup(*args, "--retention-s", "7200")
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"created topic {topic}",
        f"created topic {topic}-dead-letter",
        f"created topic {topic}-counts",
        f"created subscription {subscription}-dead-letter",
        f"created subscription {subscription} (dead letters to {topic}-dead-letter after 5 deliveries)",
        f"created table {table} (families n, c, d, e, s)",
        f"table {table} has 16 shards (written)",
        f"shard topics {topic}-shard-0 to 15: 16 created, 0 exist",
        f"shard subscriptions {subscription}-shard-0 to 15: 16 created, 0 exist",
    ]
    second = run_setup(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"topic {topic} exists",
        f"topic {topic}-dead-letter exists",
        f"topic {topic}-counts exists",
        f"subscription {subscription}-dead-letter exists",
        f"subscription {subscription} exists (dead letters to {topic}-dead-letter)",
        f"table {table} exists",
        f"table {table} has 16 shards",
        f"shard topics {topic}-shard-0 to 15: 0 created, 16 exist",
        f"shard subscriptions {subscription}-shard-0 to 15: 0 created, 16 exist",
    ]
    with pubsub_v1.SubscriberClient() as subscriber:
        made = subscriber.get_subscription(subscription=subscription)
        dead = subscriber.get_subscription(subscription=f"{subscription}-dead-letter")
    assert made.topic == topic
    assert made.dead_letter_policy.dead_letter_topic == f"{topic}-dead-letter"
    assert made.dead_letter_policy.max_delivery_attempts == 5
    assert dead.topic == f"{topic}-dead-letter"
    with pubsub_v1.SubscriberClient() as subscriber:
        for shard in (0, 15):
            made = subscriber.get_subscription(subscription=f"{subscription}-shard-{shard}")
            assert made.topic == f"{topic}-shard-{shard}"
            assert made.dead_letter_policy.dead_letter_topic == f"{topic}-dead-letter"
    families = table_families(table)
    assert set(families) == {"n", "c", "d", "e", "s"}
    assert families["s"].gc_rule.max_num_versions == families["n"].gc_rule.max_num_versions == 1
    assert families["c"].value_type.aggregate_type.sum is not None
    assert families["d"].gc_rule.max_age.seconds == 7200 + 3600
    assert families["e"].gc_rule.max_age.seconds == 7200 + 3600


def test_setup_adds_missing_families(bigtable_emulator: Emulator, pubsub_emulator: Emulator) -> None:
    from google.cloud.bigtable_admin_v2.types import ColumnFamily, Table

    topic, subscription, table = names()
    parent, _, table_id = table.rpartition("/tables/")
    table_admin().create_table(parent=parent, table_id=table_id, table=Table(column_families={"other": ColumnFamily()}))
    done = run_setup("--events", f"pubsub:{topic}", "--subscription", subscription, "--posteriors", f"bigtable:{table}")
    assert done.returncode == 0, done.stderr
    assert f"table {table} exists; added families n, c, d, e, s" in done.stdout
    assert set(table_families(table)) == {"n", "c", "d", "e", "s", "other"}


def test_setup_adds_a_dead_letter_policy_to_an_existing_subscription(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator
) -> None:
    """A deployment set up before dead letters: running setup again gives its subscription the policy, keeping
    the subscription (and the messages it holds)."""
    from google.cloud import pubsub_v1

    topic, subscription, table = names()
    with pubsub_v1.PublisherClient() as publisher:
        publisher.create_topic(name=topic)
    with pubsub_v1.SubscriberClient() as subscriber:
        subscriber.create_subscription(
            request={"name": subscription, "topic": topic, "message_retention_duration": {"seconds": 86400}}
        )
    with pubsub_v1.PublisherClient() as publisher:  # published before the policy, delivered after it
        publisher.publish(topic, b"held", v="2", k="p/1").result(timeout=30)
    args = ("--events", f"pubsub:{topic}", "--subscription", subscription, "--posteriors", f"bigtable:{table}")
    done = run_setup(*args, "--max-delivery-attempts", "7")
    assert done.returncode == 0, done.stderr
    assert (
        f"subscription {subscription} exists; added its dead-letter policy (to {topic}-dead-letter after 7 "
        "deliveries)" in done.stdout.splitlines()
    )
    with pubsub_v1.SubscriberClient() as subscriber:
        policy = subscriber.get_subscription(subscription=subscription).dead_letter_policy
        held = subscriber.pull(subscription=subscription, max_messages=10, timeout=10).received_messages
    assert (policy.dead_letter_topic, policy.max_delivery_attempts) == (f"{topic}-dead-letter", 7)
    assert [m.message.data for m in held] == [b"held"]


def test_setup_fixes_the_shards_once(bigtable_emulator: Emulator, pubsub_emulator: Emulator) -> None:
    """``--shards`` is taken by the first setup and stored in the table; a later setup keeps it without the flag,
    and refuses another count rather than move arms between learners under their feet."""
    topic, subscription, table = names()
    args = ("--events", f"pubsub:{topic}", "--subscription", subscription, "--posteriors", f"bigtable:{table}")
    first = run_setup(*args, "--shards", "3")
    assert first.returncode == 0, first.stderr
    assert f"shard subscriptions {subscription}-shard-0 to 2: 3 created, 0 exist" in first.stdout.splitlines()
    again = run_setup(*args)
    assert again.returncode == 0, again.stderr
    assert f"table {table} has 3 shards" in again.stdout.splitlines()
    other = run_setup(*args, "--shards", "4")
    assert other.returncode == 3
    assert f"table {table} has 3 shards; --shards 4 cannot change them in place" in other.stderr


def test_setup_refuses_a_subscription_on_another_topic(bigtable_emulator: Emulator, pubsub_emulator: Emulator) -> None:
    topic, subscription, table = names()
    args = ("--subscription", subscription, "--posteriors", f"bigtable:{table}")
    assert run_setup("--events", f"pubsub:{topic}", *args).returncode == 0
    other = run_setup("--events", f"pubsub:{topic}-other", *args)
    assert other.returncode == 3
    assert f"exists on topic {topic}, not {topic}-other" in other.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--events", "kafka:x", "--events must be pubsub:projects/P/topics/T"),
        ("--subscription", "projects/p/topics/t", "a subscription must be projects/P/subscriptions/S"),
        ("--posteriors", "bigtable:projects/p/tables/t", "a Bigtable table must be projects/P/instances/I/tables/T"),
        ("--max-delivery-attempts", "4", "--max-delivery-attempts must be in [5, 100] (got 4)"),
        ("--shards", "0", "--shards must be in [1, 1000] (got 0)"),
    ],
)
def test_setup_names_a_bad_argument(flag: str, value: str, message: str) -> None:
    args = {
        "--events": "pubsub:projects/p/topics/t",
        "--subscription": "projects/p/subscriptions/s",
        "--posteriors": "bigtable:projects/p/instances/i/tables/t",
    } | {flag: value}
    done = run_setup(*(part for pair in args.items() for part in pair))
    assert done.returncode == 3
    assert message in done.stderr


def test_setup_refuses_markers_that_expire_before_messages(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator
) -> None:
    from google.cloud.bigtable_admin_v2.types import ColumnFamily, Table

    topic, subscription, table = names()
    parent, _, table_id = table.rpartition("/tables/")
    families = {"d": ColumnFamily(gc_rule={"max_age": {"seconds": 600}})}
    table_admin().create_table(parent=parent, table_id=table_id, table=Table(column_families=families))
    done = run_setup("--events", f"pubsub:{topic}", "--subscription", subscription, "--posteriors", f"bigtable:{table}")
    assert done.returncode == 3
    assert "keeps its deduplication markers (family d) for 600 s, not longer than subscription" in done.stderr
    assert f"{subscription} keeps a message (86400 s)" in done.stderr


def test_setup_refuses_counts_that_cannot_be_added_to(bigtable_emulator: Emulator, pubsub_emulator: Emulator) -> None:
    from google.cloud.bigtable_admin_v2.types import ColumnFamily, Table

    topic, subscription, table = names()
    parent, _, table_id = table.rpartition("/tables/")
    table_admin().create_table(parent=parent, table_id=table_id, table=Table(column_families={"c": ColumnFamily()}))
    done = run_setup("--events", f"pubsub:{topic}", "--subscription", subscription, "--posteriors", f"bigtable:{table}")
    assert done.returncode == 3
    assert "has a family c that is not an aggregate (int64 sum) family" in done.stderr
