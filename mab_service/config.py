"""Settings: one typed, frozen object, built once at startup.

Every field is reachable three ways, in this order of precedence: a ``mab-service serve`` flag, an
environment variable ``MAB_<FIELD>`` (upper case), and the default below. This module is the only one
that reads or writes ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "MAB_"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names the key and the bad value."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    """Address to listen on; ``0.0.0.0`` in containers."""
    port: int = 8000
    """TCP port to listen on."""
    workers: int = 1
    """Worker processes sharing the port; one per core on a bare node, one per container on Kubernetes."""
    features: str = "demo"
    """Feature source: ``demo`` (the bundled catalogue) or ``csv:PATH`` (an embedded table loaded at start)."""
    prior_alpha: float = 1.0
    """Beta prior alpha for candidates the feature source does not know."""
    prior_beta: float = 1.0
    """Beta prior beta for candidates the feature source does not know."""
    max_candidates: int = 10_000
    """Most candidates one request may carry (after removing duplicates the count can only shrink)."""
    max_body_bytes: int = 1_048_576
    """Largest request body accepted, in bytes; larger bodies get 413 before they are read."""
    sampler: str = "auto"
    """Sampler: ``auto`` or ``kernel`` (the C++ kernel) or ``reference`` (numpy, for comparison)."""
    log_level: str = "info"
    """Log level: critical, error, warning, info, debug."""
    access_log: bool = False
    """Log every request (off by default: it costs the hot path)."""
    proxy_headers: bool = False
    """Trust X-Forwarded-For/-Proto from the peer (only behind a proxy that sets them)."""
    timeout_keep_alive_s: float = 5.0
    """Seconds an idle keep-alive connection stays open."""

    def __post_init__(self) -> None:
        _check(self.port, 0 <= self.port <= 65535, "port", "an integer in [0, 65535]")
        _check(self.workers, self.workers >= 1, "workers", "an integer >= 1")
        _check(self.max_candidates, self.max_candidates >= 1, "max_candidates", "an integer >= 1")
        _check(self.max_body_bytes, self.max_body_bytes >= 1024, "max_body_bytes", "an integer >= 1024")
        for name in ("prior_alpha", "prior_beta"):
            value = getattr(self, name)
            _check(value, math.isfinite(value) and value > 0, name, "a finite number > 0")
        _check(self.timeout_keep_alive_s, self.timeout_keep_alive_s > 0, "timeout_keep_alive_s", "a number > 0")
        _check(self.sampler, self.sampler in ("auto", "kernel", "reference"), "sampler", "auto, kernel or reference")
        levels = ("critical", "error", "warning", "info", "debug")
        _check(self.log_level, self.log_level in levels, "log_level", ", ".join(levels))
        kind = self.features.partition(":")[0]
        _check(self.features, self.features == "demo" or kind == "csv", "features", "demo or csv:PATH")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from ``MAB_*`` variables, then ``overrides`` (values that are ``None`` are skipped)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _cast(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def export_env(self, environ: MutableMapping[str, str]) -> None:
        """Write every field as ``MAB_*`` so that worker processes rebuild the same settings."""
        for f in fields(self):
            value = getattr(self, f.name)
            environ[ENV_PREFIX + f.name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _check(value: object, ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise SettingsError(f"setting {name} must be {expected} (got {value!r})")


def _cast(name: str, type_name: object, raw: str) -> Any:
    key = ENV_PREFIX + name.upper()
    try:
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
    except ValueError:
        raise SettingsError(f"environment variable {key} must be a {type_name} (got {raw!r})") from None
    return raw
