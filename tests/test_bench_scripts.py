"""Every benchmark (``python -m scripts.bench.<name>``) runs end to end in its CPU smoke configuration and writes
sane JSON; the harness they share (``scripts/bench/common.py``, ``render.py``) does what it says.

The benchmarks are not unit tests (no timed assertions here); this only keeps them from rotting between
GPU sessions, which is when their full runs happen.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from subspace_optim import residual_rule

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
# The benchmarks run as modules of the repository root (``python -m scripts.bench.step``), from anywhere.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _module(name: str) -> list[str]:
    return [sys.executable, "-m", f"scripts.bench.{name}"]


def _run(module: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [*_module(module), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _render(result: Path, tmp_path: Path) -> str:
    """The markdown ``python -m scripts.bench.render`` makes of a result file."""
    proc = subprocess.run([*_module("render"), str(result)], capture_output=True, text=True, cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture
def bench(monkeypatch):
    """Imports ``scripts.bench.<name>`` modules in this process (the repository root on sys.path)."""
    monkeypatch.syspath_prepend(str(ROOT))
    return lambda name: importlib.import_module(f"scripts.bench.{name}")


def test_bench_energy_smoke(tmp_path):
    result = _run("energy", "--smoke", tmp_path=tmp_path)
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


def test_bench_energy_dct_runs_on_request_and_keeps_less_than_the_svd(tmp_path):
    """``--methods dct``: fixed DCT columns are not a sketch of the SVD, so on these gradients they keep less of the
    best rank-r energy than the SVD's own subspace (and never more)."""
    result = _run("energy", "--smoke", "--methods", "dct", tmp_path=tmp_path)
    (run,) = result["runs"]
    assert run["method"] == "dct" and len(run["samples"]) == 14 * 3
    assert all(0.0 < s["ratio"] <= 1.0 + 1e-6 for s in run["samples"])
    assert run["summary"]["later_refreshes"]["weighted"] < 0.99


def test_bench_step_smoke(tmp_path):
    results = _run("step", "--smoke", "--dtype", "float32", tmp_path=tmp_path)["results"]
    assert {"adamw", "galore", "subspace_reference"} <= set(results)
    for row in results.values():
        assert row["step_s"] > 0 and row["state_bytes"] > 0
    # Same rank, fp32 weights: our state (basis + two low-rank moments) has galore-torch's size, plus the default
    # residual's fp32 limiter scalar per projected matrix (the smoke shape: 2 layers x 7 matrices).
    assert results["subspace_reference"]["state_bytes"] == results["galore"]["state_bytes"] + 4 * 2 * 7
    assert results["subspace_reference"]["state_bytes"] < results["adamw"]["state_bytes"]
    # Retained bytes: galore-torch's fp32 basis is a slice of its SVD factor, which it keeps alive; ours and
    # AdamW hold exactly their tensors.
    assert results["galore"]["state_bytes_retained"] > results["galore"]["state_bytes"]
    for name in ("adamw", "subspace_reference"):
        assert results[name]["state_bytes_retained"] == results[name]["state_bytes"]


def test_bench_refresh_smoke(tmp_path):
    results = _run("refresh", "--smoke", tmp_path=tmp_path)["results"]
    assert {"galore_svd", "reference_rsvd", "reference_warm"} <= set(results)
    for name, row in results.items():
        assert row["refresh_s"] > 0, name
        assert 0.9 < row["captured_vs_svd"] <= 1.0 + 1e-6, (name, row["captured_vs_svd"])


@pytest.mark.slow
def test_bench_moments_short(tmp_path):
    result = _run("moments", "--steps", "20", "--seeds", "0", "--policies", "rotate", tmp_path=tmp_path)
    assert {row["name"] for row in result["rows"]} >= {"adamw"}


def test_bench_memory_smoke(tmp_path, bench):
    """Tiny LLaMA: every row with a real instance is checked byte for byte against its formula (the script
    fails on a mismatch), and the table and targets come out. The training-step part: the accounting's
    gradient peaks, and two fresh measuring processes (torch AdamW and our layer-wise mode) whose results
    parse and say which gradients were alive after backward."""
    result = _run(
        "memory",
        "--smoke",
        "--rss",
        "smoke",
        "--repeats",
        "1",
        "--rss-configs",
        "adamw,ours_layerwise",
        "--rss-steps",
        "2",
        tmp_path=tmp_path,
    )
    rendered = _render(tmp_path / "result.json", tmp_path)
    assert {"adamw", "ours_float32_float32"} <= set(result["checked"])
    assert {r["weights"] for r in result["checked"]["adamw"]} == {"bfloat16", "float32"}
    smoke = result["models"]["smoke"]
    for wname in ("bfloat16", "float32"):
        per = smoke[wname]
        assert per["adamw"]["logical"] > per["ours_float32_float32"]["logical"] > 0
        for key in (k for k, row in result["rows"].items() if row["state_table"]):
            assert per[key]["retained"] >= per[key]["logical"] > 0, key
    if "galore" in result["checked"]:
        # fp32 weights: the retained SVD factor; bf16: the basis is a copy.
        assert smoke["float32"]["galore"]["retained"] > smoke["float32"]["galore"]["logical"]
        assert smoke["bfloat16"]["galore"]["retained"] == smoke["bfloat16"]["galore"]["logical"]
    # The regenerated bases, checked byte for byte like the stored ones; APOLLO-Mini-like rows at rank 1 too, and
    # only in the paper accounting (not a state-table row).
    kinds = {f"ours_{kind}_{m}" for kind in ("seeded_apollo", "dct") for m in ("float32", "bfloat16", "int8")}
    mini = {"ours_seeded_apollo_tensor_float32", "ours_seeded_apollo_tensor_int8"}
    assert kinds | mini <= set(result["checked"])
    assert all(any(r["rank"] == 1 for r in result["checked"][key]) for key in mini)
    assert kinds <= set(smoke["bfloat16"]) and not mini & set(smoke["bfloat16"])
    assert result["paper"] == {"targets": {}}  # no 7B or 1B in the smoke run
    int8_check = result["int8_check"]  # the int8 weights' and the presets' state on the smoke LLaMA, with torchao
    if importlib.util.find_spec("torchao") is None:
        assert int8_check is None
    else:
        assert int8_check["weights"]["measured"] == int8_check["weights"]["formula"] > 0
        assert {s["key"] for s in int8_check["states"]} == {k for k in result["rows"] if k.startswith("preset_")}
    if "ours_int8_bfloat16" in result["rows"]:
        target = result["targets"]["smoke"]
        assert 0 < target["vs_ours_fp32"] < 1 and 0 < target["vs_ours_fp32_projected"] < 1
    text = rendered
    assert "### Optimizer state memory" in text and "| torch AdamW |" in text
    _check_step_smoke(result, rendered, bench("memory"), bench("memory_step"))


