"""The locustfile and the stepped run, for a few seconds each against real servers on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import Server

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCUST_TIMEOUT_S = 40


def run_locust(host: str, tmp_path: Path, seconds: int, *extra: str) -> dict[str, tuple[int, int]]:
    """Run the locustfile headless; return name -> (requests, failures) from Locust's JSON statistics."""
    stats = tmp_path / "stats"
    argv = [
        sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "--host", host,
        "--users", "3", "--spawn-rate", "3", "--run-time", f"{seconds}s", "--stop-timeout", "2",
        "--json-file", str(stats), "--loglevel", "WARNING", "--only-summary", "--exit-code-on-error", "0", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=LOCUST_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")
    entries = json.loads((tmp_path / "stats.json").read_text())
    return {e["name"]: (e["num_requests"], e["num_failures"]) for e in entries}


def test_every_answer_of_the_service_checks_out(server: Server, table_csv: Path, tmp_path: Path) -> None:
    # The test table's ids (c0..c4999 and a few named ones, one of them not ASCII) as the catalogue.
    stats = run_locust(
        server.url, tmp_path, 4, "--catalogue", f"csv:{table_csv}", "--candidate-mix", "10:1,100:1,1000:1"
    )
    assert set(stats) == {"/predict 10", "/predict 100", "/predict 1000", "/health"}
    assert all(requests > 0 for requests, _ in stats.values()), stats
    assert all(failures == 0 for _, failures in stats.values()), stats


class _WrongOrder(BaseHTTPRequestHandler):
    """Answers /predict fast and wrong: the right ids, scores ascending."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer(b'{"status":"ok"}')

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = request["candidates"][: request["top_k"]]
        scores = [i / len(ids) for i in range(len(ids))]
        self._answer(json.dumps({"user_id": request["user_id"], "ids": ids, "scores": scores}).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def wrong_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _WrongOrder)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_a_wrong_answer_counts_as_a_failure(wrong_server: str, tmp_path: Path) -> None:
    stats = run_locust(wrong_server, tmp_path, 2, "--candidate-mix", "10:1", "--bodies-per-size", "4")
    requests, failures = stats["/predict 10"]
    assert requests > 0 and failures == requests
    assert stats["/health"][1] == 0


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmdline:
                found.append(int(entry))
    return found


@pytest.mark.slow
def test_the_stepped_run_answers_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # TMPDIR puts the run's table and records under tmp_path, so its processes can be found by their arguments.
    env = os.environ | {"TMPDIR": str(tmp_path)}
    out = tmp_path / "run.json"
    argv = [
        sys.executable,
        "-m",
        "loadtests.run",
        "--users",
        "2",
        "--step-s",
        "5",
        "--warmup-s",
        "1",
        "--json",
        str(out),
    ]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "max RPS per node (1 worker(s) on cpu 0) within the p99 budget of 50 ms" in done.stdout.splitlines()[-1]
    [step] = json.loads(out.read_text())["steps"]
    assert step["users"] == 2 and step["requests"] > 0 and step["failures"] == 0
    assert 0 < step["p50_ms"] <= step["p95_ms"] <= step["p99_ms"]
    assert step["server_cpu"] > 0 and step["client_cpu"] > 0
    assert _processes_mentioning(str(tmp_path)) == []
