"""The fleet's scale run, small: the benchmark's own run (``benchmarks.bench_scale.run``) on the session's emulators,
checked rather than measured.

Six replicas and three learners as real processes, 1,500 answers with rewards posted to other replicas and posted
again to a third, one learner killed with SIGKILL and one replica stopped with SIGTERM and started again mid-run. The
run is shared by the tests of this module: one asserts what holds today (exact counts, duplicates answered
``duplicate``, no 5xx), the other the bound on an arm row's cells that the bounded-rows design must meet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.scale import ScaleConfig, run
from tests.fleet.conftest import Emulator

CONFIG = ScaleConfig(
    replicas=6,
    learners=3,
    answers=1_500,
    duration_s=90.0,  # a bound the count reaches first: 1,500 answers take ~25 s at the rate
    rate=60.0,
    arms=2_000,
    probe_every_s=2.0,
    converge_timeout_s=90.0,
    # A killed learner's shards are taken over after the lease TTL, and the messages it had pulled come back after the
    # subscription's ack deadline: both shortened, so that the run converges within the test's time.
    setup_args=("--ack-deadline-s", "10"),
    learner_args=("--lease-ttl-s", "2"),
)
#: Cells an arm's row may hold whatever the traffic (issue #18, point 2): its two counts (impressions, rewards) and a
#: small state per publisher that was live during the run, at most ``CELLS_PER_PUBLISHER`` cells each.
COUNT_CELLS = 2
CELLS_PER_PUBLISHER = 2


def max_arm_row_cells(config: ScaleConfig) -> int:
    """The bound on any arm row's cells in a run of ``config``: counts plus state for each publisher, every replica
    process (the restarted one twice) and every learner (each may publish the counts' fan-out)."""
    publishers = config.replicas + 1 + config.learners
    return COUNT_CELLS + CELLS_PER_PUBLISHER * publishers


@pytest.fixture(scope="module")
def scale_run(
    bigtable_emulator: Emulator, pubsub_emulator: Emulator, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    return run(CONFIG, Path(tmp_path_factory.mktemp("scale")))


def test_six_replicas_three_learners_a_killed_learner_and_a_rolling_restart_count_exactly(
    scale_run: dict[str, Any],
) -> None:
    load = scale_run["load"]
    assert load["server_errors"] == 0, load["statuses"]
    assert load["sent"] == CONFIG.answers and load["statuses"]["/predict 200"] == load["answers"], load["statuses"]
    assert set(load["faults_s"]) == {"learner_killed", "replica_stopped", "replica_back"}
    # Rewards went to another replica than the one that answered, and half of them to a third: all duplicates.
    assert load["rewards_accepted"] > 300 and load["statuses"]["/reward 200"] > 100, load["statuses"]
    assert load["duplicates_wrong"] == []
    assert scale_run["restart"]["exit_code"] == 0
    assert scale_run["learners"]["learner-0"]["killed"]
    for name, exact in scale_run["exact"].items():
        assert (exact["node_differing"], exact["arms_differing"]) == (0, 0), (name, exact)
    assert scale_run["learners"]["all"]["applied"] >= load["answers"] * CONFIG.top_k
    assert scale_run["freshness"]["n"] > 5


@pytest.mark.xfail(
    strict=True,
    reason="issue #18 point 2, not built yet: today a learner leaves a marker cell in an arm's row per message and "
    "per reward, so the hottest row grows with the traffic (89 cells after 1,500 answers here); remove this mark "
    "when rows are bounded (strict: the test fails once the bound holds, so the mark cannot outlive the fix)",
)
def test_no_arm_row_holds_more_than_its_counts_and_a_state_per_publisher(scale_run: dict[str, Any]) -> None:
    rows = scale_run["rows"]
    assert rows["max_arm_row_cells"] <= max_arm_row_cells(CONFIG), rows
