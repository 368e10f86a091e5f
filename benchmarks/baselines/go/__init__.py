"""The Go baseline: mab_service's /predict on fasthttp with encoding/json (sources here, built by build.py)."""
