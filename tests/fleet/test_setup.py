"""``mab-service setup`` against both emulators: creates what is missing, leaves what exists, safe twice."""

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
        f"created subscription {subscription}",
        f"created table {table} (families c, d, e)",
    ]
    second = run_setup(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == [
        f"topic {topic} exists",
        f"subscription {subscription} exists",
        f"table {table} exists",
    ]
    with pubsub_v1.SubscriberClient() as subscriber:
        made = subscriber.get_subscription(subscription=subscription)
    assert made.topic == topic
    families = table_families(table)
    assert set(families) == {"c", "d", "e"}
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
    assert f"table {table} exists; added families c, d, e" in done.stdout
    assert set(table_families(table)) == {"c", "d", "e", "other"}


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
