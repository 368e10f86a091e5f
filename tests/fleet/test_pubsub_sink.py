"""The Pub/Sub event sink against the emulator: records batched into messages, rewards answered once stored,
refusals instead of silent drops."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from mab_service.fleet.sink import FORMAT_VERSION, PubSubSink, SinkUnavailable
from tests.fleet.conftest import Emulator


def make_topic() -> tuple[str, str]:
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient

    tag = uuid.uuid4().hex[:8]
    topic, subscription = f"projects/fleet/topics/sink-{tag}", f"projects/fleet/subscriptions/sink-{tag}"
    with PublisherClient() as publisher:
        publisher.create_topic(name=topic)
    with SubscriberClient() as subscriber:
        subscriber.create_subscription(name=subscription, topic=topic)
    return topic, subscription


def pull_all(subscription: str, expected: int) -> list[tuple[list[object], dict[str, str]]]:
    from google.cloud.pubsub_v1 import SubscriberClient

    got: list[tuple[list[object], dict[str, str]]] = []
    with SubscriberClient() as subscriber:
        for _ in range(20):
            response = subscriber.pull(subscription=subscription, max_messages=100, timeout=5)
            for received in response.received_messages:
                got.append((orjson.loads(received.message.data), dict(received.message.attributes)))
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=subscription, ack_ids=[m.ack_id for m in response.received_messages]
                )
            if len(got) >= expected:
                break
    return got


def test_records_are_batched_and_a_reward_waits_for_its_message(pubsub_emulator: Emulator) -> None:
    topic, subscription = make_topic()

    async def send() -> PubSubSink:
        sink = PubSubSink(topic, max_records=3, max_delay_s=0.01)
        sink.start()
        for n in range(5):
            sink.event(f"e{n}", [f"arm-{n}", "arm-x"], 100.0 + n)
        await sink.reward("e4", "arm-4", 0.5, 200.0)  # the sixth record: sent with the full second batch
        sink.event("e5", ["arm-5"], 300.0)
        await sink.close()  # sends the rest
        return sink

    sink = asyncio.run(send())
    assert (sink.published, sink.failed, sink.refused, sink.pending) == (3, 0, 0, 0)
    messages = pull_all(subscription, 3)
    assert all(attributes["v"] == FORMAT_VERSION for _, attributes in messages)
    keys = sorted(attributes["k"] for _, attributes in messages)
    assert keys == [f"{sink.publisher_id}/{n}" for n in (1, 2, 3)]
    # Answers as their impressions summed per arm (with the count of answers), rewards as records of their own.
    by_key = {attributes["k"]: batch for batch, attributes in messages}
    assert by_key[f"{sink.publisher_id}/1"] == [["i", 3, {"arm-0": 1, "arm-1": 1, "arm-2": 1, "arm-x": 3}]]
    assert by_key[f"{sink.publisher_id}/2"] == [
        ["i", 2, {"arm-3": 1, "arm-4": 1, "arm-x": 2}],
        ["r", 200.0, "e4", "arm-4", 0.5],
    ]
    assert by_key[f"{sink.publisher_id}/3"] == [["i", 1, {"arm-5": 1}]]


def test_a_reward_pubsub_refuses_is_503(pubsub_emulator: Emulator) -> None:
    async def send() -> None:
        sink = PubSubSink(f"projects/fleet/topics/missing-{uuid.uuid4().hex[:8]}", max_delay_s=0.001)
        sink.start()
        try:
            with pytest.raises(SinkUnavailable, match="publishing to projects/fleet/topics/missing-") as refused:
                await asyncio.wait_for(sink.reward("e1", "arm-1", 1.0, 0.0), timeout=60)
            assert refused.value.status_code == 503
            assert sink.failed == 1
        finally:
            await sink.close(timeout_s=1.0)  # what it still holds can never be published: not worth 30 s

    asyncio.run(send())


def test_past_max_pending_events_and_rewards_are_refused(pubsub_emulator: Emulator) -> None:
    topic, _ = make_topic()

    async def send() -> None:
        sink = PubSubSink(topic, max_pending=0)
        sink.start()
        try:
            with pytest.raises(SinkUnavailable, match="not yet stored") as refused:
                sink.event("e1", ["arm-1"], 0.0)
            assert refused.value.status_code == 503
            with pytest.raises(SinkUnavailable, match="not yet stored"):
                sink.check()  # what a replica asks before it claims a reward
            assert sink.refused == 2
        finally:
            await sink.close()

    asyncio.run(send())


def test_a_refused_message_is_sent_again_under_its_key_with_its_claimed_reward(pubsub_emulator: Emulator) -> None:
    """Pub/Sub refuses while the topic is missing; once it exists the message arrives, once, with its events and the
    reward that was answered 503 (claimed on its event's row, so only this message can carry it)."""
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient

    tag = uuid.uuid4().hex[:8]
    topic, subscription = f"projects/fleet/topics/later-{tag}", f"projects/fleet/subscriptions/later-{tag}"

    async def send() -> PubSubSink:
        sink = PubSubSink(topic, max_delay_s=0.001, retry_s=0.2)
        sink.start()
        sink.event("e1", ["arm-1", "arm-2"], 1.0)
        with pytest.raises(SinkUnavailable, match="failed"):
            await asyncio.wait_for(sink.reward("e1", "arm-1", 1.0, 2.0), timeout=60)
        assert sink.pending == 1  # the message waits to be sent again
        with PublisherClient() as publisher:
            publisher.create_topic(name=topic)
        with SubscriberClient() as subscriber:
            subscriber.create_subscription(name=subscription, topic=topic)
        await sink.close(timeout_s=60)
        return sink

    sink = asyncio.run(send())
    assert sink.pending == 0 and sink.failed >= 1 and sink.published == 1
    messages = pull_all(subscription, 1)
    assert [batch for batch, _ in messages] == [[["i", 1, {"arm-1": 1, "arm-2": 1}], ["r", 2.0, "e1", "arm-1", 1.0]]]
    assert messages[0][1]["k"] == f"{sink.publisher_id}/1"


def test_past_max_pending_bytes_events_and_rewards_are_refused(pubsub_emulator: Emulator) -> None:
    """The outbox is bounded in bytes as well as in messages: a batch's bytes count from the first record (an
    answer's new arms in the batch's sums, estimated until the batch is encoded)."""
    topic, subscription = make_topic()

    async def send() -> list[str]:
        sink = PubSubSink(topic, max_delay_s=60, max_pending_bytes=1000)  # one batch, sent by close
        sink.start()
        sent: list[str] = []
        try:
            while True:
                big = [f"arm-{len(sent)}-{n}-" + "x" * 100 for n in range(3)]  # new arms: the sums grow
                try:
                    sink.event(f"e{len(sent)}", big, float(len(sent)))
                except SinkUnavailable as exc:
                    assert exc.status_code == 503 and "bytes" in exc.message
                    break
                sent.extend(big)
            # Each id: its JSON string and at most 8 bytes of ':n,'; the batch's brackets and its "i" record's head.
            assert sink.pending == 1 and sink.pending_bytes == 1 + 16 + sum(len(id_) + 2 + 8 for id_ in sent) >= 1000
            assert len(sent) == 9  # ~360 bytes per answer: the fourth would pass 1000
            with pytest.raises(SinkUnavailable, match="not yet stored"):
                sink.check()
            assert sink.refused == 2
        finally:
            await sink.close()
        assert (sink.pending, sink.pending_bytes, sink.published) == (0, 0, 1)
        return sent

    sent = asyncio.run(send())
    (message,) = pull_all(subscription, 1)
    assert message[0] == [["i", 3, dict.fromkeys(sent, 1)]]


def test_close_sends_what_waits_for_a_retry_at_once(pubsub_emulator: Emulator) -> None:
    """A replica stopping delivers what Pub/Sub refused a moment ago without waiting out the retry delay."""
    from google.cloud.pubsub_v1 import PublisherClient, SubscriberClient

    tag = uuid.uuid4().hex[:8]
    topic, subscription = f"projects/fleet/topics/close-{tag}", f"projects/fleet/subscriptions/close-{tag}"

    async def send() -> PubSubSink:
        sink = PubSubSink(topic, max_delay_s=0.001, retry_s=3600)
        sink.start()
        sink.event("e1", ["arm-1"], 1.0)
        with pytest.raises(SinkUnavailable, match="failed"):
            await asyncio.wait_for(sink.reward("e1", "arm-1", 1.0, 2.0), timeout=60)
        with PublisherClient() as publisher:
            publisher.create_topic(name=topic)
        with SubscriberClient() as subscriber:
            subscriber.create_subscription(name=subscription, topic=topic)
        await sink.close(timeout_s=60)
        return sink

    sink = asyncio.run(send())
    assert (sink.pending, sink.published, sink.undelivered) == (0, 1, 0)
    assert [batch for batch, _ in pull_all(subscription, 1)] == [
        [["i", 1, {"arm-1": 1}], ["r", 2.0, "e1", "arm-1", 1.0]]
    ]


def test_close_counts_and_logs_what_it_could_not_deliver(
    pubsub_emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    async def send() -> PubSubSink:
        sink = PubSubSink(f"projects/fleet/topics/never-{uuid.uuid4().hex[:8]}", max_delay_s=0.001, retry_s=0.1)
        sink.start()
        sink.event("e1", ["arm-1"], 1.0)
        sink.event("e2", ["arm-2"], 1.0)
        await sink.close(timeout_s=1.0)
        return sink

    sink = asyncio.run(send())
    assert sink.undelivered == 1 and sink.published == 0
    assert "1 messages (2 events) to projects/fleet/topics/never-" in caplog.text
    assert "were not stored by Pub/Sub within 1.0 s at close" in caplog.text