def _check_step_smoke(result: dict, text: str, bench_memory, memory_step) -> None:
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


def test_bench_memory_step_accounting_7b(bench):
    """LLaMA-7B, bf16 weights, rank 1024, from the script's own formulas: the layer-wise gradient peak is the
    largest weight's (embedding or head, 32000 x 4096), galore-torch's per-layer mode has the same, rows
    whose state is missing are left out, the totals order as the memory saved, and the memory target
    (weights + gradients + state <= 20 GB for ours layer-wise with int8 moments and bf16 bases) holds."""
    bench_memory, memory_step = bench("memory"), bench("memory_step")
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
    assert set(rows) == {
        "adamw",
        "galore",
        "galore_per_layer",
        "ours",
        "ours_layerwise",
        "ours_int8",
        "ours_int8_layerwise",
    }
    assert rows["galore_per_layer"]["gradients"] == rows["ours_layerwise"]["gradients"]
    assert rows["ours"]["gradients"] == rows["adamw"]["gradients"] == sum(s.numel for s in specs) * 2
    totals = [rows[k]["total"] for k in ("ours_int8_layerwise", "ours_layerwise", "ours", "adamw")]
    assert totals == sorted(totals) and len(set(totals)) == 4
    target = memory_step.target({"7b": {"bfloat16": step}})
    assert target["met"] and target["total_bytes"] == rows["ours_int8_layerwise"]["total"] <= 20e9
    assert target["total_gib"] * 2**30 == pytest.approx(target["total_gb"] * 1e9) == target["total_bytes"]


@pytest.mark.parametrize("moments", ["float32", "int8"])
def test_bench_memory_basis_kinds_measured(bench, moments):
    """On the smoke verification set and the odd shapes (rank 260), and at rank 1: each basis kind's measured
    state equals its formula, a seeded matrix keeps no basis tensor (its seed is a Python int: 0 bytes) and a
    DCT one r int32 indices (4 r bytes); against a stored bf16 basis the formulas differ by exactly that."""
    import torch

    bench_memory = bench("memory")
    small, rank = bench_memory.verification_set(False)
    layouts = [("seeded", "apollo"), ("seeded", "apollo_tensor"), ("dct", "none")]
    for specs, r in [(small, rank), bench_memory.VERIFY_ODD, (small, 1)]:
        projected = [s for s in specs if bench_memory._rank(s, r) is not None]
        stored = bench_memory.ours(moments, "bfloat16", "stored", "apollo")(specs, r, 2)[0]
        bases = sum(min(s.shape) * r * 2 for s in projected)
        for kind, residual in layouts:
            formula = bench_memory.ours(moments, kind=kind, residual=residual)
            build = bench_memory.build_ours(moments, kind=kind, residual=residual)
            for dtype in (torch.bfloat16, torch.float32):
                assert bench_memory.measure(build, specs, r, dtype, "cpu") == formula(specs, r, dtype.itemsize)
            params = bench_memory._params(specs, torch.bfloat16, "cpu")
            opt = build(specs, params, r)
            opt.step()
            for p in bench_memory._split(specs, params, r)[0]:
                state = opt.state[p]
                assert "basis" not in state, (kind, r)
                if kind == "seeded":
                    assert isinstance(state["projection_seed"], int) and "basis_index" not in state
                else:
                    index = state["basis_index"]
                    assert index.dtype == torch.int32 and index.numel() * index.element_size() == 4 * r
            kept = 0 if kind == "seeded" else 4 * r * len(projected)
            norms = 0 if residual != "none" else 4 * len(projected)  # stored's update_norm, absent here
            assert stored - formula(specs, r, 2)[0] == bases - kept + norms, (kind, residual, r)


