"""`subspace-optim pretrain`: config precedence, data sources, tokenizer cache, resume, report, errors, DDP.

Everything runs a tiny LLaMA (hidden 32, 2 layers) on a few KB of standard-library text for a handful of
steps, so the file stays well under a minute of CPU; the one 2-process test launches real torchrun workers.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("tokenizers")

from subspace_optim.pretrain import config as config_mod  # noqa: E402
from subspace_optim.pretrain import (  # noqa: E402
    corpus,  # noqa: E402
    data,
    loop,
    main,
    optimizers,
    run,
    tokenizer,
)
from subspace_optim.pretrain.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A text file of real standard-library source and a tokenizer cache shared by the module's tests."""
    root = tmp_path_factory.mktemp("pretrain")
    (root / "text.txt").write_text(corpus.stdlib_text(120_000), encoding="utf-8")
    return root


def tiny(workdir: Path, out: Path, *extra: str) -> list[str]:
    """Flags for a seconds-long run: tiny model, short sequences, every refresh-related path exercised."""
    return [
        "--dataset",
        str(workdir / "text.txt"),
        "--cache-dir",
        str(workdir / "cache"),
        "--output-dir",
        str(out),
        "--hidden-size",
        "32",
        "--intermediate-size",
        "64",
        "--num-hidden-layers",
        "2",
        "--num-attention-heads",
        "2",
        "--tokenizer-vocab",
        "320",
        "--tokenizer-train-bytes",
        "60000",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--rank",
        "4",
        "--update-gap",
        "2",
        "--eval-every",
        "0",
        "--eval-windows",
        "4",
        "--save-every",
        "0",
        "--no-progress",
        *extra,
    ]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = loop.Checkpoints(run_dir, 1).latest()
    assert latest is not None, f"no checkpoint in {run_dir}"
    return load_file(str(latest / "model.safetensors"))


