"""``tasd bench --scenario fsdp``: an FSDP2 model's async save stall and resume, tasd against DCP.

Timings are never asserted (these machines are noisy): the tests check that the quick scenario
produces every figure, ratio, target and table, and that its correctness check fails when a method
restores other data than was saved.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import pytest
import torch

from tasd.bench.fsdp import PRELOAD, RESUMES, SAVES, FSDPPoint, compare, digest, methods_rank, resume_rank
from tasd.launch import RankFailure, run_ranks
from tests.test_bench import run_cli


def test_quick_fsdp_scenario_reports_stalls_resumes_targets_and_bytes(tmp_path):
    out_json, md, plots = tmp_path / "bench.json", tmp_path / "bench.md", tmp_path / "plots"
    t0 = time.monotonic()
    out = run_cli("bench", "--quick", "--scenario", "fsdp", "--json", str(out_json), "--markdown", str(md),
                  "--plots", str(plots), "--dir", str(tmp_path))
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    assert elapsed < 60, f"the quick fsdp scenario took {elapsed:.0f}s"
    report = json.loads(out_json.read_text())
    sc = report["scenarios"]["fsdp"]
    cfg = sc["config"]
    by = {f["method"]: f for f in sc["figures"]}
    assert list(by) == [*SAVES, *RESUMES]
    for name, f in by.items():
        assert f["error"] is None, (name, f["error"])
        assert len(f["times_s"]) == (cfg["repeats"] if name in SAVES else cfg["load_repeats"]), name
        assert all(t > 0 for t in f["times_s"]) and f["median_s"] == pytest.approx(statistics.median(f["times_s"]))
        assert len(f["per_rank_median_s"]) == 2 and f["mem_peak_bytes"] >= f["mem_steady_bytes"] >= 0
        p = f["params"]
        assert (p["world"], p["factor"], p["layers"], p["hidden"]) == (2, 2, cfg["layers"], cfg["hidden"])
        assert p["phase"] == ("save" if name in SAVES else "resume")
        # 4 Linear(512, 512) halved over 2 ranks, with Adam's two moments: 6 MiB of local shards per rank
        assert p["nbytes"] == f["nbytes"] > 6 * (1 << 20) and p["n_tensors"] == 4 * 2 * 3 + 4 * 2
    # ratios stay within a phase: a stall against stalls, a resume against resumes
    tasd, dcp = by["tasd_async"], by["dcp_async"]
    assert set(tasd["ratios"]) == {"copy", "dcp_async"}
    assert tasd["ratios"]["dcp_async"] == pytest.approx(tasd["median_s"] / dcp["median_s"])
    assert set(by["tasd_resume"]["ratios"]) == {"dcp_resume"}
    # tasd writes its own part and the peer's replica (factor 2), DCP one copy
    assert tasd["disk_write_bytes"] >= 2 * tasd["nbytes"] - 4096
    assert dcp["disk_write_bytes"] >= dcp["nbytes"] - 4096
    targets = {t["target"]: t for t in report["targets"] if t["scenario"] == "fsdp"}
    stall = targets["FSDP: async save stall <= 0.5x DCP async_save"]
    assert stall["ratio"] == pytest.approx(tasd["ratios"]["dcp_async"]) and stall["met"] == (stall["ratio"] <= 0.5)
    resume = targets["FSDP: resume faster than DCP load (<= 1.0x)"]
    assert resume["ratio"] == pytest.approx(by["tasd_resume"]["ratios"]["dcp_resume"])
    assert resume["met"] == (resume["ratio"] <= 1.0)
    (table,) = sc["tables"]
    rows = [dict(zip(table["columns"], row)) for row in table["rows"]]
    assert [r["rank"] for r in rows] == [0, 1]
    for r in rows:
        assert r["DTensor shards"] == 4 * 2 * 3 and r["model MiB"] == pytest.approx(2, rel=0.01)
        assert r["tasd own part file MiB"] >= r["model MiB"] + r["optimizer MiB"] and r["DCP files MiB"] > 0
    assert (plots / "fsdp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| **tasd_resume** |" in md.read_text()
    assert not any(tmp_path.glob("tasd-bench-*")), "the work directory is removed"


def test_the_check_names_every_kind_of_difference():
    state = {"model": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([float("nan")])},
             "optim": {"state": {"w": {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2, 3)}},
                       "param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    want = digest(state)
    assert set(want) == {"model.w", "model.b", "optim.state.w.step", "optim.state.w.exp_avg"}
    compare(want, digest(copy.deepcopy(state)), "a copy")  # equal, NaN included (bytes are compared)

    def wrong(change) -> str:
        other = copy.deepcopy(state)
        change(other)
        with pytest.raises(AssertionError) as e:
            compare(want, digest(other), "after x")
        return str(e.value)

    def flip_bit(sd):
        sd["optim"]["state"]["w"]["exp_avg"].view(torch.int32)[1, 2] ^= 1
    msg = wrong(flip_bit)
    assert msg.startswith("after x: 1 of 4 tensor(s) differ") and "optim.state.w.exp_avg" in msg
    assert "'model.w'" in wrong(lambda sd: sd["model"].update(w=sd["model"]["w"].double()))  # dtype
    assert "'model.w'" in wrong(lambda sd: sd["model"].update(w=sd["model"]["w"].reshape(3, 2)))  # same bytes
    assert "'model.b'" in wrong(lambda sd: sd["model"].pop("b"))  # missing
    assert "'model.extra'" in wrong(lambda sd: sd["model"].update(extra=torch.ones(1)))  # unexpected


def test_a_resume_that_restores_other_data_fails_loudly(tmp_path):
    """Both resumes of a real (tiny) save fail on the rank whose save they do not reproduce: here the
    digest of rank 1's save is altered, as if the method had restored other data."""
    point = FSDPPoint(2, layers=2, hidden=64)
    opts = {"preload": PRELOAD, "timeout_s": 120, "collective_timeout_s": 30}
    per_rank = run_ranks(methods_rank, 2, point, str(tmp_path), ["tasd_async", "dcp_async"], 1, **opts)
    assert all(r["tasd_part_bytes"] and r["dcp_bytes"] for r in per_rank)
    path = tmp_path / "digest" / "1.json"
    saved = json.loads(path.read_text())
    key = next(k for k in saved if k.startswith("optim.state.") and k.endswith("exp_avg_sq"))
    saved[key] = saved[key][:-1] + ("0" if saved[key][-1] != "0" else "1")
    path.write_text(json.dumps(saved))
    for name in RESUMES:
        with pytest.raises(RankFailure) as e:
            run_ranks(resume_rank, 2, point, str(tmp_path), name, True, **opts)
        assert set(e.value.failures) == {1}, e.value.failures
        assert f"rank 1: after {name}: 1 of {len(saved)} tensor(s) differ from the save" in str(e.value)
        assert key in str(e.value)