@pytest.mark.parametrize("moments", ["float32", "int8"])
def test_bench_memory_factored_measured(bench, moments):
    """second_moment="factored", each basis kind, on the smoke verification set, the odd shapes (rank 260) and at
    rank 1: measured state equals the formula; every projected matrix and >= 2-D plain tensor keeps two fp32
    factors (rows, cols) of its moment's shape instead of V, 1-D tensors keep V; against the full second moment the
    formulas differ by exactly V's bytes (those of exp_avg, same layout) less 4 (rows + cols) per factored tensor."""
    import torch

    bench_memory = bench("memory")
    small, rank = bench_memory.verification_set(False)
    layouts = [("stored", "bfloat16", "none"), ("seeded", "float32", "apollo"), ("dct", "float32", "none")]
    for specs, r in [(small, rank), bench_memory.VERIFY_ODD, (small, 1)]:
        for kind, basis, residual in layouts:
            formula = bench_memory.ours(moments, basis, kind, residual, "factored")
            build = bench_memory.build_ours(moments, basis, kind, residual, "factored")
            for dtype in (torch.bfloat16, torch.float32):
                assert bench_memory.measure(build, specs, r, dtype, "cpu") == formula(specs, r, dtype.itemsize)
            params = bench_memory._params(specs, torch.bfloat16, "cpu")
            opt = build(specs, params, r)
            opt.step()
            saved = 0
            for s, p in zip(specs, params, strict=True):
                state = opt.state[p]
                if len(s.shape) < 2:
                    assert "exp_avg_sq" in state and "exp_avg_sq_row" not in state, s.name
                    continue
                row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
                assert "exp_avg_sq" not in state and row.dtype == col.dtype == torch.float32, s.name
                assert tuple(state["exp_avg"].shape) == (row.numel(), col.numel()), s.name
                first = sum(state[k].nbytes for k in ("exp_avg", "exp_avg_absmax") if k in state)
                saved += first - 4 * (row.numel() + col.numel())
            full = bench_memory.ours(moments, basis, kind, residual)(specs, r, 2)[0]
            assert full - formula(specs, r, 2)[0] == saved > 0, (kind, r)


@pytest.mark.parametrize("plain", [("int4", "full"), ("int4", None), ("int8", "full"), (None, "factored")])
def test_bench_memory_plain_storage_measured(bench, plain):
    """plain_moments_dtype / plain_second_moment: the measured state of the smoke verification set and the odd
    shapes equals the formula; 4-bit plain moments are half the codes of 8-bit ones, with an absmax per 128."""
    import torch

    bench_memory = bench("memory")
    small, rank = bench_memory.verification_set(False)
    for specs, r in [(small, rank), bench_memory.VERIFY_ODD]:
        formula = bench_memory.ours("int8", "int8", "stored", "fira", "factored", *plain)
        build = bench_memory.build_ours("int8", "int8", "stored", "fira", "factored", *plain)
        for dtype in (torch.bfloat16, torch.float32):
            assert bench_memory.measure(build, specs, r, dtype, "cpu") == formula(specs, r, dtype.itemsize)
    assert bench_memory._int4_moment(64, 300) == 64 * 150 + 64 * 3 * 4


def test_bench_second_moment_smoke(tmp_path):
    """The shadow second moments on the tiny model: a record per matrix and checkpoint, each estimate's error."""
    result = _run("second_moment", "--smoke", "--out", str(tmp_path / "runs"), tmp_path=tmp_path)
    records = result["records"]
    assert [(r["step"], r["matrix"]) for r in records] == [(s, m) for s in (2, 4) for m in ("embedding", "head")]
    for record in records:
        assert all(0 < record[name]["rel_error"] < 2 for name in ("factored", "rows", "cols", "sm3"))
    assert len(result["tables"][0]["rows"]) == 4


