"""Layer-wise updates under DDP and FSDP2 on 2 gloo processes: equal to one process on the averaged
gradient, ranks bitwise equal, with accumulation, with and without skipping the intermediate syncs."""

from __future__ import annotations

import dist_workers
import pytest
import torch
from test_distributed import _assert_bitwise_equal, _launch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.mark.parametrize(
    "accum,no_sync,options",
    [
        (3, True, {}),
        pytest.param(3, False, {}, marks=pytest.mark.slow),
        pytest.param(1, False, {"refresh_owner": "round_robin"}, marks=pytest.mark.slow),
        pytest.param(2, True, {"moments_dtype": "int8"}, marks=pytest.mark.slow),
    ],
)
def test_ddp_layerwise_equals_one_process(tmp_path, accum, no_sync, options):
    steps = 5  # refreshes at steps 0, 2, 4
    r0, r1 = _launch(tmp_path, "ddp_layerwise", steps=steps, accum=accum, no_sync=no_sync, **options)
    _assert_bitwise_equal(r0["weights"], r1["weights"])
    assert r0["refresh_counts"] == [3, 3, 3]
    assert r0["kept"] and r0["freed"]
    reference = dist_workers.single_process_mlp_accum(steps, accum, **options)
    tol = 1e-6 if options.get("moments_dtype", "float32") == "float32" else 1e-4
    for k, v in reference.items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("accum,no_sync", [(2, True), pytest.param(2, False, marks=pytest.mark.slow)])
def test_fsdp2_layerwise_equals_one_process(tmp_path, accum, no_sync):
    steps = 5  # refreshes at steps 0 and 3
    r0, r1 = _launch(tmp_path, "fsdp_layerwise", steps=steps, accum=accum, no_sync=no_sync)
    _assert_bitwise_equal(r0["weights"], r1["weights"])
    assert r0["freed"] and r1["freed"]
    assert r0["gate_refresh_count"] == 2
    reference = dist_workers.single_process_llama_accum(steps, accum)
    for k, v in reference.items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("weights", ["int8", pytest.param("bf16", marks=pytest.mark.slow)])
def test_fsdp2_layerwise_low_precision_weights_round_as_step(tmp_path, weights):
    """FSDP2 row shards of torchao's int8 weights (and of bf16 weights rounded stochastically): layer-wise updates
    with accumulation write the same bits as ``step()`` on the same run, each shard rounded with its own bits."""
    if weights == "int8":
        pytest.importorskip("torchao")
    runs = {}
    for layerwise in (True, False):
        out = tmp_path / str(layerwise)
        out.mkdir()
        runs[layerwise] = _launch(out, "fsdp_layerwise", steps=4, accum=2, no_sync=True, weights=weights,
                                  layerwise=layerwise)  # fmt: skip
    for rank in range(2):
        _assert_bitwise_equal(runs[True][rank]["weights"], runs[False][rank]["weights"])
    assert runs[True][0]["freed"] and runs[True][0]["gate_refresh_count"] == 2
    assert any(k.endswith(".int_data") for k in runs[True][0]["weights"]) == (weights == "int8")