def log(run_dir: Path) -> dict:
    return json.loads((run_dir / "log.json").read_text())


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------- config
def test_yaml_then_flags_precedence(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("hidden_size: 48\nnum_attention_heads: 3\nrank: 7\nlr: {adamw: 1.0e-3, subspace: 2.0e-2}\n")
    cfg = load_config(["--model", str(path)])
    assert (cfg.hidden_size, cfg.rank, cfg.lr_for("subspace")) == (48, 7, 0.02)
    cfg = load_config(
        ["--model", str(path), "--rank", "5", "--lr", "subspace=0.05,adamw=1e-3", "--compare", "subspace"]
    )
    assert (cfg.rank, cfg.lr_for("subspace"), cfg.optimizer) == (5, 0.05, ["subspace"])
    default = load_config([])
    assert default.model == "llama_9m" and default.optimizer == ["adamw", "subspace"]
    paper = load_config(["--model", "llama_60m", "--steps", "3"])
    assert (paper.hidden_size, paper.intermediate_size, paper.num_hidden_layers, paper.num_attention_heads) == (
        512,
        1376,
        8,
        8,
    )
    assert (paper.seq_len, paper.global_batch_size, paper.steps) == (256, 512, 3)


def test_every_model_size_builds_on_meta():
    sizes = {
        "llama_9m": 128,
        "llama_20m": 256,
        "llama_60m": 512,
        "llama_130m": 768,
        "llama_350m": 1024,
        "llama_1b": 2048,
        "llama_7b": 4096,
    }
    assert set(sizes) <= set(config_mod.model_names())
    for name, hidden in sizes.items():
        cfg = load_config(["--model", name])
        with torch.device("meta"):
            model = loop.build_model(cfg, 32000)
        assert model.config.hidden_size == hidden and cfg.seq_len == 256
    with torch.device("meta"):
        seven = loop.build_model(load_config(["--model", "llama_7b"]), 32000)
    assert 6.5e9 < sum(p.numel() for p in seven.parameters()) < 7e9


def test_yaml_unknown_key_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hiden_size: 64\n")
    with pytest.raises(ValueError, match=r"unknown option 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        load_config(["--model", str(path)])


def test_configs_dir_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(config_mod.CONFIGS_ENV, str(tmp_path))
    monkeypatch.setattr(config_mod, "__file__", str(tmp_path / "a" / "b" / "config.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model configs found.*SUBSPACE_OPTIM_CONFIGS"):
        config_mod.configs_dir()


# Each SubspaceAdamW keyword, the pretrain flags that set it, and the value those flags give (not the default).
SUBSPACE_KEYWORD_FLAGS = {
    "lr": (["--lr", "adamw=1e-3,subspace=0.0123"], 0.0123),
    "betas": (["--adam-beta1", "0.8", "--adam-beta2", "0.95"], (0.8, 0.95)),
    "eps": (["--adam-eps", "1e-7"], 1e-7),
    "weight_decay": (["--weight-decay", "0.05"], 0.05),
    "rank": (["--rank", "3"], 3),
    "update_gap": (["--update-gap", "7"], 7),
    "scale": (["--scale", "0.5"], 0.5),
    "refresh": (["--refresh", "rsvd"], "rsvd"),
    "moments": (["--moments", "keep"], "keep"),
    "proj_type": (["--proj-type", "left"], "left"),
    "oversample": (["--oversample", "3"], 3),
    "power_iters": (["--power-iters", "2"], 2),
    "seed": (["--subspace-seed", "11"], 11),
    "nonfinite": (["--nonfinite", "raise"], "raise"),
    "engine": (["--engine", "reference"], "reference"),
    "foreach": (["--foreach", "true"], True),
    "fused": (["--subspace-fused", "false"], False),  # not True beside foreach=True (torch's rule)
    "refresh_owner": (["--refresh-owner", "round_robin"], "round_robin"),
    "consistency_check_every": (["--consistency-check-every", "3"], 3),
    "matmul_precision": (["--matmul-precision", "ieee"], "ieee"),
    "moments_dtype": (["--moments-dtype", "int8"], "int8"),
    "basis_dtype": (["--basis-dtype", "bfloat16"], "bfloat16"),
    "residual": (["--residual", "fira_tensor"], "fira_tensor"),
    "plain_lr": (["--plain-lr", "adamw=1e-3,subspace=0.004"], 0.004),
    "seed_stream": (["--seed-stream", "apollo"], "apollo"),
    "limiter": (["--limiter", "raw"], "raw"),
    "second_moment": (["--second-moment", "factored"], "factored"),
    "plain_moments_dtype": (["--plain-moments-dtype", "int4"], "int4"),
    "plain_second_moment": (["--plain-second-moment", "full"], "full"),
    "stochastic_rounding": (["--stochastic-rounding"], True),
}


def test_every_subspace_adamw_option_is_a_flag_that_reaches_the_optimizer():
    """A keyword added to SubspaceAdamW.__init__ must get a pretrain flag: each one's flag value (never the
    class default) lands in the projected param group of the optimizer `--optimizer subspace` builds."""
    import inspect

    from subspace_optim import SubspaceAdamW

    params = inspect.signature(SubspaceAdamW.__init__).parameters
    # ``preset`` names a dict of options, not an option: tests/test_presets.py follows --preset into the groups.
    keywords = {n for n, p in params.items() if n not in ("self", "params", "preset") and p.kind is not p.VAR_KEYWORD}
    assert keywords == set(SUBSPACE_KEYWORD_FLAGS), "give each new SubspaceAdamW option a pretrain flag"
    argv = shlex.split(
        "--hidden-size 32 --intermediate-size 64 --num-hidden-layers 1 --num-attention-heads 2 --optimizer subspace"
    )
    for flags, _ in SUBSPACE_KEYWORD_FLAGS.values():
        argv += flags
    cfg = load_config(argv)
    built = optimizers.build("subspace", loop.build_model(cfg, 64), cfg)
    assert isinstance(built, SubspaceAdamW)
    projected = [g for g in built.param_groups if g["rank"] is not None]
    assert len(projected) == 1 and len(projected[0]["params"]) == 7  # q, k, v, o, gate, up, down
    for keyword, (flags, value) in SUBSPACE_KEYWORD_FLAGS.items():
        default = params[keyword].default
        assert value != default, f"{keyword}: pick a flag value other than the default {default!r}"
        assert projected[0][keyword] == value, f"{' '.join(flags)} did not reach SubspaceAdamW's {keyword}"


# ------------------------------------------------------------------------------------------- errors
def test_unknown_model_size():
    with pytest.raises(ValueError, match=r"unknown model size 'llama_5m'.*llama_9m.*llama_7b"):
        load_config(["--model", "llama_5m"])


def test_missing_dataset_path(workdir, tmp_path, capsys):
    cfg = load_config(tiny(workdir, tmp_path / "out", "--dataset", str(tmp_path / "nope.jsonl")))
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file or directory"):
        run(cfg)
    assert main(tiny(workdir, tmp_path / "out", "--dataset", "./missing/dir")) == 2
    assert "--dataset ./missing/dir: no such file or directory" in capsys.readouterr().err


def test_optimizer_not_installed(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "apollo_torch", None)  # importing it now raises ImportError
    cfg = load_config(tiny(workdir, tmp_path, "--compare", "adamw,apollo"))
    with pytest.raises(optimizers.MissingOptimizer, match=r"'apollo' needs the apollo-torch package.*pip install"):
        run(cfg)
    assert main(tiny(workdir, tmp_path, "--optimizer", "apollo")) == 2
    assert "pip install apollo-torch" in capsys.readouterr().err
    assert not (tmp_path / "apollo").exists()  # failed before any training


def test_galore8bit_is_refused_on_cpu_before_training(workdir, tmp_path, capsys):
    """galore-torch's GaLoreAdamW8bit calls torch.cuda.synchronize() in every step: on CPU the run stops
    up front with a clear reason (like an optimizer that is not installed), not with a crash at step 1."""
    pytest.importorskip("galore_torch")
    with pytest.raises(optimizers.MissingOptimizer, match=r"'galore8bit'.*needs a CUDA GPU.*this run is on cpu"):
        optimizers.require("galore8bit", "cpu")
    cfg = load_config(tiny(workdir, tmp_path, "--optimizer", "galore8bit", "--lr", "1e-2", "--cpu"))
    with pytest.raises(optimizers.MissingOptimizer, match=r"galore8bit out of --optimizer/--compare"):
        optimizers.build("galore8bit", loop.build_model(cfg, 320), cfg)
    assert main(tiny(workdir, tmp_path, "--compare", "adamw,galore8bit", "--lr", "1e-2", "--cpu")) == 2
    err = capsys.readouterr().err
    assert "'galore8bit'" in err and "needs a CUDA GPU" in err and "torch.cuda.synchronize()" in err
    assert not (tmp_path / "adamw").exists() and not (tmp_path / "galore8bit").exists()  # nothing trained


def test_an_optimizer_that_cannot_run_here_is_refused_before_its_missing_lr(workdir, tmp_path, monkeypatch, capsys):
    """llama_9m.yaml has no lr for galore8bit. Whether an optimizer can run at all (its package, CUDA) is reported
    first: asking for an lr that could not help sent users round twice. A missing lr is still refused before any
    data is read or anything is written."""
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "galore_torch", None)  # importing it now raises ImportError
        assert main(tiny(workdir, tmp_path, "--optimizer", "galore8bit", "--cpu")) == 2
        err = capsys.readouterr().err
        assert "needs the galore-torch package" in err and "no learning rate" not in err, err
    assert main(tiny(workdir, tmp_path, "--optimizer", "subspace", "--lr", "adamw=1e-3")) == 2
    err = capsys.readouterr().err
    assert "no learning rate for optimizer 'subspace'" in err and "add subspace=<lr> to --lr" in err, err
    assert not any(tmp_path.iterdir())  # nothing trained or written
    pytest.importorskip("galore_torch")
    assert main(tiny(workdir, tmp_path, "--compare", "adamw,galore8bit", "--cpu")) == 2
    err = capsys.readouterr().err
    assert "'galore8bit'" in err and "needs a CUDA GPU" in err and "no learning rate" not in err, err
    assert not any(tmp_path.iterdir())
    cfg = load_config(tiny(workdir, tmp_path, "--optimizer", "galore8bit", "--cpu"))
    with pytest.raises(optimizers.MissingOptimizer, match="needs a CUDA GPU"):  # the Python API in the same order
        optimizers.build("galore8bit", loop.build_model(cfg, 320), cfg)


def test_galore8bit_gets_bitsandbytes_defaults(monkeypatch):
    """galore-torch 1.0 passes percentile_clipping and block_wise positionally, which bitsandbytes 0.50
    reads as max_unorm=100 and skip_zeros=True; the pretrain build puts the defaults back."""
    galore_torch = pytest.importorskip("galore_torch")
    weight = torch.nn.Parameter(torch.randn(256, 512))
    weight.grad = torch.randn(256, 512)
    group = {"params": [weight], "rank": 16, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    opt = optimizers.fix_galore8bit_args(galore_torch.GaLoreAdamW8bit([group], lr=1e-3))
    assert (opt.args.max_unorm, opt.args.skip_zeros) == (0.0, False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)  # its unconditional call, on CPU
    try:
        opt.step()
    except Exception as err:  # pragma: no cover - a bitsandbytes build without CPU kernels
        pytest.skip(f"bitsandbytes 8-bit step does not run on CPU here: {err}")
    assert "unorm_vec" not in opt.state[weight]  # no update-norm clipping state
    assert opt.state[weight]["state1"].dtype == torch.uint8


def test_unknown_optimizer_name(capsys):
    with pytest.raises(SystemExit):
        load_config(["--compare", "adamw,sgd"])
    assert "unknown optimizer 'sgd'" in capsys.readouterr().err


def test_rank_larger_than_model(workdir, tmp_path):
    cfg = load_config(tiny(workdir, tmp_path, "--rank", "33", "--optimizer", "subspace"))
    with pytest.raises(ValueError, match=r"--rank 33 is larger than the model's dimensions.*at most 32"):
        run(cfg)
    with pytest.raises(ValueError, match="--rank 33 is larger"):
        optimizers.build("galore", loop.build_model(cfg, 320), cfg)


# ------------------------------------------------------------------------------------------- data
def _write_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"txt": root / "d.txt", "jsonl": root / "d.jsonl", "json": root / "d.json", "parquet": root / "d.parquet"}
    paths["txt"].write_text("\n".join(docs), encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    paths["json"].write_text(json.dumps([{"text": d} for d in docs]))
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), paths["parquet"])
    return paths


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "json", "parquet"])
def test_local_dataset_formats(tmp_path, fmt):
    docs = [f"def function_{i}(x):\n    return x * {i}  # document {i}\n" * 20 for i in range(60)]
    path = _write_formats(tmp_path, docs)[fmt]
    cfg = load_config(["--dataset", str(path)])
    got = data.load_corpus(cfg)
    assert got.train and got.heldout
    text = "".join(got.train + got.heldout)
    assert "def function_0(x)" in text and "document 59" in text
    if fmt != "txt":  # records are documents: each lands whole in exactly one split
        assert sorted(got.train + got.heldout) == sorted(docs)
        assert not set(got.train) & set(got.heldout)


