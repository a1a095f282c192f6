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


def _script_modules():
    """bench_memory and its helper memory_step, imported from scripts/ (neither imports torch at import)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import bench_memory
        import memory_step
    finally:
        sys.path.remove(str(SCRIPTS))
    return bench_memory, memory_step


def test_bench_memory_smoke(tmp_path):
    """Tiny LLaMA: every row with a real instance is checked byte for byte against its formula (the script
    fails on a mismatch), and the table and targets come out. The training-step part: the accounting's
    gradient peaks, and two fresh measuring processes (torch AdamW and our layer-wise mode) whose results
    parse and say which gradients were alive after backward."""
    md, step_md = tmp_path / "memory.md", tmp_path / "step.md"
    result = _run(
        "bench_memory.py", "--smoke", "--markdown", str(md), "--step-markdown", str(step_md),
        "--rss", "smoke", "--repeats", "1", "--rss-configs", "adamw,ours_layerwise", "--rss-steps", "2",
        tmp_path=tmp_path,
    )  # fmt: skip
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
    _check_step_smoke(result, step_md.read_text())


def _check_step_smoke(result: dict, text: str) -> None:
    bench_memory, memory_step = _script_modules()
    specs = bench_memory.llama(*bench_memory.SMOKE["smoke"][:4])
    largest = max(s.numel for s in specs)
    for wname, w in (("bfloat16", 2), ("float32", 4)):
        step = result["step"]["smoke"][wname]
        assert step["gradients"]["layerwise"] == largest * w
        assert step["gradients"]["regular"] == sum(s.numel for s in specs) * w
        for key, row in step["rows"].items():
            assert row["total"] == row["weights"] + row["gradients"] + row["state"], key
            state_row = memory_step.STEP_ROWS[key][1]
            assert row["state"] == result["models"]["smoke"][wname][state_row]["retained"], key
    assert result["step_target"] is None  # no 7B in the smoke run
    measured = result["rss"]["measured"]["smoke"]
    assert list(measured) == ["adamw", "ours_layerwise"]
    for config, row in measured.items():
        assert row["peak"] >= row["baseline"] > 0 and row["increment"] == row["peak"] - row["baseline"], config
        assert row["finite"] and row["weights_moved"], config
    # Regular stepping: every gradient exists when backward returns; layer-wise: none is left.
    assert measured["adamw"]["grads_alive_after_backward"] == [len(specs)] * 2
    assert measured["ours_layerwise"]["grads_alive_after_backward"] == [0, 0]
    assert measured["adamw"]["increment_vs_adamw"] == 1.0
    assert result["rss"]["predicted_float32"]["smoke"]["ours_layerwise"]["gradients"] == largest * 4
    assert "### Memory of a training step" in text and "| SubspaceAdamW layer-wise, fp32 state |" in text


def test_bench_memory_step_accounting_7b():
    """LLaMA-7B, bf16 weights, rank 1024, from the script's own formulas: the layer-wise gradient peak is the
    largest weight's (embedding or head, 32000 x 4096), galore-torch's per-layer mode has the same, rows
    whose state is missing are left out, the totals order as the memory saved, and issue 11's target
    (weights + gradients + state <= 20 GB for ours layer-wise with int8 moments and bf16 bases) holds."""
    bench_memory, memory_step = _script_modules()
    hidden, inter, layers, vocab, rank = bench_memory.MODELS["7b"]
    specs = bench_memory.llama(hidden, inter, layers, vocab)
    formulas = {
        "adamw": bench_memory.adamw,
        "galore": bench_memory.galore,
        "ours_float32_float32": bench_memory.ours("float32", "float32"),
        "ours_int8_bfloat16": bench_memory.ours("int8", "bfloat16"),
    }
    state = {k: dict(zip(("logical", "retained"), f(specs, rank, 2), strict=True)) for k, f in formulas.items()}
    step = memory_step.step_accounting(specs, 2, state)
    assert step["gradients"]["layerwise"] == vocab * hidden * 2 == max(s.numel for s in specs) * 2
    assert step["gradients"]["largest"]["name"] == "embed_tokens"
    rows = step["rows"]
    assert set(rows) == {"adamw", "galore", "galore_per_layer", "ours", "ours_layerwise", "ours_int8",
                         "ours_int8_layerwise"}  # fmt: skip
    assert rows["galore_per_layer"]["gradients"] == rows["ours_layerwise"]["gradients"]
    assert rows["ours"]["gradients"] == rows["adamw"]["gradients"] == sum(s.numel for s in specs) * 2
    totals = [rows[k]["total"] for k in ("ours_int8_layerwise", "ours_layerwise", "ours", "adamw")]
    assert totals == sorted(totals) and len(set(totals)) == 4
    target = memory_step.target({"7b": {"bfloat16": step}})
    assert target["met"] and target["total_bytes"] == rows["ours_int8_layerwise"]["total"] <= 20e9
    assert target["total_gib"] * 2**30 == pytest.approx(target["total_gb"] * 1e9) == target["total_bytes"]



def test_bench_quality_smoke(tmp_path):
    """Three tiny pretrain runs in parallel (AdamW, ours without and with a residual), read back into the
    table, and the step timing of every residual mode."""
    md = tmp_path / "quality.md"
    result = _run("bench_quality.py", "--smoke", "--no-galore", "--no-apollo", "--residuals", "none", "fira",
                  "--jobs", "3", "--out", str(tmp_path / "runs"), "--step-time", "--markdown", str(md),
                  tmp_path=tmp_path)  # fmt: skip
    names = [r["name"] for r in result["rows"]]
    assert names == ["adamw_lr0.003", "subspace_none_lr0.01", "subspace_fira_lr0.01"]
    assert all(r["steps"] == 4 and 0 < r["eval_loss"] < 20 for r in result["rows"])
    assert set(result["step_time"]["ratio_vs_none"]) == {"none", "fira", "fira_tensor", "apollo"}
    assert "| subspace_fira_lr0.01 | subspace | 0.01 |" in md.read_text()