def test_bench_memory_paper_accounting(bench):
    """LLaMA-7B bf16 weights + state as the APOLLO/SCALE/GaLore papers count them, LLaMA-1B rank 512 state per
    basis kind, and their targets, from the script's own formulas."""
    bench_memory, render = bench("memory"), bench("render")
    table, _ = bench_memory.rows()
    models = {k: bench_memory.MODELS[k] for k in ("1b", "7b")}
    paper = bench_memory.paper_accounting(models, table)
    rows = {(r["key"], r["rank"]): r for r in paper["7b"]["rows"]}
    weights = rows[("adamw", None)]["weights"]
    assert round(weights / 1e9, 2) == 13.48
    assert round(rows[("ours_int8_bfloat16", 1024)]["state"] / 1e9, 2) == 5.70  # the 19.2 GB row
    assert paper["7b"]["layerwise_gradient"] == 32000 * 4096 * 2
    seeded = rows[("ours_seeded_apollo_bfloat16", 256)]["state"]
    # APOLLO's accounting, plus the limiter's scalar per matrix and AdamW's step count per plain tensor.
    assert seeded == rows[("apollo_paper", 256)]["state"] + 4 * 7 * 32 + 4 * (3 + 2 * 32)
    assert rows[("ours_dct_int8", 512)]["state"] < rows[("ours_dct_int8", 1024)]["state"]
    one_b = {r["key"]: r for r in paper["1b"]["rows"]}
    for m in ("float32", "int8"):
        assert one_b[f"ours_seeded_apollo_{m}"]["state"] < one_b[f"ours_dct_{m}"]["state"]
        assert (
            one_b[f"ours_dct_{m}"]["state"] - one_b[f"ours_seeded_apollo_{m}"]["state"] == 4 * 512 * 7 * 24 - 4 * 7 * 24
        )
    # A factored second moment: less state for every basis kind, in both sizes.
    for key, rank in [("ours_int8_bfloat16", 1024), ("ours_seeded_apollo_int8", 256), ("ours_dct_int8", 512)]:
        assert rows[(f"{key}_factored", rank)]["state"] < rows[(key, rank)]["state"], key
    assert (
        rows[("ours_seeded_apollo_tensor_int8_factored", 1)]["state"]
        < rows[("ours_seeded_apollo_tensor_int8", 1)]["state"]
    )
    hidden, vocab = bench_memory.MODELS["1b"][0], bench_memory.MODELS["1b"][3]
    v_int8 = vocab * hidden + vocab * (hidden // 256) * 4  # the embedding's (or head's) int8 V, codes + absmax
    for key in ("ours_float32_float32", "ours_int8_bfloat16", "ours_seeded_apollo_int8", "ours_dct_int8"):
        full, factored = one_b[key], one_b[f"{key}_factored"]
        assert factored["projected"] < full["projected"] and factored["state"] < full["state"], key
        plain = (full["state"] - full["projected"]) - (factored["state"] - factored["projected"])
        v = v_int8 if "int8" in key else vocab * hidden * 2
        assert plain == 2 * (v - 4 * (vocab + hidden)), key
    targets = paper["targets"]
    assert set(targets) == {
        "least_7b_gb",
        "apollo_like_7b_gb",
        "state_1b_mib",
        "state_1b_mib_projected",
        "int8_least_memory_7b_gb",
        "int8_least_memory_layerwise_7b_gb",
    }
    assert targets["least_7b_gb"]["met"] and targets["apollo_like_7b_gb"]["met"]
    assert targets["apollo_like_7b_gb"]["key"] == "ours_seeded_apollo_int8_factored"
    assert targets["apollo_like_7b_gb"]["full"]["key"] == "ours_seeded_apollo_int8"
    one_b_target = targets["state_1b_mib"]
    assert one_b_target["met"] and one_b_target["key"].endswith("_factored") and one_b_target["value"] <= 600
    assert not one_b_target["full"]["met"] and one_b_target["full"]["value"] > 600  # 839 MiB with a full V
    text = render.render({"tables": bench_memory.paper_tables(paper, table)})
    assert "LLaMA-7B, bf16 and int8 weights: weights + optimizer state (GB)" in text
    assert "| GaLore 8-bit | bf16 |" in text and "**19.18** (13.48 + 5.70)" in text
    assert "LLaMA-1B, rank 512" in text and "with a full second moment not met, 839.33 MiB" in text


def test_bench_memory_int8_weights_bytes(bench):
    """INT8 weights, counted by hand on a one-layer LLaMA (hidden 8, intermediate 12, vocabulary 10): every nn.Linear
    weight (q, k, v, o, gate, up, down, the head) int8 data plus a 4-byte scale per output row, the embedding and
    the three norms fp32; bf16 weights 2 bytes a parameter; an int8 model's gradients fp32."""
    bench_memory = bench("memory")
    specs = bench_memory.llama(8, 12, 1, 10)
    embedding = 10 * 8 * 4
    attention = 4 * (8 * 8 + 4 * 8)
    mlp = 2 * (12 * 8 + 4 * 12) + (8 * 12 + 4 * 8)
    norms = 3 * 8 * 4
    head = 10 * 8 + 4 * 10
    assert bench_memory.int8_weights_bytes(specs) == embedding + attention + mlp + norms + head == 1336
    assert bench_memory.weights_bytes(specs, "int8") == 1336
    assert bench_memory.weights_bytes(specs, "bfloat16") == 2 * sum(s.numel for s in specs)
    linear = [s.name for s in specs if bench_memory.is_linear(s)]
    assert len(linear) == 8 and linear[-1] == "lm_head" and "embed_tokens" not in linear
    assert bench_memory.layerwise_gradient_bytes(specs, "int8") == 12 * 8 * 4  # gate/up, the largest here
    assert bench_memory.layerwise_gradient_bytes(specs, "bfloat16") == 12 * 8 * 2


def test_bench_memory_int8_presets_7b(bench):
    """LLaMA-7B, each preset with bf16 and int8 weights (weights + state, + the layer-wise gradient), next to
    Q-GaLore's cited 15.26 GB, and the int8 least_memory targets (<= 9.5 GB, <= 10 GB with the gradient)."""
    bench_memory, render = bench("memory"), bench("render")
    table, _ = bench_memory.rows()
    paper = bench_memory.paper_accounting({"7b": bench_memory.MODELS["7b"]}, table)
    found = paper["7b"]
    rows = {(r["preset"], r["weights_dtype"]): r for r in found["presets"]}
    assert set(rows) == {(p, w) for p in ("least_memory", "balanced", "best_quality") for w in ("bfloat16", "int8")}
    hidden, vocab = 4096, 32000
    for (preset, wname), r in rows.items():
        assert r["rank"] == (1 if preset == "least_memory" else 1024), preset
        assert r["layerwise_gradient"] == vocab * hidden * (4 if wname == "int8" else 2)
        bf16 = rows[(preset, "bfloat16")]
        assert r["state"] >= bf16["state"]  # the int8 model's plain tensors are fp32: their state is not smaller
    assert round(rows[("least_memory", "bfloat16")]["weights"] / 1e9, 2) == 13.48
    int8_weights = rows[("least_memory", "int8")]["weights"]
    assert round(int8_weights / 1e9, 2) == 7.14
    linear_rows = 32 * (4 * hidden + 2 * 11008 + hidden) + vocab
    linear_numel = 32 * (4 * hidden**2 + 3 * 11008 * hidden) + vocab * hidden
    assert int8_weights == linear_numel + 4 * linear_rows + 4 * (vocab * hidden + 65 * hidden)
    assert round((rows[("least_memory", "bfloat16")]["state"] + 13476831232) / 1e9, 2) == 13.76  # the preset's doc
    assert round((rows[("balanced", "bfloat16")]["state"] + 13476831232) / 1e9, 2) == 16.36  # the preset's doc
    assert round((rows[("best_quality", "bfloat16")]["state"] + 13476831232) / 1e9, 2) == 31.24
    assert found["cited"] == [
        {"name": "Q-GaLore (paper)", "weights_dtype": "int8", "total_gb": 15.26, "source": found["cited"][0]["source"]}
    ]
    least = rows[("least_memory", "int8")]
    targets = paper["targets"]
    total = (least["weights"] + least["state"]) / 1e9
    plain, with_grad = targets["int8_least_memory_7b_gb"], targets["int8_least_memory_layerwise_7b_gb"]
    assert plain["met"] and plain["value"] == total <= 9.5 and plain["limit"] == 9.5
    assert with_grad["met"] and with_grad["value"] == total + least["layerwise_gradient"] / 1e9 <= 10
    assert plain["key"] == with_grad["key"] == "preset_least_memory" and plain["rank"] == 1
    text = render.render({"tables": bench_memory.paper_tables(paper, table)})
    assert "| Q-GaLore (paper) | int8 |" in text and "| 15.26 |" in text
    assert "| preset least_memory | int8 | " in text and f"**{total:.2f}**" in text
    assert f"least_memory, int8 weights, weights + state <= 9.5 GB: **met**, {total:.2f} GB" in text
    assert "least_memory, int8 weights, + one layer's gradient <= 10 GB: **met**" in text
    assert "not checked against a real model" in text  # no int8 check passed to the table here


def test_bench_memory_int8_real_model(bench):
    """With torchao: a tiny fp32 LlamaForCausalLM quantized by ``quantize_linears`` holds exactly the formula's
    bytes (int8 data + row scales of every nn.Linear, the rest whole), and the script's own check (the smoke LLaMA's
    weights and each preset's state after one step with int8 weights) passes."""
    pytest.importorskip("torchao")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from subspace_optim.int8_weights import is_int8, quantize_linears

    bench_memory = bench("memory")
    hidden, inter, layers, vocab = 32, 48, 2, 96
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        tie_word_embeddings=False,
        use_cache=False,
    )
    model = quantize_linears(LlamaForCausalLM(config).float())
    counted = 0
    for p in model.parameters():
        if is_int8(p):
            assert p.int_data.dtype == torch.int8 and p.scale.dtype == torch.float32
            counted += p.int_data.numel() + p.scale.numel() * p.scale.element_size()
        else:
            assert p.dtype == torch.float32
            counted += p.numel() * p.element_size()
    specs = bench_memory.llama(hidden, inter, layers, vocab)
    assert counted == bench_memory.int8_weights_bytes(specs) == bench_memory.model_weights_bytes(model)
    assert sum(is_int8(p) for p in model.parameters()) == sum(bench_memory.is_linear(s) for s in specs) == 15
    table, _ = bench_memory.rows()
    found = bench_memory.check_int8(table)
    assert found["weights"]["measured"] == found["weights"]["formula"]
    presets = {s["key"] for s in found["states"]}
    assert presets == {"preset_least_memory", "preset_balanced", "preset_best_quality"}