def test_local_dataset_directory_and_bad_field(tmp_path):
    docs = [f"line {i} " * 50 for i in range(30)]
    _write_formats(tmp_path, docs)
    got = data.load_corpus(load_config(["--dataset", str(tmp_path)]))
    assert len(got.train) + len(got.heldout) > 30  # all four files were read
    with pytest.raises(ValueError, match=r"no 'body' field.*--text-field"):
        data.load_corpus(load_config(["--dataset", str(tmp_path / "d.jsonl"), "--text-field", "body"]))


@pytest.mark.parametrize(
    "spec",
    [
        "my_corpus/",
        "data/corpus/",
        "./corpus",
        "~/corpus",
        "/nonexistent/corpus",
        "corpus.txt",
        "data/corpus.csv",
        "a/b/c",
    ],
)
def test_local_looking_dataset_that_is_missing_never_reaches_the_hub(spec, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"{spec!r} was sent to the hub"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.looks_like_path(spec) and data.looks_like_path("shards/*.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no such file or directory.*give an existing folder or file, or a"):
        data.load_corpus(load_config(["--dataset", spec]))


@pytest.mark.parametrize(
    "spec", ["allenai/c4", "wikitext", "mlfoundations/dclm-baseline-1.0", "data/corpus", "org/wiki.en", "org/corpus.v2"]
)
def test_hub_shaped_dataset_names(spec, monkeypatch, tmp_path):
    """owner/name stays a hub name unless it exists here; a failed hub load says no local path exists either."""
    datasets = pytest.importorskip("datasets")
    assert not data.looks_like_path(spec)

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"there is no local file or folder {spec} .*hub dataset failed.*offline"):
        data.load_corpus(load_config(["--dataset", spec]))
    local = tmp_path / spec
    local.mkdir(parents=True)
    (local / "d.txt").write_text("def f(x):\n    return x\n" * 500, encoding="utf-8")
    assert data.load_corpus(load_config(["--dataset", spec])).description.startswith(f"local: {spec}")


