"""Shared types: what the lifespan hands to every request."""

from __future__ import annotations

from typing import Any, TypedDict

from mab_service.config import Settings
from mab_service.features.source import FeatureSource
from mab_service.policy.sampler import TopK


class AppState(TypedDict):
    settings: Settings
    source: FeatureSource
    top_k: TopK
    openapi: dict[str, Any]
