"""Tier 5: a tiny LLaMA trained on real text (the Python standard library's source) for 200 steps.

SubspaceAdamW with rank = hidden / 4 must end within 5% of AdamW's held-out loss. The per-policy
comparison that picked the default lives in scripts/bench/moments.py and docs/benchmarks.md.
"""

from __future__ import annotations

import pytest
import tiny_lm
import torch

import subspace_optim as so
from subspace_optim.pretrain import corpus

HIDDEN = 64


@pytest.fixture(scope="module")
def data():
    return (
        tiny_lm.byte_tokens(corpus.stdlib_text(1_000_000)),
        tiny_lm.byte_tokens(corpus.stdlib_text(100_000, split="heldout")),
    )


def _train(data, make_optimizer, steps=200, seed=0):
    model = tiny_lm.tiny_llama(hidden=HIDDEN, intermediate=172, layers=2, seed=seed)
    return tiny_lm.train(model, make_optimizer(model), *data, steps=steps, batch=8, seq=64, seed=seed)


@pytest.fixture(scope="module")
def adamw_result(data):
    return _train(data, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0))


def test_corpus_is_real_deterministic_text_with_disjoint_heldout():
    a, b = corpus.stdlib_text(50_000), corpus.stdlib_text(50_000)
    held = corpus.stdlib_text(50_000, split="heldout")
    assert a == b and len(a.encode()) <= 50_000 and len(a) > 40_000
    assert "def " in a and "import " in a
    assert a[:2000] != held[:2000]
    with pytest.raises(ValueError, match="split"):
        corpus.stdlib_text(10, split="valid")


def test_adamw_learns(adamw_result):
    losses = adamw_result.losses
    assert losses[0] > 5.0  # ~ln(256) at init
    assert sum(losses[-10:]) / 10 < 0.6 * losses[0]


@pytest.mark.parametrize("moments", ["rotate", "keep", "reset"])
def test_subspace_within_5_percent_of_adamw(data, adamw_result, moments):
    rank = HIDDEN // 4
    result = _train(
        data,
        lambda m: so.SubspaceAdamW(
            so.param_groups(m, "all-linear", rank=rank, update_gap=50, moments=moments), lr=1e-2
        ),
    )
    assert result.eval_loss <= 1.05 * adamw_result.eval_loss, (result.eval_loss, adamw_result.eval_loss)
    assert sum(result.losses[-10:]) / 10 < 0.6 * result.losses[0]


def _subspace(**dtypes):
    dtypes.setdefault("residual", "none")  # the runs these tests compare were written without a residual

    def make(m):
        return so.SubspaceAdamW(so.param_groups(m, "all-linear", rank=HIDDEN // 4, update_gap=50), lr=1e-2, **dtypes)

    return make


@pytest.fixture(scope="module")
def fp32_state_result(data):
    return _train(data, _subspace())


@pytest.mark.parametrize(
    "moments_dtype,basis_dtype", [("bfloat16", "bfloat16"), ("int8", "float32"), ("int8", "bfloat16")]
)
def test_low_precision_state_trains_like_fp32_state(data, adamw_result, fp32_state_result, moments_dtype, basis_dtype):
    """8-bit (bitsandbytes-style) or bf16 moments and bf16 bases, plain parameters (embedding, head) 8-bit
    too: still within 5% of AdamW, and within 2% of the same run with fp32 state."""
    low = _train(data, _subspace(moments_dtype=moments_dtype, basis_dtype=basis_dtype))
    assert low.eval_loss <= 1.05 * adamw_result.eval_loss, (low.eval_loss, adamw_result.eval_loss)
    assert low.eval_loss <= 1.02 * fp32_state_result.eval_loss, (low.eval_loss, fp32_state_result.eval_loss)


@pytest.mark.parametrize("residual", ["fira", "fira_tensor", "apollo"])
def test_every_residual_mode_trains_like_adamw(data, adamw_result, fp32_state_result, residual):
    """Each residual mode (the discarded gradient recovered, norm-growth limited) learns: within 5% of AdamW
    and of the same run without a residual. Which mode is best is measured by scripts/bench/quality.py."""
    result = _train(data, _subspace(residual=residual))
    assert result.eval_loss <= 1.05 * adamw_result.eval_loss, (result.eval_loss, adamw_result.eval_loss)
    assert result.eval_loss <= 1.05 * fp32_state_result.eval_loss, (result.eval_loss, fp32_state_result.eval_loss)
    assert sum(result.losses[-10:]) / 10 < 0.6 * result.losses[0]
