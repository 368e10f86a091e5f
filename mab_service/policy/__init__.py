"""Sampling and ranking: the Beta kernel, its facade and the numpy reference."""