def test_builtin_corpus_is_real_text_with_disjoint_heldout():
    got = data.builtin_corpus(200_000, 50_000)
    train, heldout = "".join(got.train), "".join(got.heldout)
    assert 150_000 < len(train) <= 200_000 and 10_000 < len(heldout) <= 50_000
    assert "def " in train and "import " in heldout
    assert heldout[:2000] not in train


def test_hub_dataset_streams_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        if split == "validation" and name == "someone/no-validation":
            raise ValueError("Unknown split 'validation'")
        return iter([{"text": f"{split} document {i} " * 40} for i in range(200)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = data.load_corpus(
        load_config(["--dataset", "someone/corpus", "--dataset-config", "en", "--max-train-bytes", "20000"])
    )
    assert ("someone/corpus", "en", "train", True) in calls
    assert all("validation document" in d for d in got.heldout) and all("train document" in d for d in got.train)
    got = data.load_corpus(load_config(["--dataset", "someone/no-validation", "--max-train-bytes", "20000"]))
    assert got.heldout and all("train document" in d for d in got.heldout)


def test_batches_depend_only_on_seed_and_step():
    tokens = data.TokenData(
        torch.arange(10_000, dtype=torch.int32), torch.arange(500, dtype=torch.int32), tokenizer=None, description=""
    )
    a = tokens.batch(5, seed=0, rows=8, seq_len=16)
    assert a.shape == (8, 17) and a.dtype == torch.long
    assert torch.equal(a, tokens.batch(5, seed=0, rows=8, seq_len=16))
    assert not torch.equal(a, tokens.batch(6, seed=0, rows=8, seq_len=16))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 16, dtype=torch.long))  # contiguous windows


def test_tokenizer_cache(tmp_path, monkeypatch):
    text = tokenizer.chunks(corpus.stdlib_text(40_000), 4096)
    first = tokenizer.cached_bpe(text, 300, tmp_path)
    assert first.trained_now and first.path.is_file() and first.vocab_size == 300
    monkeypatch.setattr(tokenizer, "train_bpe", lambda *a, **k: pytest.fail("the cache was not used"))
    second = tokenizer.cached_bpe(text, 300, tmp_path)
    assert not second.trained_now and second.path == first.path and second.fingerprint == first.fingerprint
    sample = ["def f(x):\n    return x\n"]
    assert second.encode_batch(sample) == first.encode_batch(sample)
    monkeypatch.undo()
    other = tokenizer.cached_bpe(text, 280, tmp_path)
    assert other.trained_now and other.path != first.path
    named = tokenizer.named_tokenizer(str(first.path))  # --tokenizer path/to/tokenizer.json
    assert named.fingerprint == first.fingerprint


