"""The fleet's commands: ``mab-service setup`` (create the topic, subscription and table) and ``mab-service learn``
(run a learner). ``__main__`` hands ``setup`` and ``learn`` command lines here."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import sys

from mab_service.errors import MabError
from mab_service.fleet import setup as fleet_setup

FAILURE = 3


def setup_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mab-service setup",
        description="Create the fleet's Pub/Sub topic and subscription (with a dead-letter topic) and its Bigtable "
        "table where missing; leave what exists. Safe to run twice. BIGTABLE_EMULATOR_HOST and PUBSUB_EMULATOR_HOST "
        "select emulators.",
    )
    parser.add_argument("--events", required=True, metavar="pubsub:projects/P/topics/T")
    parser.add_argument("--subscription", required=True, metavar="projects/P/subscriptions/S")
    parser.add_argument("--posteriors", required=True, metavar="bigtable:projects/P/instances/I/tables/T")
    parser.add_argument(
        "--retention-s",
        type=int,
        default=fleet_setup.DEFAULT_RETENTION_S,
        help="how long the subscription keeps an unacknowledged message; the learners' deduplication markers "
        f"live {fleet_setup.MARKER_MARGIN_S} s longer",
    )
    parser.add_argument("--ack-deadline-s", type=int, default=fleet_setup.DEFAULT_ACK_DEADLINE_S)
    parser.add_argument(
        "--max-delivery-attempts",
        type=int,
        default=fleet_setup.DEFAULT_MAX_DELIVERY_ATTEMPTS,
        help="deliveries of a message the learners cannot decode before the subscription forwards it to the "
        f"dead-letter topic <topic>{fleet_setup.DEAD_LETTER_SUFFIX} ({fleet_setup.MIN_DELIVERY_ATTEMPTS} to "
        f"{fleet_setup.MAX_DELIVERY_ATTEMPTS})",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=None,
        help="arm shards, each with a topic and a subscription of its own, so that each arm is written by one learner "
        f"per window (default: what the table has, else {fleet_setup.DEFAULT_SHARDS}); fixed by the first setup",
    )
    args = parser.parse_args(argv)
    try:
        resources = fleet_setup.FleetResources(
            topic=fleet_setup.topic_path(args.events),
            subscription=fleet_setup.subscription_path(args.subscription),
            table=fleet_setup.table_path(args.posteriors),
            retention_s=args.retention_s,
            ack_deadline_s=args.ack_deadline_s,
            max_delivery_attempts=args.max_delivery_attempts,
            shards=args.shards,
        )
        fleet_setup.setup(resources)
    except MabError as exc:
        print(f"mab-service setup: {exc.message}", file=sys.stderr)
        return FAILURE
    return 0


def learn_main(argv: list[str]) -> int:
    from mab_service.fleet.learner import (
        DEFAULT_LEASE_TTL_S,
        DEFAULT_METRICS_PORT,
        DEFAULT_WINDOW_S,
        Learner,
        LearnerError,
    )

    parser = argparse.ArgumentParser(
        prog="mab-service learn",
        description="Apply the fleet's events and rewards from a Pub/Sub subscription to the counts in a Bigtable "
        "table, exactly once. Learners share the table's arm shards through leases (as many learners as shards "
        "do work). SIGTERM finishes the current window and releases the leases.",
    )
    parser.add_argument("--events", required=True, metavar="pubsub:projects/P/subscriptions/S")
    parser.add_argument("--posteriors", required=True, metavar="bigtable:projects/P/instances/I/tables/T")
    parser.add_argument(
        "--window-s",
        type=float,
        default=DEFAULT_WINDOW_S,
        help="how long a window collects messages after its first (a write per arm it touches per window)",
    )
    parser.add_argument("--max-messages", type=int, default=1000, help="messages per window at most")
    parser.add_argument("--concurrency", type=int, default=64, help="shards of a window written at once")
    parser.add_argument(
        "--lease-ttl-s",
        type=float,
        default=DEFAULT_LEASE_TTL_S,
        help="how long a shard's lease lasts unrenewed: a killed learner's shards are taken over after it",
    )
    parser.add_argument(
        "--half-life-s",
        type=float,
        default=0.0,
        help="the fleet's half-life (0: counts do not decay); must be the replicas' serve --half-life-s",
    )
    parser.add_argument("--log-every-s", type=float, default=10.0, help="seconds between progress lines")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="port of the Prometheus /metrics endpoint (0: none)",
    )
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address the /metrics endpoint listens on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if not (math.isfinite(args.half_life_s) and args.half_life_s >= 0):
        print(
            f"mab-service learn: --half-life-s must be a finite number >= 0 (got {args.half_life_s})", file=sys.stderr
        )
        return FAILURE
    try:
        subscription = fleet_setup.subscription_path(args.events)
        table = fleet_setup.table_path(args.posteriors)
    except MabError as exc:
        print(f"mab-service learn: {exc.message}", file=sys.stderr)
        return FAILURE

    async def run() -> None:
        learner = Learner(
            subscription,
            str(table),
            window_s=args.window_s,
            max_messages=args.max_messages,
            concurrency=args.concurrency,
            lease_ttl_s=args.lease_ttl_s,
            half_life_s=args.half_life_s,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = None
        try:
            await learner.start()
            if args.metrics_port:
                from prometheus_client import start_http_server

                try:
                    server, _ = start_http_server(
                        args.metrics_port, args.metrics_host, registry=learner.metrics.registry
                    )
                except OSError as exc:
                    raise LearnerError(f"cannot serve metrics on port {args.metrics_port}: {exc}") from None
            print(f"learning from {subscription} into {table}", file=sys.stderr, flush=True)
            await learner.run(stop, log_every_s=args.log_every_s)
        finally:
            if server is not None:
                server.shutdown()
            await learner.close()

    try:
        asyncio.run(run())
    except MabError as exc:
        print(f"mab-service learn: {exc.message}", file=sys.stderr)
        return FAILURE
    return 0


def main(argv: list[str]) -> int:
    """``argv`` starts with ``setup`` or ``learn``."""
    command, rest = argv[0], argv[1:]
    return setup_main(rest) if command == "setup" else learn_main(rest)