def test_bench_quality_smoke(tmp_path):
    """Three tiny pretrain runs in parallel (AdamW, ours without and with a residual), read back into the
    table, and the step timing of every residual mode."""
    result = _run(
        "quality",
        "--smoke",
        "--no-galore",
        "--no-apollo",
        "--residuals",
        "none",
        "fira",
        "--jobs",
        "3",
        "--out",
        str(tmp_path / "runs"),
        "--step-time",
        tmp_path=tmp_path,
    )
    names = [r["name"] for r in result["rows"]]
    assert names == ["adamw_lr0.003", "subspace_none_lr0.01", "subspace_fira_lr0.01"]
    assert all(r["steps"] == 4 and 0 < r["eval_loss"] < 20 for r in result["rows"])
    assert set(result["step_time"]["ratio_vs_none"]) == set(residual_rule.RESIDUALS)
    assert "| subspace_fira_lr0.01 | subspace | 0.01 |" in _render(tmp_path / "result.json", tmp_path)


def test_bench_frontier_smoke(tmp_path):
    """Three rows of the frontier on the tiny model: read back with their state, the 7B accounting of the same
    configuration, the peer-budget notes and the plot."""
    rows = ["adamw", "apollo_mini", "ours_seeded_mini_int8_factored"]
    runs, plot = str(tmp_path / "runs"), str(tmp_path / "frontier.png")
    flags = ["--smoke", "--only", *rows, "--out", runs, "--plot", plot, "--jobs", "3"]
    result = _run("frontier", *flags, tmp_path=tmp_path)
    got = {r["name"]: r for r in result["rows"]}
    assert list(got) == rows and all(len(r["losses"]) == 1 and 0 < r["mean_loss"] < 20 for r in got.values())
    assert got["ours_seeded_mini_int8_factored"]["state_bytes"] < got["apollo_mini"]["state_bytes"]
    assert got["ours_seeded_mini_int8_factored"]["seven_b_gb"] == pytest.approx(13.76, abs=0.005)
    assert got["adamw"]["seven_b_gb"] == pytest.approx(40.43, abs=0.005)
    notes = result["tables"][0]["notes"]
    assert any(n.startswith("apollo_mini") and "ours_seeded_mini_int8_factored" in n for n in notes)
    assert "4 steps (--steps), not the model file's" in notes  # --smoke's
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_frontier_peers_take_each_model_files_tuning(bench):
    """A peer row's lr and plain lr come from the model file (llama_20m's AdamW: 1e-3 with 1.5e-2), ours keep
    their own; llama_9m's resolve to what its frontier ran with."""
    frontier, common = bench("frontier"), bench("common")
    big = {name: (lr, flags) for name, _, lr, flags in frontier.resolved(common.model_config("llama_20m"))}
    small = {name: (lr, flags) for name, _, lr, flags in frontier.resolved(common.model_config("llama_9m"))}
    assert big["adamw"] == (1e-3, {"plain_lr": 1.5e-2}) and big["galore"] == (1e-2, {"plain_lr": 3e-2})
    assert small["adamw"] == (2e-3, {"plain_lr": 3e-2}) and small["galore"] == (2e-2, {"plain_lr": 3e-2})
    assert big["apollo_mini"] == (1e-2, {"apollo_scale": 128.0, "apollo_scale_type": "tensor", "rank": 1})
    assert big["ours_stored_fira"] == small["ours_stored_fira"] == (1e-2, {"plain_lr": 3e-2, "residual": "fira"})


