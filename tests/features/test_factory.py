"""The one parser of --features, and the warm-up file formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from mab_service.config import Settings
from mab_service.errors import FeatureSourceError
from mab_service.features.factory import SourceSpec, load_ids, make_source, parse_spec

FEATURE_VIEW = "projects/p/locations/l/featureOnlineStores/s/featureViews/v"
ENTITY_TYPE = "projects/p/locations/l/featurestores/f/entityTypes/e"


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("demo", SourceSpec("demo")),
        ("csv:/tmp/t.csv", SourceSpec("csv", "/tmp/t.csv")),
        (f"vertex-fos:{FEATURE_VIEW}", SourceSpec("vertex-fos", FEATURE_VIEW)),
        (f"vertex:{ENTITY_TYPE}", SourceSpec("vertex", ENTITY_TYPE)),
    ],
)
def test_specs_parse_once_into_backend_and_target(spec: str, parsed: SourceSpec) -> None:
    assert parse_spec(spec) == parsed


@pytest.mark.parametrize("spec", ["", "csv:", "demo:x", f"vertex:{FEATURE_VIEW}", f"vertex-fos:{ENTITY_TYPE}", "s3:x"])
def test_bad_specs_name_every_form(spec: str) -> None:
    with pytest.raises(ValueError, match="demo or csv:PATH or vertex-fos:FEATURE_VIEW or vertex:ENTITY_TYPE"):
        parse_spec(spec)


def test_warm_up_ids_come_one_per_line_or_from_a_csv(tmp_path: Path) -> None:
    lines = tmp_path / "ids.txt"
    lines.write_text("# hot ids\nc1\n\n  c2  \nc1\n", encoding="utf-8")
    assert load_ids(lines) == ["c1", "c2", "c1"]  # duplicates are dropped when the cache preloads
    table = tmp_path / "table.csv"
    table.write_text("alpha,entity_id,beta\n1,a,2\n3,b,4\n", encoding="utf-8")
    assert load_ids(table) == ["a", "b"]
    with pytest.raises(FeatureSourceError, match="cannot read warm-up ids"):
        load_ids(tmp_path / "missing.txt")


def test_warm_up_needs_a_vertex_source_behind_the_cache(tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("c1\n", encoding="utf-8")
    with pytest.raises(FeatureSourceError, match="needs a Vertex source"):
        make_source(Settings(features="demo", warmup_ids=str(ids)))
    with pytest.raises(FeatureSourceError, match="needs the feature cache"):
        make_source(Settings(features=f"vertex-fos:{FEATURE_VIEW}", cache_ttl_s=0, warmup_ids=str(ids)))
    cache = make_source(Settings(features=f"vertex-fos:{FEATURE_VIEW}", warmup_ids=str(ids)))
    assert cache.health().reason == "warming up the feature cache: 0 of 1 ids read"
