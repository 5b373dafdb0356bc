"""The ``tasd`` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasd", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_saves_restarts_and_resumes_bit_exactly(tmp_path):
    out = run_cli("demo", "--ranks", "2", "--steps", "4", "--save-every", "2", "--dir", str(tmp_path), "--keep")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo OK: restored iteration 4 on 2 ranks" in " ".join(out.stdout.split())
    assert sorted(p.name for p in (tmp_path / "demo" / "1").iterdir()) == ["iter_0000004_1_local.tasd"]
    # A second run into a directory holding a checkpoint refuses instead of mixing runs.
    again = run_cli("demo", "--ranks", "2", "--steps", "4", "--save-every", "2", "--dir", str(tmp_path))
    assert again.returncode == 1 and "already holds files" in " ".join(again.stdout.split())


def test_bad_arguments_exit_with_usage_error():
    out = run_cli("demo", "--ranks", "0")
    assert out.returncode == 2 and "positive integer" in out.stderr
