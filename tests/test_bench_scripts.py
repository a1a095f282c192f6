"""Every benchmark script runs end to end in its CPU smoke configuration and writes sane JSON.

The scripts are not unit tests (no timed assertions here); this only keeps them from rotting between
GPU sessions, which is when their full runs happen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_bench_energy_smoke(tmp_path):
    result = _run("bench_energy.py", "--smoke", tmp_path=tmp_path)
    runs = {run["method"]: run for run in result["runs"]}
    assert len(runs) == 5
    for run in runs.values():
        assert run["samples"], run["method"]
        for sample in run["samples"]:
            assert 0.0 < sample["ratio"] <= 1.0 + 1e-6, sample
    exact = runs["svd (exact)"]["samples"]
    assert all(abs(s["ratio"] - 1.0) < 1e-4 for s in exact)
    # 2 layers x 7 projected matrices, refreshed at steps 0, 20 and 40.
    assert len(exact) == 14 * 3


def test_bench_step_smoke(tmp_path):
    results = _run("bench_step.py", "--smoke", "--dtype", "float32", tmp_path=tmp_path)["results"]
    assert {"adamw", "galore", "subspace_reference"} <= set(results)
    for row in results.values():
        assert row["step_s"] > 0 and row["state_bytes"] > 0
    # Same rank, fp32 weights: our state (basis + two low-rank moments) has galore-torch's size.
    assert results["subspace_reference"]["state_bytes"] == results["galore"]["state_bytes"]
    assert results["subspace_reference"]["state_bytes"] < results["adamw"]["state_bytes"]
    # Retained bytes: galore-torch's fp32 basis is a slice of its SVD factor, which it keeps alive; ours and
    # AdamW hold exactly their tensors.
    assert results["galore"]["state_bytes_retained"] > results["galore"]["state_bytes"]
    for name in ("adamw", "subspace_reference"):
        assert results[name]["state_bytes_retained"] == results[name]["state_bytes"]


def test_bench_refresh_smoke(tmp_path):
    results = _run("bench_refresh.py", "--smoke", tmp_path=tmp_path)["results"]
    assert {"galore_svd", "reference_rsvd", "reference_warm"} <= set(results)
    for name, row in results.items():
        assert row["refresh_s"] > 0, name
        assert 0.9 < row["captured_vs_svd"] <= 1.0 + 1e-6, (name, row["captured_vs_svd"])


@pytest.mark.slow
def test_bench_moments_short(tmp_path):
    result = _run("bench_moments.py", "--steps", "20", "--seeds", "0", "--policies", "rotate", tmp_path=tmp_path)
    assert {row["name"] for row in result["rows"]} >= {"adamw"}


def test_bench_memory_smoke(tmp_path):
    """Tiny LLaMA: every row with a real instance is checked byte for byte against its formula (the script
    fails on a mismatch), and the table and targets come out."""
    md = tmp_path / "memory.md"
    result = _run("bench_memory.py", "--smoke", "--markdown", str(md), tmp_path=tmp_path)
    assert {"adamw", "ours_float32_float32"} <= set(result["checked"])
    assert {r["weights"] for r in result["checked"]["adamw"]} == {"bfloat16", "float32"}
    smoke = result["models"]["smoke"]
    for wname in ("bfloat16", "float32"):
        per = smoke[wname]
        assert per["adamw"]["logical"] > per["ours_float32_float32"]["logical"] > 0
        for key in result["rows"]:
            assert per[key]["retained"] >= per[key]["logical"] > 0, key
    if "galore" in result["checked"]:
        # fp32 weights: the retained SVD factor; bf16: the basis is a copy.
        assert smoke["float32"]["galore"]["retained"] > smoke["float32"]["galore"]["logical"]
        assert smoke["bfloat16"]["galore"]["retained"] == smoke["bfloat16"]["galore"]["logical"]
    if "ours_int8_bfloat16" in result["rows"]:
        target = result["targets"]["smoke"]
        assert 0 < target["vs_ours_fp32"] < 1 and 0 < target["vs_ours_fp32_projected"] < 1
    text = md.read_text()
    assert "### Optimizer state memory" in text and "| torch AdamW |" in text


def test_bench_quality_smoke(tmp_path):
    """Three tiny pretrain runs in parallel (AdamW, ours without and with a residual), read back into the
    table, and the step timing of every residual mode."""
    md = tmp_path / "quality.md"
    result = _run("bench_quality.py", "--smoke", "--no-galore", "--residuals", "none", "fira", "--jobs", "3",
                  "--out", str(tmp_path / "runs"), "--step-time", "--markdown", str(md), tmp_path=tmp_path)  # fmt: skip
    names = [r["name"] for r in result["rows"]]
    assert names == ["adamw_lr0.003", "subspace_none_lr0.01", "subspace_fira_lr0.01"]
    assert all(r["steps"] == 4 and 0 < r["eval_loss"] < 20 for r in result["rows"])
    assert set(result["step_time"]["ratio_vs_none"]) == {"none", "fira", "fira_tensor", "apollo"}
    assert "| subspace_fira_lr0.01 | subspace | 0.01 |" in md.read_text()