def test_frontier_keeps_an_earlier_results_rows_it_did_not_run(bench, tmp_path):
    """``--keep``: the earlier result's rows this command did not run come along, stamped with where they were
    measured, and named in the table's notes; a result of other seeds is refused (its losses would not compare)."""
    frontier = bench("frontier")
    row = {
        "optimizer": "subspace",
        "lr": 0.01,
        "flags": {},
        "losses": [4.7, 4.8],
        "mean_loss": 4.75,
        "seven_b_gb": 20.0,
    }
    earlier = {
        "model": "llama_9m",
        "args": {"seeds": [0, 1]},
        "environment": {"commit": "abc1234", "date": "2026-12-01 10:00 UTC", "device_name": "AMD EPYC CPU"},
        "rows": [{**row, "name": "old_only", "state_bytes": 2}, {**row, "name": "redone", "state_bytes": 3}],
    }
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    args = argparse.Namespace(model="llama_9m", seeds=[0, 1], steps=None)
    measured = [{**row, "name": "redone", "state_bytes": 3, "mean_loss": 4.6}]
    kept = frontier.kept_rows(path, args, measured)
    stamp = "abc1234, 2026-12-01 10:00 UTC, AMD EPYC CPU"
    assert [(r["name"], r["measured_at"]) for r in kept] == [("old_only", stamp)]
    notes = frontier._table(args, measured + kept)["notes"]
    assert f"kept from an earlier result (--keep), measured at {stamp}: old_only" in notes
    with pytest.raises(SystemExit, match="same model and seeds"):
        frontier.kept_rows(path, argparse.Namespace(model="llama_9m", seeds=[0, 1, 2, 3]), measured)


def test_bench_regenerated_smoke(tmp_path):
    """Stored and regenerated bases on the tiny shape: every timing present, and regenerated ones hold less."""
    result = _run("regenerated", "--smoke", tmp_path=tmp_path)
    names = {"warm", "dct", "random+apollo", "seeded+apollo"}
    assert set(result["regular"]) == set(result["refresh"]) == set(result["state_bytes"]) == names
    assert all(len(result["regular"][n]["runs_s"]) == 2 and result["refresh"][n]["refresh_median_s"] > 0 for n in names)
    sizes = result["state_bytes"]
    assert sizes["dct"] < sizes["warm"] and sizes["seeded+apollo"] < sizes["random+apollo"]


def test_bench_host_smoke(tmp_path):
    """Host time of a regular step (2 layers of LLaMA-7B's roles, tiny widths): every optimizer row exists
    and is positive; the Triton engine's stubbed launches were counted (the script itself fails if a timed
    step launched otherwise than its counted step, or a non-triton row launched anything): each same-shape
    group is launched whole, at most 2 launches per group plus a constant."""
    import importlib.util

    result = _run("host", "--smoke", tmp_path=tmp_path)
    rows, params = result["results"], result["parameters"]
    # 2 layers x (q, k, v, o, gate, up, down) projected; 2 x 2 RMSNorms + the final one plain; 3 shapes.
    assert (params["projected"], params["plain"], params["groups"]) == (14, 5, 3)
    expected = {"adamw_fused", "adamw_foreach", "reference", "reference_fira", "reference_int8_bf16", "reference_fused"}
    if importlib.util.find_spec("galore_torch") is not None:
        expected.add("galore")
    triton_rows = (
        {"triton", "triton_fira", "triton_int8_bf16", "triton_fused"} if importlib.util.find_spec("triton") else set()
    )
    assert expected | triton_rows <= set(rows)
    for name, row in rows.items():
        assert row["step_s"] > 0 and row["us_per_parameter"] > 0 and row["vs_adamw_fused"] > 0, name
        assert len(row["step_s_runs"]) == result["steps"] == 3, name
    for name in triton_rows:
        launches = rows[name]["launches"]
        assert result["stubbed_launches"] and launches["total"] <= 2 * params["groups"] + 2, (name, launches)
        # q/k/v/o (8 matrices), gate/up (4) and down (2): every launch takes a whole group.
        assert set(launches["batch_sizes"]) == {2, 4, 8}, (name, launches)
    for name in expected:
        assert rows[name]["launches"]["total"] == 0, name
        assert rows[name]["torch_ops"] > 0, name
    # fused=True: the plain parameters skip on the device too, so a regular step reads nothing back.
    for name in {"reference_fused"} | (triton_rows & {"triton_fused"}):
        assert rows[name]["device_syncs"] == 0, (name, rows[name].get("host_read_sites"))
    assert rows["reference"]["device_syncs"] == 1  # the default: one read, for the plain parameters


