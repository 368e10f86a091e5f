"""The fleet's bytes per unit of work, with the service's own encoders: what docs/fleet.md's plan for 3 M answers/s
multiplies.

    python -m benchmarks.fleet_costs [--rates 1000,6600] [--shards 16] [--arms 10000] [--top-k 10]
                                     [--reward-rate 0.05] [--seconds 2] [--json]

A replica's sink (``fleet.sink.PubSubSink``) is fed answers of ``--top-k`` ids drawn from ``--arms`` arms of Zipf(1.1)
popularity at each of ``--rates`` answers/s, in 20 ms batches as its timer cuts them, a reward for ``--reward-rate``
of the impressions; its publisher is replaced by one that keeps each message's data and attributes. Printed per rate:
messages per second, their mean size, the bytes Pub/Sub bills (a publish request is billed at least 1,000 bytes, and
the sink sends one message per request) per answer; the membership row's ``MutateRows`` entry per answer
(``fleet.requests.membership_entry``); and the counts' fan-out per node: a window's message for the arms a learner
wrote (``fleet.fanout.CountsMessage``) per window and per second at two windows a second.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import secrets
from typing import Any

import numpy as np

from mab_service.fleet.fanout import CountsMessage
from mab_service.fleet.requests import membership_entry
from mab_service.fleet.sink import PubSubSink, shard_of

#: Pub/Sub bills each publish, pull or push request at least this many bytes (Pub/Sub pricing).
MIN_BILLED_BYTES = 1000
#: Per message, Pub/Sub also bills 20 bytes of timestamp and the message id (~16 bytes).
MESSAGE_OVERHEAD_BYTES = 36
BATCH_S = 0.02


class _Keeper:
    """A publisher that stores each message instead of sending it (the sink's ``_publisher``)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def publish(self, topic: str, data: bytes, **attributes: Any) -> concurrent.futures.Future[str]:
        attributes.pop("retry", None)
        attributes.pop("timeout", None)
        self.sizes.append(len(data) + sum(len(k) + len(str(v)) for k, v in attributes.items()))
        future: concurrent.futures.Future[str] = concurrent.futures.Future()
        future.set_result("1")
        return future


def zipf_ids(arms: int) -> tuple[list[str], np.ndarray]:
    weights = 1.0 / np.arange(1, arms + 1) ** 1.1
    return [f"article-{i:05d}" for i in range(arms)], weights / weights.sum()


async def replica_bytes(rate: int, args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(7)
    ids, p = zipf_ids(args.arms)
    sink = PubSubSink("projects/p/topics/t", shards=args.shards, max_delay_s=3600.0)
    keeper = _Keeper()
    sink._publisher = keeper  # measured, not sent
    per_batch = max(1, round(rate * BATCH_S))
    batches = round(args.seconds / BATCH_S)
    membership = 0
    answers = 0
    for b in range(batches):
        t = 1.8e9 + b * BATCH_S
        for _ in range(per_batch):
            shown = [ids[i] for i in rng.choice(args.arms, size=args.top_k, replace=False, p=p)]
            event_id = secrets.token_hex(16)
            sink.event(event_id, shown, t)
            membership += len(membership_entry(event_id, shown, t))
            answers += 1
            for id_ in shown:
                if rng.random() < args.reward_rate:
                    sink._add(["r", t, event_id, id_, 1.0], shard_of(id_, args.shards))
        sink.flush()
        await asyncio.sleep(0)
    await asyncio.sleep(0.05)  # the futures' callbacks
    sizes = np.array(keeper.sizes, dtype=np.float64)
    seconds = batches * BATCH_S
    billed = np.maximum(sizes + MESSAGE_OVERHEAD_BYTES, MIN_BILLED_BYTES)
    return {
        "answers_per_s": answers / seconds,
        "messages_per_s": len(sizes) / seconds,
        "message_bytes_mean": float(sizes.mean()),
        "published_bytes_per_answer": float(sizes.sum() / answers),
        "billed_bytes_per_answer": float(billed.sum() / answers),
        "membership_entry_bytes_per_answer": membership / answers,
    }


def fanout_bytes(args: argparse.Namespace) -> dict[str, float]:
    ids = [f"article-{i:05d}" for i in range(args.arms)]
    counts = list(range(1_000_000, 1_000_000 + args.arms))
    message = CountsMessage("learner-1", 12345, 1.8e9, ids, counts, [c * 50_000 for c in counts])
    size = len(message.encode())
    return {"arms": args.arms, "window_message_bytes": size, "bytes_per_s_per_node_at_2_windows_per_s": 2 * size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="1000,6600")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--arms", type=int, default=10_000)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--reward-rate", type=float, default=0.05)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    doc: dict[str, Any] = {"replica": {}, "fanout": fanout_bytes(args)}
    for rate in (int(r) for r in args.rates.split(",")):
        doc["replica"][rate] = asyncio.run(replica_bytes(rate, args))
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{args.shards} shards, {args.arms} arms (Zipf 1.1), top_k {args.top_k}, rewards {args.reward_rate:.0%}")
    print("answers/s  messages/s  mean message B  published B/answer  billed B/answer  membership B/answer")
    for rate, r in doc["replica"].items():
        print(
            f"{rate:>9,} {r['messages_per_s']:>11,.0f} {r['message_bytes_mean']:>15,.0f} "
            f"{r['published_bytes_per_answer']:>19,.1f} {r['billed_bytes_per_answer']:>16,.1f} "
            f"{r['membership_entry_bytes_per_answer']:>20,.1f}"
        )
    f = doc["fanout"]
    print(
        f"fan-out: a window of {f['arms']:,} arms is {f['window_message_bytes']:,} bytes; "
        f"{f['bytes_per_s_per_node_at_2_windows_per_s']:,} B/s to each node at two windows a second"
    )


if __name__ == "__main__":
    main()
