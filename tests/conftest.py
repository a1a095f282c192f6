from __future__ import annotations

import copy
import io
import os

import torch
from torch import nn

# Without CUDA the Triton kernels run under Triton's interpreter. This must be decided before anything
# imports triton (galore-torch imports bitsandbytes, which imports triton and caches its settings), so it
# is set here, when pytest loads the conftest, not in test_kernels.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """At most 2 intra-op threads (CI's count), restored after each test so one test's count never leaks."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def gradient_like(m: int, n: int, rank: int, *, decay: float = 0.7, noise: float = 1e-2, seed: int = 0):
    """A random m x n matrix with a geometrically decaying spectrum plus noise, like a real gradient."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    s = decay ** torch.arange(k, dtype=torch.float64)
    s[rank * 3 :] *= 0.1
    g = (u * s) @ v.T + noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / (m * n) ** 0.5
    return g.float()


def orthonormality_error(q: torch.Tensor) -> float:
    q = q.double()
    return float((q.T @ q - torch.eye(q.shape[1], dtype=torch.float64)).abs().max())


def subspace_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A A^T - B B^T||_2 for orthonormal A, B: 0 for the same subspace."""
    a, b = a.double(), b.double()
    return float(torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2))


def snapshot(opt, params):
    """The optimizer's state dict and the weights, copied: what ``assert_unchanged`` compares against."""
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def assert_unchanged(opt, params, snap):
    """Weights and every state entry bit-identical to ``snapshot``'s: a refused step changed nothing."""
    sd, weights = snap
    for p, before in zip(params, weights, strict=True):
        assert torch.equal(p, before)
    now = opt.state_dict()["state"]
    assert now.keys() == sd["state"].keys()
    for pid, entry in sd["state"].items():
        for k, v in entry.items():
            assert torch.equal(now[pid][k], v) if isinstance(v, torch.Tensor) else now[pid][k] == v, (pid, k)


def roundtrip(obj):
    """``obj`` saved with ``torch.save`` and loaded back with ``weights_only=True``, as a Trainer resume loads it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_same_state(expected: dict, got: dict) -> None:
    """Two optimizer state dicts hold the same entries, equal bit for bit and dtype for dtype, and their groups the
    same lr (a resumed run against an uninterrupted one)."""
    assert expected["state"].keys() == got["state"].keys()
    for pid, entry in expected["state"].items():
        for key, value in entry.items():
            other = got["state"][pid][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), f"state {pid}.{key} differs"
            else:
                assert value == other, f"state {pid}.{key}: {value} != {other}"
    for group, other_group in zip(expected["param_groups"], got["param_groups"], strict=True):
        assert group["lr"] == other_group["lr"]


def run_structured(opt_factory, shapes, steps, seed=0):
    """Weights of ``shapes`` trained ``steps`` steps by ``opt_factory(weights)`` on gradients with structure (not
    isotropic noise), changing with the weight and the step: how the peer-parity tests drive both optimizers."""
    torch.manual_seed(seed)
    weights = [nn.Parameter(torch.randn(*s)) for s in shapes]
    targets = [torch.randn(*s) for s in shapes]
    mix = [torch.randn(s[1], s[1]) / s[1] ** 0.5 for s in shapes]
    opt = opt_factory(weights)
    for step in range(steps):
        for w, t, a in zip(weights, targets, mix, strict=True):
            w.grad = ((w.detach() - t) @ a) * (1.0 + 0.5 * torch.cos(torch.tensor(step * 0.7)))
        opt.step()
    return weights, opt