def test_gpu_check_needs_a_gpu(tmp_path):
    """Without CUDA the one-command GPU check refuses with exit status 2 and says why, writing nothing."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: gpu_check would run")
    out = tmp_path / "out"
    proc = subprocess.run(
        [*_module("gpu_check"), "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "needs a CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


def test_gpu_check_dry_run(tmp_path):
    """--dry-run runs nowhere-near-a-GPU and lists every part, its budget and command; the aot part's
    selection (the preset launches' configurations matched against kernels.aot's variants) is made."""
    import re

    plan = _run("gpu_check", "--dry-run", "--out", str(tmp_path / "out"), tmp_path=tmp_path)
    parts = {p["name"]: p for p in plan["parts"]}
    assert list(parts) == [
        "versions",
        "probe",
        "precompile",
        "aot",
        "kernel_tests",
        "memory",
        "bench_step",
        "bench_refresh",
    ]
    assert sum(p["budget_s"] for p in plan["parts"]) > 0 and plan["budget_s"] == 300
    assert "tests/test_kernels.py" in parts["kernel_tests"]["command"]
    for name in ("bench_step", "bench_refresh"):
        assert f"scripts.bench.{name.removeprefix('bench_')} --model 1b" in parts[name]["command"], parts[name]
    assert "--model 7b-layer" in parts["bench_refresh"]["fallbacks"][0]
    if (SCRIPTS.parent / "kernels" / "aot.py").exists():
        assert re.match(r"[1-9]\d* aot variants selected", plan["aot"]), plan["aot"]
    else:
        assert plan["aot"].startswith("aot module missing"), plan["aot"]
    assert not (tmp_path / "out").exists()


def test_gpu_check_records_without_a_gpu(tmp_path, bench):
    """The GPU-only bookkeeping, on CPU: a part that overruns its budget is killed with its children and
    recorded as a timeout; a failing part is recorded and the summary still renders every part."""
    import os

    gpu_check = bench("gpu_check")
    sleeper = [
        sys.executable,
        "-c",
        "import subprocess, sys, time; "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
    ]
    code, _, seconds = gpu_check.run_command(sleeper, 2, dict(os.environ))
    assert code is None and seconds < 30
    slow = gpu_check.Part("kernel_tests", "a part that hangs", 2, sleeper)
    failing = gpu_check.Part(
        "bench_step",
        "a part that fails",
        60,
        [sys.executable, "-c", "raise SystemExit(3)", "--json", str(tmp_path / "x.json")],
    )
    short = gpu_check.Part("bench_refresh", "a part that needs more time than is left", 60, ["true"], needs_s=100)
    records = [gpu_check.run_part(p, 50, tmp_path, dict(os.environ)) for p in (slow, failing, short)]
    assert [r.status for r in records] == ["timeout", "failed", "skipped"]
    assert records[1].returncode == 3 and records[0].returncode is None
    text = gpu_check.markdown(records, 12.0, 300)
    for r in records:
        assert f"| {r.name} | {r.status} |" in text


def test_gpu_check_loop_on_cpu(tmp_path):
    """The orchestration that otherwise only runs on a lent GPU, forced onto the CPU: a part that works here
    (versions) and one that cannot (aot wants the GPU's architecture: it fails, in the background, and is
    recorded); one JSON and one markdown summary come out, in the plan's order, exit status 1."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [*_module("gpu_check"), "--without-gpu", "--only", "aot,versions", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=ENV,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    parts = {p["name"]: p for p in result["parts"]}
    assert list(parts) == ["versions", "aot"]
    assert parts["versions"]["status"] == "ok" and parts["versions"]["result"]["torch"]
    assert parts["aot"]["status"] == "failed" and parts["aot"]["returncode"] not in (0, None)
    text = (out / "gpu_check.md").read_text()
    assert "| versions | ok |" in text and "| aot | failed |" in text and "### aot: failed" in text


# ------------------------------------------------------------------------------------ the shared harness
def test_environment_record(bench):
    """One record for every result: device, CPU/GPU names, versions of what is installed, threads, the checkout's
    commit, the date and the command line."""
    import torch

    env = bench("common").environment("cpu")
    assert {
        "device",
        "device_name",
        "cpu",
        "cpu_cores",
        "gpu",
        "threads",
        "versions",
        "commit",
        "date",
        "command",
    } <= set(env)
    assert env["device"] == "cpu" and env["threads"] == torch.get_num_threads() > 0
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["gpu"] is None or isinstance(env["gpu"], str)
    assert env["commit"] is None or len(env["commit"].split("+")[0]) >= 7
    assert env["date"][:2] == "20" and env["command"].startswith("python")


def test_interleaved_rounds_medians_and_ratios(bench, monkeypatch):
    """Each round runs every variant once, in order (after ``before_round``); medians and per-round ratios against
    the baseline come from those rounds. A fake clock makes each variant's durations exact."""
    common = bench("common")
    clock, calls = [0.0], []
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    durations = {"base": [1.0, 2.0, 4.0], "half": [0.5, 1.0, 2.0], "odd": [3.0, 1.0, 2.0]}

    def step(name: str):
        def run() -> None:
            calls.append(name)
            clock[0] += durations[name][calls.count(name) - 1]

        return run

    timings = common.interleaved({n: step(n) for n in durations}, 3, before_round=lambda k: calls.append(f"round {k}"))
    assert calls == [
        "round 0",
        "base",
        "half",
        "odd",
        "round 1",
        "base",
        "half",
        "odd",
        "round 2",
        "base",
        "half",
        "odd",
    ]
    assert timings.runs == durations
    assert timings.ratios("odd", "base") == [3.0, 0.5, 0.5]
    summary = timings.summary("base")
    assert [summary[name]["median_s"] for name in durations] == [2.0, 1.0, 2.0]
    assert summary["half"]["vs_base"] == 0.5 and summary["odd"]["vs_base"] == 0.5 and summary["base"]["vs_base"] == 1.0


