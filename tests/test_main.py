"""The command line: help, bad settings, a bad feature table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mab_service", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_help_lists_every_setting_with_its_environment_variable() -> None:
    out = run("serve", "--help").stdout
    for flag, env in [("--port", "MAB_PORT"), ("--features", "MAB_FEATURES"), ("--workers", "MAB_WORKERS")]:
        assert flag in out and env in out
    assert "csv:PATH" in out


def test_bad_setting_exits_with_a_clear_message() -> None:
    result = run("serve", "--port", "70000")
    assert result.returncode != 0
    assert "setting port must be an integer in [0, 65535] (got 70000)" in result.stderr


def test_bad_feature_table_fails_startup_naming_the_lines(tmp_path: Path) -> None:
    table = tmp_path / "bad.csv"
    table.write_text("entity_id,alpha,beta\na,1,2\nb,-1,2\na,3,4\n", encoding="utf-8")
    result = run("serve", "--port", "0", "--features", f"csv:{table}")
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "line 3: alpha must be a finite number > 0 (got '-1')" in output
    assert "line 4: duplicate entity_id 'a' (first on line 2)" in output


def test_a_decision_log_sample_outside_zero_to_one_is_refused_at_startup() -> None:
    result = run("serve", "--decision-log-sample", "2")
    assert result.returncode != 0
    assert "setting decision_log_sample must be a number in [0, 1] (got 2.0)" in result.stderr