# ------------------------------------------------------------------------------------------- runs
def test_resume_parity_and_interrupted_save(workdir, tmp_path, monkeypatch):
    """6 straight steps == 3 steps, a kill while saving step 5, resume from 3, finish at 6: bitwise."""
    common = ("--compare", "adamw,subspace", "--steps", "6", "--eval-every", "3")
    straight = tmp_path / "straight"
    run(load_config(tiny(workdir, straight, *common)))

    split = tmp_path / "split"
    run(load_config(tiny(workdir, split, *common, "--stop-at", "3")))
    assert log(split / "subspace")["status"] == "stopped"

    import accelerate

    real_save = accelerate.Accelerator.save_state

    def killed_midway(self, output_dir=None, **kwargs):
        real_save(self, output_dir, **kwargs)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"truncated")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        run(load_config(tiny(workdir, split, *common, "--resume", "--stop-at", "5")))
    monkeypatch.undo()
    ckpts = loop.Checkpoints(split / "adamw", 1)
    assert ckpts.latest().name == "step-00000003"  # the half-written step-5 checkpoint is not used

    run(load_config(tiny(workdir, split, *common, "--resume")))
    for name in ("adamw", "subspace"):
        assert_same_weights(final_weights(straight / name), final_weights(split / name))
        a, b = log(straight / name), log(split / name)
        assert [h["loss"] for h in a["state"]["history"]] == [h["loss"] for h in b["state"]["history"]]
        assert a["state"]["evals"][-1]["loss"] == b["state"]["evals"][-1]["loss"]
        assert b["status"] == "finished"
    assert log(split / "subspace")["summary"]["refreshes"] == 3  # steps 0, 2, 4, across the resume
    assert not list((split / "adamw" / "checkpoints").glob(".tmp-*"))  # the stale temporary was cleaned

    with pytest.raises(ValueError, match=r"cannot resume.*rank: 4 -> 2"):
        run(load_config(tiny(workdir, split, *common, "--resume", "--rank", "2", "--steps", "8")))


@pytest.mark.parametrize("weights", [["--weights", "bf16", "--stochastic-rounding"], ["--weights", "int8"]])
def test_low_precision_weights_resume_bit_exactly(workdir, tmp_path, weights):
    """bf16 weights rounded stochastically and torchao's int8 weights: 6 straight steps == 3, then a resume to 6,
    bit for bit (the rounding's bits depend on seed, parameter and step only)."""
    if weights[1] == "int8":
        pytest.importorskip("torchao")
    common = ("--compare", "subspace", "--steps", "6", "--eval-every", "3", *weights)
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(load_config(tiny(workdir, straight, *common)))
    run(load_config(tiny(workdir, split, *common, "--stop-at", "3")))
    run(load_config(tiny(workdir, split, *common, "--resume")))
    a, b = log(straight / "subspace"), log(split / "subspace")
    assert [h["loss"] for h in a["state"]["history"]] == [h["loss"] for h in b["state"]["history"]]
    last = [loop.Checkpoints(d / "subspace", 1).latest() for d in (straight, split)]
    if weights[1] == "int8":
        from subspace_optim import int8_weights

        int8_weights.allow_weights_only_checkpoints()
        first, second = (torch.load(c / "pytorch_model.bin", weights_only=True) for c in last)
        quantized = [k for k, v in first.items() if int8_weights.is_int8(v)]
        assert quantized and all(torch.equal(first[k].int_data, second[k].int_data) for k in quantized)
    else:
        first, second = (final_weights(d / "subspace") for d in (straight, split))
        assert all(v.dtype == torch.bfloat16 for v in first.values())
    for key in first:
        assert torch.equal(
            first[key].dequantize() if hasattr(first[key], "int_data") else first[key],
            second[key].dequantize() if hasattr(second[key], "int_data") else second[key],
        ), key


