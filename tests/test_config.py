from __future__ import annotations

import re
from dataclasses import fields

import pytest

from mab_service.config import ENV_PREFIX, Settings, SettingsError


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.workers, s.features) == ("127.0.0.1", 8000, 1, "demo")
    assert (s.prior_alpha, s.prior_beta, s.max_candidates) == (1.0, 1.0, 10_000)


def test_environment_then_overrides() -> None:
    env = {"MAB_PORT": "9001", "MAB_PRIOR_BETA": "3.5", "MAB_ACCESS_LOG": "yes", "MAB_WORKERS": "2", "OTHER": "x"}
    s = Settings.from_env(env, workers=4, port=None)
    assert s.port == 9001  # from the environment: the override is None
    assert s.workers == 4  # the flag wins over MAB_WORKERS
    assert s.prior_beta == 3.5 and s.access_log is True


def environment_of(settings: Settings) -> dict[str, str]:
    """The MAB_* variables that spell ``settings``, written as a person would (``true``, ``2.5``)."""
    env = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        env[ENV_PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def test_every_field_reads_back_from_its_variable() -> None:
    s = Settings(port=1234, access_log=True, features="csv:/tmp/x.csv", prior_alpha=2.5)
    assert Settings.from_env(environment_of(s)) == s


def test_every_field_has_help_in_its_metadata() -> None:
    assert [f.name for f in fields(Settings) if not f.metadata.get("help")] == []


def test_only_the_metrics_directory_is_exported() -> None:
    env: dict[str, str] = {}
    Settings(metrics_dir="/tmp/m", port=1234).export_metrics_dir(env)
    assert env == {"PROMETHEUS_MULTIPROC_DIR": "/tmp/m"}
    Settings(metrics=False, metrics_dir="/tmp/m").export_metrics_dir(env := {})
    assert env == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAB_PORT": "eighty"}, "MAB_PORT must be a int (got 'eighty')"),
        ({"MAB_ACCESS_LOG": "maybe"}, "MAB_ACCESS_LOG must be a bool"),
        ({"MAB_PRIOR_ALPHA": "nan"}, "prior_alpha must be a finite number > 0 (got nan)"),
        ({"MAB_PRIOR_BETA": "0"}, "prior_beta must be a finite number > 0"),
        ({"MAB_WORKERS": "0"}, "workers must be an integer >= 1"),
        ({"MAB_FEATURES": "redis:x"}, "features must be demo or csv:PATH"),
        ({"MAB_SAMPLER": "fast"}, "sampler must be auto, kernel or reference"),
        ({"MAB_MAX_BODY_BYTES": "10"}, "max_body_bytes must be an integer >= 1024"),
        ({"MAB_MAX_CONNECTIONS": "0"}, "max_connections must be an integer >= 1 (got 0)"),
        ({"MAB_MAX_CLIENT_SHARE": "0"}, "max_client_share must be a number in (0, 1] (got 0.0)"),
        ({"MAB_MAX_CLIENT_SHARE": "1.5"}, "max_client_share must be a number in (0, 1]"),
        ({"MAB_MAX_HELD_IDS": "0"}, "max_held_ids must be an integer >= 1"),
        ({"MAB_DECISION_LOG_SAMPLE": "1.5"}, "decision_log_sample must be a number in [0, 1] (got 1.5)"),
        ({"MAB_DECISION_LOG_SAMPLE": "-0.1"}, "decision_log_sample must be a number in [0, 1] (got -0.1)"),
        ({"MAB_DECISION_LOG_SAMPLE": "nan"}, "decision_log_sample must be a number in [0, 1] (got nan)"),
        ({"MAB_DECISION_LOG_SAMPLE": "half"}, "MAB_DECISION_LOG_SAMPLE must be a float (got 'half')"),
    ],
)
def test_bad_settings_name_the_key_and_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]
