"""Benchmarks and load-test data for mab_service; run each module with ``python -m benchmarks.<name>``."""
