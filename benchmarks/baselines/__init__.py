"""Reference services that mab_service is compared against in end-to-end benchmarks."""
