"""With a seeded projection on apollo-torch's own stream, SubspaceAdamW follows apollo-torch 1.0.3's APOLLOAdamW.

The configuration: ``refresh="seeded", seed_stream="apollo", moments="keep", limiter="raw"``, residual ``apollo``
(channel-wise scaling) or ``apollo_tensor`` (tensor-wise), and ``scale = sqrt(s)`` for APOLLO's scale s (apollo-torch
multiplies its update by sqrt(s)). Two differences remain by design, both far below the tolerance with gradients of
order one and no weight decay: apollo-torch adds eps to sqrt(v) before the bias correction (torch AdamW after it),
and adds 1e-8 to the norms it divides by. With weight decay it also decays after the update (torch before it).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import run_structured

from subspace_optim import SubspaceAdamW, projections, triton_runtime

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    apollo_torch = pytest.importorskip("apollo_torch")

SHAPES = [(24, 10), (10, 24), (16, 16)]  # m > n (right projection), m < n (left), square
APOLLO = {"rank": 4, "scale_type": "channel", "scale": 1.0}
APOLLO_MINI = {"rank": 1, "scale_type": "tensor", "scale": 128.0}


def _run(opt_factory, steps):
    return run_structured(opt_factory, SHAPES, steps)  # gradients with structure, the same for both


def _apollo(config, gap):
    def build(ws):
        group = {"params": ws, "proj": "random", "update_proj_gap": gap, "proj_type": "std", **config}
        return apollo_torch.APOLLOAdamW([group], lr=1e-2, eps=1e-6, weight_decay=0.0)

    return build


def _ours(config, gap, **extra):
    residual = "apollo" if config["scale_type"] == "channel" else "apollo_tensor"

    def build(ws):
        return SubspaceAdamW(
            [{"params": ws, "rank": config["rank"], "update_proj_gap": gap, "scale": math.sqrt(config["scale"])}],
            lr=1e-2,
            eps=1e-6,
            refresh="seeded",
            seed_stream="apollo",
            moments="keep",
            residual=residual,
            limiter="raw",
            **extra,
        )

    return build


ENGINES = ["reference"] + (["triton"] if triton_runtime.available() else [])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("config", [APOLLO, APOLLO_MINI], ids=["apollo", "apollo_mini"])
def test_trajectory_matches_apollo_torch(config, engine):
    steps, gap = 23, 5
    ref_w, _ = _run(_apollo(config, gap), steps)
    our_w, opt = _run(_ours(config, gap, engine=engine), steps)
    for a, b in zip(ref_w, our_w, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)
    # apollo-torch's cadence (steps 0, 5, ..., 20) and its seed chain: position 1, 2, 3, then next_seed.
    for position, w in enumerate(our_w, start=1):
        state = opt.state[w]
        assert state["refresh_count"] == 5 and "basis" not in state
        seed = position
        for _ in range(4):
            seed = projections.apollo_next_seed(seed)
        assert state["projection_seed"] == seed


def test_the_limiter_and_the_scale_matter():
    """Guards for the test above: the corrected limiter and an unmapped scale give other trajectories, so the
    parity is not vacuous (the raw limiter acts on these steps, and APOLLO-Mini's scale is not ours)."""
    ref_w, _ = _run(_apollo(APOLLO_MINI, 5), 23)
    corrected_w, _ = _run(_corrected(APOLLO_MINI, 5), 23)
    assert max(float((a - b).abs().max()) for a, b in zip(ref_w, corrected_w, strict=True)) > 1e-3


def _corrected(config, gap):
    build = _ours(config, gap)

    def with_corrected(ws):
        opt = build(ws)
        for group in opt.param_groups:
            group["limiter"] = "corrected"
        return opt

    return with_corrected


def test_apollo_seed_chain_is_apollo_torchs():
    """``apollo_next_seed`` is apollo-torch's ``next_seed``, and the projection its ``stable_randn`` draw."""
    from apollo_torch.random_projector import GradientProjector, next_seed

    for seed in (1, 2, 17, 2**40 + 3):
        assert projections.apollo_next_seed(seed) == next_seed(seed)
    g = torch.randn(24, 10)
    for shape, side in (((24, 10), "right"), ((10, 24), "left")):
        g = torch.randn(*shape)
        proj = GradientProjector(3, update_proj_gap=5, proj_type="std", seed=7)
        low = proj.project(g, 0)
        ours = projections.seeded_projection(min(shape), 3, side, 7, torch.device("cpu"), "apollo")
        expected = ours.mT @ g if side == "left" else g @ ours
        torch.testing.assert_close(low, expected, rtol=0, atol=0)