def test_render_table_from_result_file(bench, tmp_path):
    """The renderer turns a small result file into its markdown table, notes and environment lines."""
    result = {
        "benchmark": "demo",
        "tables": [
            {
                "title": "Demo",
                "columns": ["optimizer", "ms"],
                "rows": [["adamw", "1.0"], ["ours", "2.5"]],
                "notes": ["a note"],
            }
        ],
        "notes": ["run note"],
        "environment": {
            "device": "cpu",
            "device_name": "Some CPU",
            "threads": 1,
            "cpu_cores": 2,
            "date": "2026-01-01",
            "commit": "abcdef0",
            "versions": {"torch": "2.9"},
            "command": "python -m scripts.bench.demo",
        },
    }
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(result))
    text = _render(path, tmp_path)
    assert text.splitlines()[:8] == [
        "### Demo",
        "",
        "- a note",
        "",
        "| optimizer | ms |",
        "| --- | --- |",
        "| adamw | 1.0 |",
        "| ours | 2.5 |",
    ]
    assert "- note: run note" in text and "commit abcdef0" in text and "`python -m scripts.bench.demo`" in text
    assert bench("render").render(result, tables=[2]).startswith("- note: run note")


def test_shapes_read_from_configs(bench):
    """Every LLaMA size the benchmarks use is the configs/ yaml's, and the library defaults are the option table's."""
    import yaml

    from subspace_optim import options
    from subspace_optim.pretrain.config import configs_dir

    common = bench("common")
    for path in sorted(configs_dir().glob("llama_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        shape = common.llama_shape(path.stem.removeprefix("llama_"))
        assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.vocab, shape.rank) == (
            cfg["hidden_size"],
            cfg["intermediate_size"],
            cfg["num_hidden_layers"],
            cfg["num_attention_heads"],
            cfg["tokenizer_vocab"],
            cfg["rank"],
        ), path
        assert len(shape.projected()) == 7 * cfg["num_hidden_layers"]
    one = common.llama_shape("7b-layer")
    assert one.layers == 1 and one.projected()[4] == (11008, 4096)
    assert bench("memory").MODELS["1b"] == (2048, 5461, 24, 32000, 512)
    for name in ("refresh", "step"):
        args = bench(name).parse_args(["--smoke"])
        assert (args.oversample, args.power_iters) == (options.DEFAULTS["oversample"], options.DEFAULTS["power_iters"])


def test_docs_tables_are_generated_from_their_result_files(bench):
    """Every generated block of docs/benchmarks.md is exactly what its committed result file renders (a table
    edited by hand, or a result file rerun without ``render --docs``, fails here)."""
    render = bench("render")
    doc = ROOT / "docs" / "benchmarks.md"
    assert render.GENERATED.search(doc.read_text()), "docs/benchmarks.md has no generated block"
    assert render.regenerate(doc, check=True) == []


def test_docs_regenerate_finds_and_rewrites_a_stale_block(bench, tmp_path):
    """A block whose text differs from its result file is reported, and rewritten without ``check``; the text
    around it stays."""
    render = bench("render")
    result = {"tables": [{"title": "T", "columns": ["a"], "rows": [["1"]]}]}
    (tmp_path / "r.json").write_text(json.dumps(result))
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- generated: r.json --level 4 -->\n| a |\n| edited |\n<!-- end generated -->\nafter\n")
    assert render.regenerate(doc, check=True) == ["r.json --level 4"]
    assert "edited" in doc.read_text()  # check leaves the file alone
    assert render.regenerate(doc) == ["r.json --level 4"]
    assert doc.read_text() == (
        "before\n<!-- generated: r.json --level 4 -->\n#### T\n\n| a |\n| --- |\n| 1 |\n<!-- end generated -->\nafter\n"
    )
    assert render.regenerate(doc, check=True) == []


def test_bench_rounding_smoke(tmp_path, bench):
    """fp32, bf16 and stochastically rounded bf16 weights on the tiny model, and the timed training steps."""
    pytest.importorskip("torchao")  # the int8 rows
    result = _run("rounding", "--smoke", "--out", str(tmp_path / "runs"), tmp_path=tmp_path)
    names = [r["name"] for r in result["rows"]]
    assert names == [name for name, _ in bench("rounding").ROWS]
    assert all(len(r["losses"]) == 1 and r["mean_loss"] > 0 for r in result["rows"])
    assert result["rows"][0]["vs_fp32"] == 0.0
    assert list(result["step_time"]["median_s"]) == [name for name, _ in bench("rounding").TIMED]
    assert result["step_time"]["ratio"]["bf16, round to nearest"] == 1.0
    assert set(result["step_time"]["optimizer_median_s"]) == set(result["step_time"]["median_s"])
    assert all(0 < t < result["step_time"]["median_s"][n] for n, t in result["step_time"]["optimizer_median_s"].items())


def test_bench_rounding_step_time_only(tmp_path):
    """``--step-time-only``: the timed steps and their table, no training run."""
    pytest.importorskip("torchao")  # the int8 row
    result = _run("rounding", "--smoke", "--step-time-only", "--out", str(tmp_path / "runs"), tmp_path=tmp_path)
    assert result["rows"] == [] and not (tmp_path / "runs").exists()
    assert [t["title"] for t in result["tables"]] == ["Low-precision weights: a whole training step"]
