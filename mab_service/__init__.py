"""mab-service: Thompson-sampling recommendations over Beta posteriors."""

from __future__ import annotations

from mab_service.policy.sampler import sample_beta, sample_top_k

__version__ = "0.1.0"

__all__ = ["__version__", "sample_beta", "sample_top_k"]
