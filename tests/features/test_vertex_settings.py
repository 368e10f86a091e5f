"""Vertex settings: specs, the emulator variable, validation, and what make_source builds from them."""

from __future__ import annotations

import pytest

from mab_service.config import Settings, SettingsError
from mab_service.features.cache import FeatureCache
from mab_service.features.factory import make_source
from mab_service.features.options import VertexOptions
from mab_service.features.vertex import VertexSource
from mab_service.features.vertex_fos import FeatureViewSource
from tests.test_config import environment_of

ENTITY_TYPE = "vertex:projects/p/locations/us-east1/featurestores/f/entityTypes/e"
FEATURE_VIEW = "vertex-fos:projects/p/locations/us-east1/featureOnlineStores/s/featureViews/v"


def test_the_google_emulator_variable_is_read_unless_ours_is_set() -> None:
    assert Settings.from_env({"VERTEX_FEATURESTORE_EMULATOR_HOST": "127.0.0.1:9"}).vertex_emulator_host == "127.0.0.1:9"
    both = {"VERTEX_FEATURESTORE_EMULATOR_HOST": "127.0.0.1:9", "MAB_VERTEX_EMULATOR_HOST": "127.0.0.1:10"}
    assert Settings.from_env(both).vertex_emulator_host == "127.0.0.1:10"
    assert Settings.from_env(both, vertex_emulator_host="127.0.0.1:11").vertex_emulator_host == "127.0.0.1:11"


def test_vertex_settings_round_trip_through_the_environment() -> None:
    s = Settings(features=FEATURE_VIEW, vertex_mapping="counts", vertex_api_version="v1beta1", cache_ttl_s=0.0)
    assert Settings.from_env(environment_of(s)) == s


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MAB_FEATURES": "vertex:projects/p/locations/l"},
            "features must be demo or csv:PATH or vertex-fos:FEATURE_VIEW or vertex:ENTITY_TYPE",
        ),
        ({"MAB_FEATURES": "vertex-fos:" + ENTITY_TYPE[7:]}, "features must be demo or csv:PATH"),
        ({"MAB_VERTEX_MAPPING": "ratio"}, "vertex_mapping must be beta or counts"),
        ({"MAB_VERTEX_API_VERSION": "v2"}, "vertex_api_version must be v1 or v1beta1"),
        ({"MAB_VERTEX_CHUNK_SIZE": "101"}, "vertex_chunk_size must be an integer in [1, 100] (got 101)"),
        ({"MAB_VERTEX_DEADLINE_S": "0"}, "vertex_deadline_s must be a finite number > 0"),
        ({"MAB_VERTEX_RETRIES": "-1"}, "vertex_retries must be an integer >= 0"),
        ({"MAB_CACHE_MAX_ENTRIES": "0"}, "cache_max_entries must be an integer >= 1"),
        ({"MAB_CACHE_TTL_S": "-1"}, "cache_ttl_s must be a finite number >= 0"),
    ],
)
def test_bad_vertex_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        Settings.from_env(env)


def test_make_source_puts_the_cache_in_front_unless_its_ttl_is_zero() -> None:
    cached = make_source(Settings(features=ENTITY_TYPE, cache_max_entries=10, vertex_chunk_size=50))
    assert isinstance(cached, FeatureCache) and isinstance(cached.source, VertexSource)
    assert cached.stats()["max_entries"] == 10 and cached.source.options.chunk_size == 50
    assert cached.source.location == "us-east1"
    plain = make_source(Settings(features=FEATURE_VIEW, cache_ttl_s=0.0, vertex_api_version="v1beta1"))
    assert isinstance(plain, FeatureViewSource) and plain.streaming


def test_options_pick_the_features_the_mapping_reads() -> None:
    assert VertexOptions(alpha_feature="a", beta_feature="b").feature_ids == ("a", "b")
    counts = VertexOptions(mapping="counts", clicks_feature="c", impressions_feature="i")
    assert counts.feature_ids == ("c", "i")
