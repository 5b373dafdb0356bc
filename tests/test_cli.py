"""The ``tasd`` command line, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``python -m tasd ARGS`` with a terminal wide enough that rich does not wrap table cells."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tasd", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_demo_loses_a_node_restarts_and_resumes_bit_exactly(tmp_path):
    out = run_cli("demo", "--ranks", "3", "--steps", "4", "--save-every", "2", "--dir", str(tmp_path), "--keep")
    text = " ".join(out.stdout.split())
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replication: ring, factor 2, jump 1" in text and "node of rank 2 lost" in text
    assert "async-persistent saves" in text and "training stall s" in text and "save total s" in text
    assert "demo OK: restored iteration 4 on 3 ranks (rank 2's part recovered from a peer)" in text
    assert sorted(p.name for p in (tmp_path / "demo" / "1").iterdir()) == [
        "iter_0000004_0_local.tasd", "iter_0000004_1_local.tasd"], "own part and rank 0's replica"
    assert not (tmp_path / "demo" / "2").exists()
    # A second run into a directory holding a checkpoint refuses instead of mixing runs.
    again = run_cli("demo", "--ranks", "2", "--steps", "4", "--save-every", "2", "--dir", str(tmp_path))
    assert again.returncode == 1 and "already holds files" in " ".join(again.stdout.split())


def test_demo_without_replication_or_node_loss(tmp_path):
    out = run_cli("demo", "--ranks", "2", "--steps", "4", "--save-every", "2", "--replication", "none",
                  "--save-mode", "async-temporal", "--dir", str(tmp_path / "a"))
    assert out.returncode == 0 and "demo OK: restored iteration 4 on 2 ranks, model" in " ".join(out.stdout.split())
    out = run_cli("demo", "--ranks", "2", "--steps", "2", "--save-every", "2", "--save-mode", "sync",
                  "--dir", str(tmp_path / "s"))
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "(sync saves)" in text and "demo OK: restored iteration 2 on 2 ranks" in text


def test_bad_arguments_exit_with_usage_error():
    out = run_cli("demo", "--ranks", "0")
    assert out.returncode == 2 and "positive integer" in out.stderr
    out = run_cli("demo", "--ranks", "3", "--replication", "clique")  # 3 ranks cannot form pairs
    assert out.returncode == 1 and "divisible" in " ".join(out.stdout.split())


def test_inspect_reports_what_is_recoverable(tmp_path):
    assert run_cli("demo", "--ranks", "3", "--steps", "2", "--save-every", "2", "--dir", str(tmp_path),
                   "--keep").returncode == 0  # rank 2's node is lost: its part survives on rank 0 only
    out = run_cli("inspect", str(tmp_path))
    text = " ".join(out.stdout.split())
    assert out.returncode == 0 and "recoverable" in text and "ring, factor 2, jump 1" in text
    replica = tmp_path / "demo" / "0" / "iter_0000002_2_local.tasd"
    data = bytearray(replica.read_bytes())
    data[-1] ^= 0xFF
    replica.write_bytes(bytes(data))
    assert run_cli("inspect", str(tmp_path)).returncode == 0, "headers alone do not see data damage"
    out = run_cli("inspect", str(tmp_path), "--verify")
    text = " ".join(out.stdout.split())
    assert out.returncode == 1 and "missing rank(s) [2]" in text and "checksum mismatch" in text
    assert run_cli("inspect", str(tmp_path / "nothing")).returncode == 1
