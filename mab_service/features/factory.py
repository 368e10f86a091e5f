"""The one place the ``--features`` spec is used: ``parse_spec`` (``specs``) checks it, ``make_source`` builds the
source.

Specs (``Settings.features``):

- ``demo``: the bundled catalogue (``local.LocalSource``);
- ``csv:PATH``: an embedded table loaded at start (``local.LocalSource``);
- ``vertex-fos:projects/P/locations/L/featureOnlineStores/S/featureViews/V``: Feature Store 2.0
  (``vertex_fos.FeatureViewSource``), behind the cache unless ``cache_ttl_s`` is 0;
- ``vertex:projects/P/locations/L/featurestores/F/entityTypes/E``: Feature Store (Legacy), deprecated, switched
  off by Google on 2027-02-17 (``vertex.VertexSource``), behind the cache likewise;
- ``bigtable:projects/P/instances/I/tables/T``: the fleet's counts, kept by the learners (``bigtable.BigtableSource``),
  behind the cache with ``fleet_cache_ttl_s``.

Backends are imported only when built: the Vertex client library is an optional dependency.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from mab_service.errors import FeatureSourceError
from mab_service.features.options import VertexOptions
from mab_service.features.source import FeatureSource
from mab_service.specs import SPEC_FORMS as SPEC_FORMS, SourceSpec as SourceSpec, parse_spec as parse_spec

if TYPE_CHECKING:
    from mab_service.config import Settings
    from mab_service.features.segments import StoreSegments


def make_source(settings: Settings) -> FeatureSource:
    """The feature source ``settings.features`` names, with the cache and warm-up the settings ask for.

    Raises:
        FeatureSourceError: If the spec is malformed, or the warm-up file cannot be read or is given for a source
            without a cache.
    """
    try:
        spec = parse_spec(settings.features)
    except ValueError as exc:
        raise FeatureSourceError(str(exc)) from None
    if spec.kind in ("demo", "csv"):
        from mab_service.features.local import LocalSource

        if settings.warmup_ids:
            raise FeatureSourceError("warmup_ids needs a Vertex source: the embedded table is in memory already")
        if spec.kind == "demo":
            return LocalSource.demo(settings.prior_alpha, settings.prior_beta)
        return LocalSource(Path(spec.target), settings.prior_alpha, settings.prior_beta)
    source: FeatureSource
    ttl_s = settings.cache_ttl_s
    if spec.kind == "bigtable":
        from mab_service.features.bigtable import BigtableSource

        # A read that fails within the request's wait gives the prior, marked degraded, instead of a 503.
        timeout_s = min(settings.vertex_read_budget_s, settings.vertex_deadline_s)
        source = BigtableSource(
            spec.target,
            settings.prior_alpha,
            settings.prior_beta,
            timeout_s=timeout_s,
            half_life_s=settings.half_life_s,
        )
        ttl_s = settings.fleet_cache_ttl_s
    elif spec.kind == "vertex":
        from mab_service.features.vertex import VertexSource

        source = VertexSource(spec.target, VertexOptions.from_settings(settings))
    else:
        from mab_service.features.vertex_fos import FeatureViewSource

        source = FeatureViewSource(spec.target, VertexOptions.from_settings(settings))
    if ttl_s <= 0:
        if settings.warmup_ids:
            raise FeatureSourceError("warmup_ids needs the feature cache (cache_ttl_s > 0)")
        return source
    from mab_service.features.cache import REFRESH_RETRY_S, FeatureCache

    cache = FeatureCache(
        source,
        ttl_s=ttl_s,
        max_entries=settings.cache_max_entries,
        stale_s=settings.cache_stale_while_revalidate_s,
        retry_s=max(REFRESH_RETRY_S, settings.vertex_deadline_s),
        wait_s=settings.vertex_deadline_s,
        prior_alpha=settings.prior_alpha,
        prior_beta=settings.prior_beta,
    )
    if settings.warmup_ids:
        cache.preload(load_ids(Path(settings.warmup_ids)), settings.warmup_timeout_s)
    return cache


def store_segments(settings: Settings, source: FeatureSource) -> StoreSegments | None:
    """Segments read from ``source`` (the one ``make_source`` made, or a layer around it) where ``settings.features``
    names a Vertex store, which holds them under pair entities (``features.segments``); None for the other sources,
    whose segments are the node's table's or none."""
    if not parse_spec(settings.features).vertex:
        return None
    from mab_service.features.segments import StoreSegments

    return StoreSegments(source)


def load_ids(path: Path) -> list[str]:
    """The ids of a warm-up file: one id per line (blank lines and ``#`` comments skipped), or a CSV whose header
    names ``entity_id`` (the embedded table's and the emulator's format).

    Raises:
        FeatureSourceError: If the file cannot be read.
    """
    try:
        with path.open(encoding="utf-8", newline="") as f:
            first = f.readline()
            header = [h.strip() for h in next(csv.reader([first]), [])]
            if "," in first and "entity_id" in header:
                column = header.index("entity_id")
                return [row[column].strip() for row in csv.reader(f) if len(row) > column and row[column].strip()]
            lines = (line.strip() for line in itertools.chain([first], f))
            return [line for line in lines if line and not line.startswith("#")]
    except OSError as exc:
        raise FeatureSourceError(f"cannot read warm-up ids {path}: {exc.strerror}") from None
