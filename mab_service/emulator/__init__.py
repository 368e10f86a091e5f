"""A local Vertex AI Feature Store for tests and load tests: ``python -m mab_service.emulator --help``.

It is a real grpc.aio server speaking the online-serving wire protocol of both backends (Featurestore
``StreamingReadFeatureValues`` and Feature Store 2.0 ``FetchFeatureValues`` / ``StreamingFetchFeatureValues``)
with the client library's own message classes, so the service's real client talks to it unchanged.
"""

from __future__ import annotations

from mab_service.emulator.control import EmulatorControl
from mab_service.emulator.server import MAX_IDS_PER_READ, Emulator, Faults
from mab_service.emulator.table import FeatureTable, TableError, load_table, parse_table

__all__ = [
    "MAX_IDS_PER_READ",
    "Emulator",
    "EmulatorControl",
    "Faults",
    "FeatureTable",
    "TableError",
    "load_table",
    "parse_table",
]