def test_resume_refuses_another_schedule(workdir, tmp_path, capsys):
    """The effective lr, warmup and --steps are part of a run's identity: a resumed LambdaLR keeps the
    checkpoint's base lr (the log would record a new --lr that is not used), and a new warmup or length
    would bend the schedule mid-run."""
    out = tmp_path / "sched"
    base = ("--optimizer", "adamw", "--steps", "6", "--lr", "3e-3")
    run(load_config(tiny(workdir, out, *base, "--stop-at", "2")))
    with pytest.raises(ValueError, match=r"cannot resume.*--lr \(adamw\): 0\.003 -> 1e-05.*Pass the original"):
        run(load_config(tiny(workdir, out, *base, "--lr", "1e-5", "--resume")))
    with pytest.raises(ValueError, match=r"--warmup-steps \(the warmup in effect.*\): 1 -> 3"):
        run(load_config(tiny(workdir, out, *base, "--warmup-steps", "3", "--resume")))
    with pytest.raises(ValueError, match=r"--steps: 6 -> 12.*--steps cannot change on resume"):
        run(load_config(tiny(workdir, out, *base, "--steps", "12", "--warmup-steps", "1", "--resume")))
    assert main(tiny(workdir, out, *base, "--lr", "1e-5", "--resume")) == 2
    assert "--lr (adamw): 0.003 -> 1e-05" in capsys.readouterr().err
    assert log(out / "adamw")["state"]["step"] == 2  # nothing was trained by the refused resumes
    # The same effective settings spelled differently resume: another optimizer's lr and the default
    # warmup (10% of 6 steps -> 1) written out.
    run(
        load_config(
            tiny(
                workdir,
                out,
                *base[:-2],
                "--lr",
                "adamw=3e-3,subspace=5e-2",
                "--warmup-steps",
                "1",
                "--resume",
                "--stop-at",
                "3",
            )
        )
    )
    resumed = log(out / "adamw")
    assert resumed["state"]["step"] == 3 and resumed["lr"] == 3e-3
    assert resumed["state"]["history"][-1]["lr"] == pytest.approx(3e-3 * loop.lr_multiplier(2, 1, 6, 0.1))


def test_resume_without_a_checkpoint_starts_fresh(workdir, tmp_path, capsys):
    """--resume with nothing to resume trains a new run and says so in one line (scripts/finetune.py prints the
    same line), so a job script can pass --resume from its first launch on."""
    out = tmp_path / "fresh"
    run(load_config(tiny(workdir, out, "--optimizer", "adamw", "--steps", "2", "--resume", "--no-report")))
    assert log(out / "adamw")["status"] == "finished" and log(out / "adamw")["state"]["step"] == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if "no checkpoint" in line]
    assert lines == [f"[adamw] --resume: no checkpoint found in {out / 'adamw' / 'checkpoints'}; starting a new run"]


def test_stopped_run_reports_its_last_eval_with_its_step(workdir, tmp_path, capsys):
    """A run ended by --stop-at is evaluated there, and the summary line and the report say at which step
    each eval loss was taken (it printed the step-0 eval as the final one)."""
    out = tmp_path / "stop"
    path = run(load_config(tiny(workdir, out, "--optimizer", "adamw", "--steps", "6", "--stop-at", "3")))
    evals = log(out / "adamw")["state"]["evals"]
    assert [e["step"] for e in evals] == [0, 3] and evals[1]["loss"] < evals[0]["loss"]
    start, last = evals[0]["loss"], evals[1]["loss"]
    assert f"adamw: step 3/6, eval loss {start:.3f} (step 0) -> {last:.3f} (step 3)" in capsys.readouterr().out
    assert f"| {start:.3f} → {last:.4f} (step 3) |" in path.read_text()


