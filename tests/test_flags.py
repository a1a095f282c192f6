"""The finiteness kernel (``kernels/flags.py``) answers exactly as ``checks.nonfinite_flags``: per gradient, is
any entry NaN, Inf, or not below its limit. Run under the interpreter on CPU (``conftest``), on CUDA when
present."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from subspace_optim import checks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients of every kernel dtype and awkward sizes (empty, one element, not multiples of the block, several
    blocks), with NaN, +-Inf and over-limit entries at the first, last and a middle position, and clean ones."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 7, 1023, 1024, 1025, 5000, 40_000]
    grads, limits = [], []
    for i, n in enumerate(sizes * 2):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        g = torch.randn(n, generator=gen).to(dtype)
        if n and i % 4:
            where = (0, n - 1, n // 2)[i % 3]
            g[where] = (float("nan"), float("inf"), -float("inf"), 60.0)[i % 4]
        grads.append(g.reshape(-1, 1) if n % 2 else g)  # a few 2-D ones (contiguous all the same)
        limits.append((math.inf, 50.0, 1e30, 4.5)[i % 4])
    return [g.to(DEVICE) for g in grads], torch.tensor(limits, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_kernel_flags_what_the_torch_test_flags(seed):
    from subspace_optim.kernels.flags import nonfinite_flags

    grads, limits = _case(seed)
    want = checks.nonfinite_flags(grads, limits, [])
    got = nonfinite_flags(grads, limits)
    assert want.any() and not want.all()  # the case has both answers
    assert torch.equal(got.cpu(), want.cpu())


def test_a_value_just_below_and_at_the_limit():
    """``|x| < limit`` exactly as the torch test compares max |G| with the fp32 limit: at the limit is bad."""
    from subspace_optim.kernels.flags import nonfinite_flags

    limit = torch.tensor([3.0, 3.0, 3.0], device=DEVICE)
    grads = [torch.tensor(v, device=DEVICE) for v in ([2.9999998], [3.0], [-3.0])]
    assert (
        nonfinite_flags(grads, limit).tolist()
        == checks.nonfinite_flags(grads, limit, []).tolist()
        == [False, True, True]
    )


def test_launches_split_by_size_class_and_grid_limit(monkeypatch):
    """One launch per dtype and size class (a small gradient does not get a large one's programs), at most
    ``_MAX_GRADIENTS`` gradients each (CUDA's grid limit, made 3 here): the same flags."""
    from subspace_optim.kernels import flags

    monkeypatch.setattr(flags, "_MAX_GRADIENTS", 3)
    monkeypatch.setattr(flags, "_ITERATIONS", 1)  # size classes at every block
    grads, limits = _case(5)
    shape = flags.layout(grads)
    assert all(len(idx) <= 3 for _, idx, _, _ in shape.groups)
    assert len({programs for *_, programs in shape.groups}) > 1
    assert sorted(i for _, idx, _, _ in shape.groups for i in idx) == list(range(len(grads)))
    want = checks.nonfinite_flags(grads, limits, [])
    assert torch.equal(flags.nonfinite_flags(grads, limits, shape).cpu(), want.cpu())
