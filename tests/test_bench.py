"""``tasd bench``: the command line as a user runs it (small sizes), and the aggregation it reports.

Timings are never asserted (these machines are noisy); the tests check that figures, ratios,
targets, plots and errors are produced and computed as documented.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from tasd.bench import nvrx_shim
from tasd.bench.measure import Figure, add_ratios, figure
from tasd.bench.targets import judge


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "tasd", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_quick_save_stall_writes_json_ratios_targets_and_a_plot(tmp_path):
    out_json, plots, md = tmp_path / "bench.json", tmp_path / "plots", tmp_path / "bench.md"
    t0 = time.monotonic()
    out = run_cli("bench", "--quick", "--scenario", "save_stall", "--repeats", "2", "--json", str(out_json),
                  "--plots", str(plots), "--markdown", str(md), "--dir", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - t0 < 60
    report = json.loads(out_json.read_text())
    assert report["quick"] is True and report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    sc = report["scenarios"]["save_stall"]
    assert sc["config"]["repeats"] == 2 and sc["plot"] == str(plots / "save_stall.png")
    by = {f["method"]: f for f in sc["figures"]}
    for name in ("copy", "tasd_async", "dcp_async"):
        f = by[name]
        assert f["error"] is None and len(f["times_s"]) == 2 and len(f["per_rank_median_s"]) == 2
        assert f["median_s"] == pytest.approx(statistics.median(f["times_s"]))
        assert f["params"]["world"] == 2 and f["params"]["factor"] == 2 and f["params"]["n_tensors"] == 32
        assert f["gb_s"] == pytest.approx(f["nbytes"] / 1e9 / f["median_s"])
        assert f["mem_peak_bytes"] >= f["mem_steady_bytes"] >= 0
    tasd = by["tasd_async"]
    assert tasd["ratios"]["copy"] == pytest.approx(tasd["median_s"] / by["copy"]["median_s"])
    assert tasd["ratios"]["dcp_async"] == pytest.approx(tasd["median_s"] / by["dcp_async"]["median_s"])
    # the own part and the peer's replica reach the disk (the own part through the page cache, whose
    # last partial page the kernel may account to writeback rather than to the writer)
    assert tasd["disk_write_bytes"] >= 2 * tasd["nbytes"] - 4096
    assert by["d2h_pinned"]["error"] == "no CUDA device" or by["d2h_pinned"]["times_s"]
    if nvrx_shim.nvrx_version() is None:
        assert by["nvrx_async"]["error"] == "nvidia-resiliency-ext not installed"
        assert "nvidia-resiliency-ext not installed" in " ".join(out.stdout.split())
    (stall,) = [t for t in report["targets"] if t["target"].startswith("back-to-back async save stall")]
    assert stall["ratio"] == pytest.approx(tasd["ratios"]["copy"]) and stall["met"] == (stall["ratio"] <= 1.2)
    assert (plots / "save_stall.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| W2 F2 16MiB x32 | **tasd_async** |" in md.read_text()
    assert not any(tmp_path.glob("tasd-bench-*")), "the work directory is removed"


def test_unknown_scenario_exits_non_zero_naming_it():
    out = run_cli("bench", "--quick", "--scenario", "limits", "no_such_scenario", timeout=60)
    assert out.returncode == 2
    assert "unknown scenario(s): no_such_scenario" in out.stderr and "save_stall" in out.stderr


def _rank(times, peak=None):
    return {"times_s": times, "mem_peak_bytes": peak, "mem_steady_bytes": None, "disk_write_bytes": None}


def test_figure_takes_the_slowest_rank_per_repeat_and_ratios_match_params():
    params = {"world": 2, "n_tensors": 32}
    tasd = figure("s", "tasd_async", "t", "tasd", params, 10**9, [_rank([1.0, 4.0, 2.0], 5), _rank([3.0, 1.0, 2.5], 7)])
    assert tasd.times_s == [3.0, 4.0, 2.5] and tasd.median_s == 3.0 and (tasd.min_s, tasd.max_s) == (2.5, 4.0)
    assert tasd.per_rank_median_s == [2.0, 2.5] and tasd.mem_peak_bytes == 7 and tasd.gb_s == pytest.approx(1 / 3)
    copy = figure("s", "copy", "c", "limit", params, 10**9, [_rank([1.5, 1.5, 1.5]), _rank([1.0, 1.0, 1.0])])
    other_point = figure("s", "copy", "c", "limit", {"world": 4, "n_tensors": 32}, 1, [_rank([9.0])])
    missing = Figure("s", "nvrx_async", "n", "peer", dict(params), error="not installed")
    add_ratios([tasd, copy, other_point, missing])
    assert tasd.ratios == {"copy": 2.0} and copy.ratios == {}


def test_targets_report_ratios_or_why_not():
    def fig(method, n, times, error=None):
        return Figure("tensor_sweep", method, method, "tasd", {"n_tensors": n}, times_s=times, error=error)
    verdicts = judge({"tensor_sweep": [fig("tasd_async", 32, [0.1, 0.2, 0.3]), fig("tasd_async", 10_032, [0.5])],
                      "save_stall": [fig("tasd_async", 32, [0.2]), fig("copy", 32, [], error="boom")]})
    by = {v["target"]: v for v in verdicts}
    sweep = by["stall at 10,032 tensors <= 2x the stall at 32 tensors of the same bytes"]
    assert sweep["ratio"] == pytest.approx(2.5) and sweep["met"] is False
    stall = by["back-to-back async save stall <= 1.2x a plain copy into preallocated memory"]
    assert stall["met"] is None and stall["why"] == "copy: boom"
    assert not any(v["scenario"] == "restart" for v in verdicts), "targets of scenarios not run are left out"


# -- the megatron scenario ---------------------------------------------------------------------------
def _table(sc: dict, title_end: str) -> list[dict]:
    (t,) = [t for t in sc["tables"] if t["title"].endswith(title_end)]
    return [dict(zip(t["columns"], row)) for row in t["rows"]]


@pytest.mark.timeout(600)
def test_quick_megatron_scenario_reports_stalls_saves_resumes_bytes_and_flat_exchange_counts(tmp_path):
    pytest.importorskip("megatron.core")
    out_json, md = tmp_path / "bench.json", tmp_path / "bench.md"
    out = run_cli("bench", "--quick", "--scenario", "megatron", "--json", str(out_json), "--markdown", str(md),
                  "--dir", str(tmp_path), timeout=540)
    assert out.returncode == 0, out.stdout + out.stderr
    sc = json.loads(out_json.read_text())["scenarios"]["megatron"]
    by = {f["method"]: f for f in sc["figures"]}
    timed = ("copy", "tasd_fp_async", "tasd_atomic_async", "tasd_fp_sync", "tasd_atomic_sync", "torch_save",
             "mcore_dist_save")
    for name in timed + ("tasd_fp_resume", "tasd_atomic_resume", "torch_resume"):
        f = by[name]
        assert f["error"] is None and f["median_s"] > 0, name
        assert len(f["times_s"]) == (sc["config"]["repeats"] if name in timed else sc["config"]["load_repeats"])
        p = f["params"]
        assert (p["world"], p["tp"], p["dp"], p["factor"]) == (2, 1, 2, 2) and p["nbytes"] > 0 and p["n_tensors"] > 0
        assert p["phase"] == ("save" if name in timed else "resume")
    assert by["mcore_dist_async"]["error"].startswith("needs CUDA")
    # ratios stay within a phase: a stall is compared with saves, a resume with resumes
    assert set(by["tasd_fp_async"]["ratios"]) == {"copy", "tasd_atomic_async", "tasd_fp_sync", "tasd_atomic_sync",
                                                  "torch_save", "mcore_dist_save"}
    assert set(by["tasd_fp_resume"]["ratios"]) == {"tasd_atomic_resume", "torch_resume"}
    # bytes: fully parallel keeps and writes about 1/DP of the DP-replicated bytes, the rest as atomic
    fp, atomic = by["tasd_fp_sync"]["values"], by["tasd_atomic_sync"]["values"]
    assert fp["part_bytes"] < atomic["part_bytes"] and fp["replicated_bytes"] < atomic["replicated_bytes"]
    assert fp["replicated_bytes"] == pytest.approx(atomic["replicated_bytes"] / 2, rel=0.1)
    rows = _table(sc, "what each rank keeps and writes per save")
    assert {(r["rank"], r["algo"]) for r in rows} == {(0, "fully_parallel"), (0, "atomic"), (1, "fully_parallel"),
                                                      (1, "atomic")}
    kept = {a: sum(r["DP-replicated MiB"] for r in rows if r["algo"] == a) for a in ("fully_parallel", "atomic")}
    assert kept["fully_parallel"] == pytest.approx(kept["atomic"] / 2)  # each replicated shard saved once of DP=2
    (target,) = [t for t in json.loads(out_json.read_text())["targets"] if t["scenario"] == "megatron"]
    assert target["ratio"] == pytest.approx(fp["replicated_bytes"] / atomic["replicated_bytes"])
    assert target["met"] == (target["ratio"] <= target["bound"])
    # the exchange: a fixed number of operations per pair of ranks, whatever the tensor count
    small, large = _table(sc, "operations of a fully parallel to_state_dict")
    assert (small["layers"], large["layers"]) == (2, 8)
    assert large["ShardedTensors per rank"] > small["ShardedTensors per rank"]
    assert large["shards fetched per rank"] > small["shards fetched per rank"] > 0
    assert small["ops per pair (max)"] == large["ops per pair (max)"] == large["ops per pair (min)"] > 0
    assert len(sc["notes"]) >= len(by)  # a note per figure, and more
    text = md.read_text()
    assert "#### megatron: what each rank keeps and writes per save" in text and "| **tasd_fp_resume** |" in text


def test_megatron_scenario_says_why_it_cannot_run_on_every_row(tmp_path):
    from tasd.bench.harness import Context
    from tasd.bench.megatron_scenario import MegatronConfig, megatron

    res = megatron(MegatronConfig.quick(), Context(tmp_path, nvrx=False, cuda=True))
    cfg = MegatronConfig.quick()
    assert [f.method for f in res.figures] == [*cfg.methods, *cfg.resumes]
    assert all(f.error and "CUDA" in f.error and not f.times_s for f in res.figures)
    assert res.tables == [] and not any(tmp_path.iterdir())


def test_targets_compare_values_and_filter_on_params():
    def fig(method, dp, values):
        return Figure("megatron", method, method, "tasd", {"dp": dp, "n_tensors": 80}, times_s=[0.1], values=values)
    verdicts = judge({"megatron": [fig("tasd_fp_sync", 4, {"replicated_bytes": 1}),
                                   fig("tasd_fp_sync", 2, {"replicated_bytes": 60}),
                                   fig("tasd_atomic_sync", 2, {"replicated_bytes": 100})]})
    (v,) = verdicts
    assert v["ratio"] == pytest.approx(0.6) and v["met"] is False  # the DP 2 figures, not the DP 4 one
    (v,) = judge({"megatron": [fig("tasd_fp_sync", 2, {}), fig("tasd_atomic_sync", 2, {"replicated_bytes": 9})]})
    assert v["met"] is None and v["why"] == "tasd_fp_sync: not measured in this run"
