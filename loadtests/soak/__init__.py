"""Soak test: the service on the Vertex source for minutes at 70% of its saturating load, with store faults injected.

Run it as ``python -m loadtests.soak`` (``__main__.py``: flags, the run). The parts: ``client.py`` (the open-loop
HTTP client), ``outcomes.py`` (what each answer was), ``faults.py`` (the fault schedule and its injection),
``processes.py`` (the emulator and the server, /proc readings), ``preparation.py`` (prewarm and saturation),
``runner.py`` (the soak itself), ``figures.py`` (measurements and verdict), ``report.py`` (the readable summary).
"""

from __future__ import annotations


class SoakError(RuntimeError):
    """The soak could not be set up or run."""
