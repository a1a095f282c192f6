"""``state_bytes`` counts what each optimizer really holds: logical bytes per distinct tensor, retained
bytes per storage kept alive, projector objects one level deep, tensor subclasses by their inner tensors."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

from subspace_optim import SubspaceAdamW, quant
from subspace_optim.metrics import state_bytes, state_footprint


def _params(*shapes: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        params.append(p)
    return params


def _galore_torch():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return pytest.importorskip("galore_torch")


def test_torch_adamw_exact():
    params = _params((30, 20), (7,), (5, 3, 2))
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    # exp_avg and exp_avg_sq in the parameter's dtype, plus a 0-d fp32 step tensor per parameter.
    expected = sum(2 * p.numel() * 4 + 4 for p in params)
    assert state_bytes(opt) == expected
    assert state_bytes(opt, retained=True) == expected
    assert isinstance(state_bytes(opt), int)
    assert state_footprint(opt) == (expected, expected)


def test_torch_adamw_bf16_exact():
    params = _params((30, 20), (7,), dtype=torch.bfloat16)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    assert state_bytes(opt) == sum(2 * p.numel() * 2 + 4 for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_galore_torch_counts_the_basis(dtype):
    galore_torch = _galore_torch()
    m, n, r = 48, 32, 8
    tall, wide, vec = _params((m, n), (n, m), (16,), dtype=dtype)
    group = {"params": [tall, wide], "rank": r, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    opt = galore_torch.GaLoreAdamW([group, {"params": [vec]}], lr=1e-3, no_deprecation_warning=True)
    opt.step()
    size = torch.empty((), dtype=dtype).element_size()
    # Per projected matrix: two m x r moments and the r x n basis (galore-torch keeps both in the weight's
    # dtype); the vector: two moments. galore-torch's step counter is a Python int.
    moments = 2 * (2 * m * r * size) + 2 * 16 * size
    basis = 2 * (r * n * size)
    logical = state_bytes(opt)
    assert logical == moments + basis
    retained = state_bytes(opt, retained=True)
    assert retained >= logical
    for p in (tall, wide):
        assert opt.state[p]["projector"].ortho_matrix.numel() == r * n
    if dtype == torch.float32:
        # The fp32 basis is a slice of the SVD factor (Vh or U, n x n here), which it keeps alive.
        assert opt.state[tall]["projector"].ortho_matrix.untyped_storage().nbytes() == n * n * 4
        assert retained == moments + 2 * (n * n * 4)
        assert retained > logical
    else:
        assert retained == logical  # bf16: the basis is a copy of exactly its size


def test_galore_torch_full_projection_counts_both_factors():
    galore_torch = _galore_torch()
    (w,) = _params((24, 40))
    group = {"params": [w], "rank": 4, "update_proj_gap": 200, "scale": 0.25, "proj_type": "full"}
    opt = galore_torch.GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True)
    opt.step()
    left, right = opt.state[w]["projector"].ortho_matrix
    assert state_bytes(opt) == 2 * 4 * 4 * 4 + (left.numel() + right.numel()) * 4


@pytest.mark.parametrize("moments_dtype", quant.MOMENT_DTYPES)
@pytest.mark.parametrize("basis_dtype", quant.BASIS_DTYPES)
def test_subspace_adamw(moments_dtype, basis_dtype):
    m, n, r = 600, 300, 260  # r > 256: two absmax blocks per row of an m x r moment
    w, v, emb = _params((m, n), (40,), (100, 64))
    opt = SubspaceAdamW(
        [{"params": [w], "rank": r}, {"params": [v, emb]}], moments_dtype=moments_dtype, basis_dtype=basis_dtype
    )
    opt.step()
    expected = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    assert state_bytes(opt) == state_bytes(opt, retained=True) == expected
    basis = {"float32": 4, "bfloat16": 2, "int8": 1}[basis_dtype] * n * r
    basis += n * math.ceil(r / 256) * 4 if basis_dtype == "int8" else 0  # an absmax per 256 entries of a row
    moment = {"float32": 4, "bfloat16": 2, "int8": 1}[moments_dtype]
    projected = basis + 2 * m * r * moment + (2 * m * math.ceil(r / 256) * 4 if moments_dtype == "int8" else 0)
    projected += 4  # the default residual's limiter state (update_norm, fp32)
    plain_moment = 1 if moments_dtype == "int8" else moment
    plain = 2 * 40 * (4 if moments_dtype == "int8" else moment) + 2 * 100 * 64 * plain_moment + 2 * 4
    plain += 2 * 100 * 4 if moments_dtype == "int8" else 0  # absmax of the 100 x 64 codes: one block per row
    assert expected == projected + plain


def test_no_tensor_state_and_python_numbers():
    (p,) = _params((4, 4))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.step()
    assert state_bytes(opt) == 0 == state_bytes(opt, retained=True)


def test_shared_storage_counted_once():
    (p,) = _params((10, 10))
    opt = torch.optim.SGD([p], lr=0.1)
    whole = torch.zeros(10, 10)
    state = opt.state[p]
    state["a"] = whole
    state["same"] = whole  # the same tensor twice
    state["again"] = whole.view(100).view(10, 10)  # the same view, another tensor object
    state["rows"] = whole[:3]  # a view of 3 rows: its own logical bytes, no new storage
    state["nested"] = {"list": [whole, (whole[:3],)]}
    assert state_bytes(opt) == 400 + 120
    assert state_bytes(opt, retained=True) == 400


def test_projector_object_one_level_deep():
    class Inner:
        def __init__(self) -> None:
            self.hidden = torch.zeros(1000)

    class Projector:
        def __init__(self) -> None:
            self.ortho_matrix = torch.zeros(5, 6)
            self.pair = [torch.zeros(2), torch.zeros(3)]
            self.rank = 5
            self.inner = Inner()  # two levels deep: not counted

    (p,) = _params((4, 4))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["projector"] = Projector()
    opt.state[p]["module"] = nn.Linear(100, 100)  # modules are not state objects
    assert state_bytes(opt) == (30 + 2 + 3) * 4


def test_dtensor_free_local_counting():
    """Without a process group, ``local`` leaves plain tensors alone and the counts are the plain ones; a
    DTensor would count ``to_local()`` (tests/test_distributed.py runs sharded optimizers)."""
    from subspace_optim.distributed import local

    t = torch.zeros(6, 5)
    assert local(t) is t
    (p,) = _params((6, 5))
    opt = torch.optim.Adam([p])
    opt.step()
    assert state_bytes(opt) == 2 * 30 * 4 + 4


class _Packed(torch.Tensor):
    """A traceable wrapper subclass that presents fp32 values but holds uint8 codes and one fp32 scale per
    row, like torchao's 8-bit optimizer state: its outer numel x 4 bytes is not what it holds."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=torch.float32, device=codes.device)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.codes = codes
        self.scale = scale

    def __tensor_flatten__(self):
        return ["codes", "scale"], None

    @staticmethod
    def __tensor_unflatten__(inner, ctx, outer_size, outer_stride):
        return _Packed(inner["codes"], inner["scale"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"_Packed does not implement {func}")


def test_tensor_subclass_counts_inner_tensors():
    (p,) = _params((32, 64))
    opt = torch.optim.SGD([p], lr=0.1)
    packed = _Packed(torch.zeros(32, 64, dtype=torch.uint8), torch.zeros(32, 1))
    opt.state[p]["exp_avg"] = packed
    assert state_bytes(opt) == 32 * 64 + 32 * 4  # not 32 * 64 * 4
    assert state_bytes(opt, retained=True) == 32 * 64 + 32 * 4


def test_bitsandbytes_adamw8bit_cpu():
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    bnb = pytest.importorskip("bitsandbytes")
    big, big2, small = _params((64, 300), (130, 70), (50, 20))  # 19200 and 9100 >= 4096 (min_8bit_size), 1000 <
    opt = bnb.optim.AdamW8bit([big, big2, small], lr=1e-3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
    except Exception as err:  # pragma: no cover - a build without CPU kernels
        pytest.skip(f"bitsandbytes AdamW8bit does not run on CPU here: {err}")
    assert opt.state[big]["state1"].dtype == torch.uint8
    quantized = sum(2 * p.numel() + 2 * math.ceil(p.numel() / 256) * 4 for p in (big, big2))
    qmaps = 2 * 256 * 4  # the signed and unsigned maps: one tensor each, shared by every parameter's state
    assert opt.state[big]["qmap1"] is opt.state[big2]["qmap1"]
    assert state_bytes(opt) == quantized + qmaps + 2 * small.numel() * 4
    assert state_bytes(opt, retained=True) == state_bytes(opt)


def test_meta_device_state():
    """Optimizers that build on the meta device are counted without memory (scripts/bench/memory.py)."""
    with torch.device("meta"):
        params = [nn.Parameter(torch.empty(4096, 1024)) for _ in range(3)]
        for p in params:
            p.grad = torch.empty_like(p)
    opt = torch.optim.AdamW(params)
    opt.step()
    assert state_bytes(opt) == 3 * (2 * 4096 * 1024 * 4 + 4)
    assert state_bytes(opt, retained=True) == state_bytes(opt)
