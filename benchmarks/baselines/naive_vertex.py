"""Baseline Vertex feature source, written the ordinary way, served by the same mab_service app.

Same client as ``mab_service.features.vertex`` (``FeaturestoreOnlineServingServiceAsyncClient``,
``streaming_read_feature_values``), but: chunks of 100 read one after another, fields read through the proto-plus
wrappers, no cache, no deadline or retries. Only the feature source differs from the service under test, so the
benchmark compares feature paths. Run it with::

    VERTEX_FEATURESTORE_EMULATOR_HOST=127.0.0.1:8086 python -m benchmarks.baselines.naive_vertex --port 8002 \\
        --entity-type projects/p/locations/l/featurestores/f/entityTypes/e
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import grpc
import numpy as np
import uvicorn
from google.cloud import aiplatform_v1
from google.cloud.aiplatform_v1.services.featurestore_online_serving_service.transports import grpc_asyncio

from mab_service.app import build_app
from mab_service.config import Settings
from mab_service.features.source import Features, Health

CHUNK = 100


class NaiveVertexSource:
    """Sequential chunks, proto-plus decoding, no cache."""

    name = "naive-vertex"

    def __init__(self, entity_type: str, emulator_host: str, prior: tuple[float, float] = (1.0, 1.0)) -> None:
        self.entity_type = entity_type
        self.emulator_host = emulator_host
        self.prior = prior
        self.client: aiplatform_v1.FeaturestoreOnlineServingServiceAsyncClient | None = None

    async def start(self) -> None:
        channel = grpc.aio.insecure_channel(self.emulator_host)
        transport = grpc_asyncio.FeaturestoreOnlineServingServiceGrpcAsyncIOTransport(channel=channel)
        self.client = aiplatform_v1.FeaturestoreOnlineServingServiceAsyncClient(transport=transport)

    async def fetch(self, ids: list[str]) -> Features:
        assert self.client is not None
        found: dict[str, tuple[float, float]] = {}
        selector = aiplatform_v1.FeatureSelector(id_matcher=aiplatform_v1.IdMatcher(ids=["alpha", "beta"]))
        for start in range(0, len(ids), CHUNK):
            request = aiplatform_v1.StreamingReadFeatureValuesRequest(
                entity_type=self.entity_type, entity_ids=ids[start : start + CHUNK], feature_selector=selector
            )
            stream = await self.client.streaming_read_feature_values(request=request)
            async for response in stream:
                if not response.entity_view.entity_id:
                    continue  # the header
                data = response.entity_view.data
                alpha = data[0].value.double_value
                beta = data[1].value.double_value
                if alpha > 0 and beta > 0:
                    found[response.entity_view.entity_id] = (alpha, beta)
        params = [found.get(i, self.prior) for i in ids]
        return Features(
            np.array([p[0] for p in params], dtype=np.float64),
            np.array([p[1] for p in params], dtype=np.float64),
            sum(1 for i in ids if i in found),
        )

    def health(self) -> Health:
        return Health(self.client is not None, "" if self.client else "not started")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.transport.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.baselines.naive_vertex")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--entity-type", required=True)
    parser.add_argument("--emulator", default=os.environ.get("VERTEX_FEATURESTORE_EMULATOR_HOST"))
    args = parser.parse_args(argv)
    if not args.emulator:
        parser.error("--emulator or VERTEX_FEATURESTORE_EMULATOR_HOST is required")
    app = build_app(Settings(), source=NaiveVertexSource(args.entity_type, args.emulator))
    uvicorn.run(
        app, host=args.host, port=args.port, loop="uvloop", http="httptools", access_log=False, log_level="warning"
    )


if __name__ == "__main__":
    main()
