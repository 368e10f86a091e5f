"""What the lifespan hands to every request."""

from __future__ import annotations

from typing import Any, TypedDict

from mab_service.config import Settings
from mab_service.features.source import FeatureSource
from mab_service.http.admission import Admission
from mab_service.learning._answer import NativeAnswer
from mab_service.learning.posteriors import SegmentSource
from mab_service.learning.protocol import Loop
from mab_service.policy.sampler import TopK


class AppState(TypedDict):
    settings: Settings
    source: FeatureSource
    top_k: TopK
    openapi: dict[str, Any]
    admission: Admission
    """This worker's admission and drain state (``draining`` turns /health to 503)."""
    loop: Loop | None
    """This worker's side of the learning loop; None with ``learning`` off."""
    segments: SegmentSource | None
    """Where a request with a segment is ranked: the node's arm table where the loop counts segments, else None
    (such requests are refused)."""
    native: NativeAnswer | None
    """The native /predict, where the node's loop ranks from its own table with the kernel (the default): a body it
    takes is answered in one native pass; else None, and every body takes the Python path."""
