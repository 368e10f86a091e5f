"""The fleet's scale run, small: the benchmark's own run (``benchmarks.bench_scale.run``) on the session's emulators,
checked rather than measured.

Six replicas and three learners as real processes, 1,500 answers (half of them ranked within one of four segments)
with rewards posted to other replicas and posted again to a third, one learner killed with SIGKILL and one replica
stopped with SIGTERM and started again mid-run. The run is shared by the tests of this module: one asserts exact
counts (per arm and per segment and arm), duplicates answered ``duplicate`` and no 5xx, the other that rows stay
bounded: an arm's row (and a segment row) its two counts, a shard's row a small state.
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
#: Cells an arm's row holds whatever the traffic (issue #18, point 2): its two counts, impressions and rewards. What
#: makes each addition happen once lives in its shard's row, a small state per live publisher.
COUNT_CELLS = 2
#: A shard row's bytes in this run: the window's counts (at most the run's arms, ~20 bytes each) and an applied set
#: per publisher stream (a few dozen bytes): far below this, whatever the number of answers.
MAX_SHARD_ROW_BYTES = 128 * 1024


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
        # Half the answers ranked within one of four segments: every (segment, arm) exact too, in Bigtable and in
        # every replica's node table.
        assert (exact["segment_node_differing"], exact["segment_arms_differing"]) == (0, 0), (name, exact)
    assert load["segment_pairs_answered"] > 1000, load
    assert scale_run["learners"]["all"]["applied"] >= load["answers"] * CONFIG.top_k
    assert scale_run["freshness"]["n"] > 5


def test_arm_rows_hold_their_counts_and_shard_rows_a_small_state(scale_run: dict[str, Any]) -> None:
    rows = scale_run["rows"]
    assert rows["max_arm_row_cells"] == COUNT_CELLS, rows
    assert rows["segment_rows"] == scale_run["load"]["segment_pairs_answered"], rows
    assert rows["max_segment_row_cells"] == COUNT_CELLS, rows
    assert rows["max_fleet_row_bytes"] <= MAX_SHARD_ROW_BYTES, rows
