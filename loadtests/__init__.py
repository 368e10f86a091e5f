"""Load tests: a Locust scenario (locustfile.py) and the stepped run that finds RPS per node (run.py)."""
