"""Draw a logged answer again, and estimate its propensities, from the decision log.

    python -m mab_service.learning.replay STATE_DIR EVENT_ID [--propensities DRAWS]

prints the answer drawn again from the logged (alpha, beta), seed and top_k, whether it equals the logged ranking,
and with ``--propensities`` the probability that Thompson sampling from the same posteriors puts each returned id
at its position, estimated from DRAWS fresh draws (the propensities off-policy estimators such as inverse
propensity scoring divide by). Where the log keeps a share of the answers (``sample_rate``, ``decision_log_sample``),
each logged answer stands for 1 / sample_rate answers: an estimator divides by that share as well.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import orjson

from mab_service.learning import decisions
from mab_service.learning.decisions import Decision
from mab_service.policy.sampler import sample_beta, sample_top_k
from mab_service.schemas import decode_predict


def logged(state_dir: Path) -> Iterator[Decision]:
    """Every decision in the state directory's decision log, file by file, oldest file first."""
    for path in decisions.files(state_dir / "decisions"):
        yield from decisions.read_file(path)


def find(state_dir: Path, event_id: str) -> Decision | None:
    return next((d for d in logged(state_dir) if d.event_id == event_id), None)


def candidates(decision: Decision) -> list[str]:
    """The request's distinct candidates, in the order the sampler saw them: as the file named their rows, or from
    the body as it arrived."""
    if decision.ids is not None:
        return decision.ids
    return decode_predict(decision.body, max_candidates=len(decision.body)).candidates


def redraw(decision: Decision) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The ranking and scores the same posteriors and seed give: the logged answer, exactly."""
    k = len(decision.alpha) if decision.top_k is None else min(decision.top_k, len(decision.alpha))
    return sample_top_k(decision.alpha, decision.beta, k, seed=decision.seed)


def propensities(decision: Decision, draws: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """For each position j of the logged ranking, the share of ``draws`` Thompson draws that put the same arm at j."""
    ranking = decision.ranking
    hits = np.zeros(len(ranking))
    batch = max(1, 1_000_000 // max(1, len(decision.alpha)))
    done = 0
    while done < draws:
        m = min(batch, draws - done)
        samples = sample_beta(np.tile(decision.alpha, m), np.tile(decision.beta, m), seed=seed + done)
        samples = samples.reshape(m, len(decision.alpha))
        # Rank by descending sample, ties to the lower index, as the kernel does.
        order = np.argsort(-samples, axis=1, kind="stable")[:, : len(ranking)]
        hits += (order == ranking).sum(axis=0)
        done += m
    return hits / draws


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mab_service.learning.replay", description=__doc__.split("\n")[0])
    parser.add_argument("state_dir", type=Path, help="the service's --state-dir")
    parser.add_argument("event_id", help="the event_id of the answer")
    parser.add_argument("--propensities", type=int, default=0, metavar="DRAWS", help="estimate from DRAWS draws")
    args = parser.parse_args(argv)
    decision = find(args.state_dir, args.event_id)
    if decision is None:
        print(f"no decision {args.event_id!r} in {args.state_dir / 'decisions'}", file=sys.stderr)
        return 1
    ids = candidates(decision)
    ranking, scores = redraw(decision)
    report = {
        "event_id": decision.event_id,
        "t": decision.t,
        "user_id": decision.user_id,
        "seed": decision.seed,
        "segment": decision.segment,
        "sample_rate": decision.sample_rate,
        "ids": [ids[i] for i in ranking.tolist()],
        "scores": scores.tolist(),
        "same_as_logged": bool(np.array_equal(ranking, decision.ranking)),
    }
    if args.propensities:
        report["propensities"] = propensities(decision, args.propensities).tolist()
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