def test_lr_multiplier_is_linear_warmup_then_cosine_to_the_floor():
    warmup, total, floor = 4, 12, 0.2
    lrs = [loop.lr_multiplier(s, warmup, total, floor) for s in range(total + 3)]
    assert lrs[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # from near 0 up to the peak, linearly
    assert lrs[warmup] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[warmup:total], lrs[warmup + 1 : total + 1], strict=True))  # decays every step
    assert lrs[warmup + (total - warmup) // 2] == pytest.approx((1 + floor) / 2)  # cosine: halfway at the middle
    assert lrs[warmup + (total - warmup) // 4] == pytest.approx(floor + (1 - floor) * (1 + 2**-0.5) / 2)
    assert lrs[total:] == pytest.approx([floor] * 3)  # the floor at the end, and after it
    assert loop.lr_multiplier(0, 0, 10, 0.1) == 1.0  # no warmup: the first step at the peak


def test_loop_clips_gradients_and_follows_the_schedule(workdir, tmp_path):
    """What the optimizer sees at each step: the global gradient norm clipped to --max-grad-norm (an
    untrained LLaMA's is far above 1e-3) and the lr of warmup + cosine, also as logged."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def observe(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        seen.append((float(norm), optimizer.param_groups[0]["lr"]))

    handle = register_optimizer_step_pre_hook(observe)
    try:
        flags = (
            "--optimizer",
            "adamw",
            "--lr",
            "3e-3",
            "--steps",
            "5",
            "--warmup-steps",
            "2",
            "--min-lr-ratio",
            "0.1",
            "--max-grad-norm",
            "1e-3",
            "--no-report",
        )
        run(load_config(tiny(workdir, tmp_path, *flags)))
    finally:
        handle.remove()
    expected = [3e-3 * loop.lr_multiplier(s, 2, 5, 0.1) for s in range(5)]
    assert [lr for _, lr in seen] == pytest.approx(expected, rel=1e-12)
    assert [h["lr"] for h in log(tmp_path / "adamw")["state"]["history"]] == pytest.approx(expected, rel=1e-12)
    assert [norm for norm, _ in seen] == pytest.approx([1e-3] * 5, rel=1e-3)


def _runs_here(name: str) -> bool:
    try:
        optimizers.require(name)
    except optimizers.MissingOptimizer:
        return False
    return True


def test_report_holds_the_measured_numbers(workdir, tmp_path):
    names = ["adamw", "subspace"] + [n for n in ("galore", "adamw8bit") if _runs_here(n)]
    out = tmp_path / "cmp"
    report_path = run(load_config(tiny(workdir, out, "--compare", ",".join(names), "--steps", "4")))
    assert report_path == out / "report.md"
    text = report_path.read_text()
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text
    numbers = json.loads((out / "report.json").read_text())
    assert [r["optimizer"] for r in numbers["runs"]] == names
    # what was tuned is on the page: llama_9m.yaml's measured lrs, plain lrs and the sweep that chose them
    assert "learning rates: adamw 0.002 (plain parameters 0.03), subspace 0.01 (plain parameters 0.03)" in text
    assert "chosen by: adamw, subspace and galore: the best of the llama_9m sweep" in text
    assert "residual fira, " in text or "residual fira)" in text
    for name in names:
        s = log(out / name)["summary"]
        assert f"{s['final_eval_loss']:.4f}" in text and f"{s['final_eval_ppl']:.2f}" in text
        assert s["state_bytes"] > 0 and s["peak_memory_bytes"] > 0 and s["step_time_s"] > 0
    adamw, subspace = log(out / "adamw")["summary"], log(out / "subspace")["summary"]
    assert subspace["state_bytes"] < adamw["state_bytes"]
    assert subspace["refreshes"] == 2 and f"2 ({subspace['refresh_seconds_total']:.2f} s)" in text


def test_cli_entry_point_runs(workdir, tmp_path):
    """The installed command and the script wrapper both reach the same main."""
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pretrain.py"),
            *tiny(workdir, out, "--optimizer", "adamw", "--steps", "2"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Report: {out / 'report.md'}" in proc.stdout
    from subspace_optim import cli

    assert cli.main(["--help"]) == 0 and cli.main(["nonsense"]) == 2


# ------------------------------------------------------------------------------------------- distributed
def _torchrun_two_processes() -> list[str]:
    """The command that launches ``subspace-optim pretrain`` in 2 local processes (a fresh port each time)."""
    launch = shlex.split("-m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port")
    return [sys.executable, *launch, str(_free_port()), *shlex.split("-m subspace_optim.cli pretrain")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp(workdir: Path, out: Path, launcher: list[str], *extra: str) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    flags = tiny(workdir, out, "--optimizer", "subspace", "--steps", "8", *extra)
    proc = subprocess.run([*launcher, *flags], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return log(out / "subspace")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_end_bitwise_identical(workdir, tmp_path):
    """2 gloo processes, different global seeds, 4 refreshes, gradient accumulation: both ranks end with
    the same weights, and the run follows the single-process run with the same global batch."""
    torchrun = _torchrun_two_processes()
    batch = ("--global-batch-size", "8")  # 2 processes x batch 2 x accumulation 2
    result = _ddp(workdir, tmp_path / "ddp", torchrun, *batch, "--consistency-check-every", "1")
    summary = result["summary"]
    assert result["world_size"] == 2 and result["grad_accum"] == 2
    assert summary["global_seeds"] == [0, 1]  # each process's global RNG was seeded differently
    assert summary["refreshes"] == 4  # steps 0, 2, 4, 6
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

    run(load_config(tiny(workdir, tmp_path / "one", "--optimizer", "subspace", "--steps", "8", *batch)))
    single = log(tmp_path / "one" / "subspace")
    assert single["world_size"] == 1 and single["grad_accum"] == 4
    torch.testing.assert_close(
        [h["loss"] for h in result["state"]["history"]],
        [h["loss"] for h in single["state"]["history"]],
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_train_int8_weights_bitwise_alike(workdir, tmp_path):
    """``--weights int8`` under 2 processes: DDP wraps torchao's weights without its initial broadcast (every rank
    builds the same model), the requantization's seeded bits keep the ranks equal, and the run's weights stay int8."""
    pytest.importorskip("torchao")
    result = _ddp(workdir, tmp_path / "ddp8", _torchrun_two_processes(), "--weights", "int8")
    summary = result["summary"]
    assert result["world_size"] == 2 and result["config"]["weights"] == "int8"
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_the_command_destroys_the_process_group_only_after_a_finished_run(monkeypatch):
    """A launched ``subspace-optim pretrain`` leaves its process group itself (not to interpreter exit), and only
    once the run has finished: a run stopped by a configuration error keeps the group it was given."""
    import subspace_optim.pretrain as pretrain

    def refuse(argv):
        raise ValueError("bad flag")

    def join():
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)

    calls = []
    monkeypatch.setattr(pretrain, "load_config", lambda argv: argv)
    monkeypatch.setattr(pretrain, "run", lambda cfg, command: calls.append(torch.distributed.is_initialized()))
    join()
    try:
        assert pretrain.main(["--steps", "1"]) == 0
        assert calls == [True] and not torch.distributed.is_initialized()

        join()
        monkeypatch.setattr(pretrain, "load_config", refuse)
        assert pretrain.main(["--steps", "x"]) == 2
        assert torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_accelerate_launch_config_starts_two_processes(workdir, tmp_path):
    pytest.importorskip("accelerate.commands.launch")
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs" / "accelerate_cpu_2proc.yaml"),
        "--main_process_port",
        str(_free_port()),
        str(REPO / "scripts" / "pretrain.py"),
        "--cpu",
    ]
    result = _ddp(workdir, tmp_path / "acc", launcher, "--refresh-owner", "round_robin")
    digests = result["summary"]["weight_digests"]
    assert result["world_size"] == 2 and digests[0] == digests[1]


def test_layerwise_equals_regular_stepping_and_resumes_exactly(workdir, tmp_path):
    """--layerwise with --grad-accum 2: the same weights as regular stepping when clipping is off (where the two
    must agree); 2 steps, stop, resume, 2 more == 4 straight; a resume with --layerwise flipped is refused."""
    common = (
        "--optimizer",
        "subspace",
        "--lr",
        "1e-2",
        "--steps",
        "4",
        "--grad-accum",
        "2",
        "--no-report",
        "--max-grad-norm",
        "0",
    )
    run(load_config(tiny(workdir, tmp_path / "regular", *common)))
    run(load_config(tiny(workdir, tmp_path / "layerwise", *common, "--layerwise")))
    straight = final_weights(tmp_path / "layerwise" / "subspace")
    assert_same_weights(final_weights(tmp_path / "regular" / "subspace"), straight)
    assert log(tmp_path / "layerwise" / "subspace")["config"]["layerwise"] is True

    split = tmp_path / "split"
    run(load_config(tiny(workdir, split, *common, "--layerwise", "--stop-at", "2")))
    with pytest.raises(ValueError, match="cannot resume.*layerwise"):
        run(load_config(tiny(workdir, split, *common, "--resume")))
    run(load_config(tiny(workdir, split, *common, "--layerwise", "--resume")))
    assert_same_weights(straight, final_weights(split / "subspace"))


def test_layerwise_clips_by_its_rule(workdir, tmp_path):
    """--max-grad-norm reaches the layer-wise clipping: a tiny bound changes the trajectory."""
    base = ("--optimizer", "subspace", "--lr", "1e-2", "--steps", "2", "--no-report", "--layerwise")
    run(load_config(tiny(workdir, tmp_path / "free", *base, "--max-grad-norm", "0")))
    run(load_config(tiny(workdir, tmp_path / "clipped", *base, "--max-grad-norm", "1e-3")))
    a, b = final_weights(tmp_path / "free" / "subspace"), final_weights(tmp_path / "clipped" / "subspace")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_layerwise_ddp_two_processes_follow_one_process(workdir, tmp_path):
    """--layerwise under torchrun (DDP, accumulation 2, no_sync on the first micro-batch): ranks end bitwise
    identical and the losses follow one process with the same global batch."""
    torchrun = _torchrun_two_processes()
    batch = ("--global-batch-size", "8", "--max-grad-norm", "0")
    result = _ddp(workdir, tmp_path / "ddp", torchrun, *batch, "--layerwise")
    assert result["world_size"] == 2 and result["grad_accum"] == 2 and result["config"]["layerwise"]
    digests = result["summary"]["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    run(load_config(tiny(workdir, tmp_path / "one", "--optimizer", "subspace", "--steps", "8", *batch)))
    single = log(tmp_path / "one" / "subspace")
    torch.testing.assert_close(
        [h["loss"] for h in result["state"]["history"]],
        [h["loss"] for h in single["state"]["history"]],
        rtol=1e-4,
        atol=1e-5,
    )


def test_int8_weights_under_fsdp_are_refused_before_training(workdir, tmp_path, monkeypatch, capsys):
    """accelerate cannot checkpoint torchao's int8 weights under FSDP, and every run checkpoints: a run whose
    accelerator is FSDP is refused at set-up, with the ways out, before any run directory is made; DDP and
    single-process runs pass the check."""
    pytest.importorskip("torchao")
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from subspace_optim.pretrain.loop import refuse_unsavable

    allowed = [("int8", DistributedType.MULTI_GPU), ("int8", DistributedType.NO), ("bf16", DistributedType.FSDP)]
    for weights, kind in allowed:
        refuse_unsavable(weights, kind)
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    with pytest.raises(ValueError, match=r"^--weights int8 under FSDP: accelerate's save_state cannot write .*DDP"):
        run(load_config(tiny(workdir, tmp_path, "--optimizer", "subspace", "--weights", "int8")))
    assert main(tiny(workdir, tmp_path, "--optimizer", "subspace", "--weights", "int8")) == 2
    assert "--weights int8 under FSDP" in capsys.readouterr().err
    assert not (tmp_path / "subspace").exists()  # nothing was made, nothing trained
