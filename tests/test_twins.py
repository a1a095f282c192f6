"""The twin contract as code: the reference functions and their Triton twins take the same parameters, and the
scalar table the kernels read has one definition (``kernels.step.SCALAR_COLUMNS``)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from subspace_optim import adam_rule, functional
from subspace_optim.kernels import refresh as kernel_refresh
from subspace_optim.kernels import step as kernel_step

TWINS = {"subspace_adamw": kernel_step.subspace_adamw, "refresh_bases": kernel_refresh.refresh_bases}


def _parameters(fn, leave_out: tuple[str, ...]) -> list[tuple[str, object, object, object]]:
    """(name, kind, default, annotation) of every parameter of ``fn`` but ``leave_out``, in order."""
    params = inspect.signature(fn).parameters.values()
    return [(p.name, p.kind, p.default, p.annotation) for p in params if p.name not in leave_out]


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twins_take_the_same_parameters(name):
    """Every parameter but the documented engine-only ones: same name, kind, default and annotation, same order;
    and the same return annotation."""
    reference, twin = getattr(functional, name), TWINS[name]
    assert _parameters(reference, functional.REFERENCE_ONLY[name]) == _parameters(twin, functional.TWIN_ONLY[name])
    assert inspect.signature(reference).return_annotation == inspect.signature(twin).return_annotation


@pytest.mark.parametrize("name", sorted(TWINS))
def test_documented_differences_exist(name):
    """The documented differences name real parameters of their side (a stale entry would hide a rename)."""
    assert set(functional.REFERENCE_ONLY[name]) <= set(inspect.signature(getattr(functional, name)).parameters)
    assert set(functional.TWIN_ONLY[name]) <= set(inspect.signature(TWINS[name]).parameters)
    assert not set(functional.TWIN_ONLY[name]) & set(inspect.signature(getattr(functional, name)).parameters)


def test_scalar_table_rows_follow_the_named_columns():
    """A host row holds each ``AdamScalars`` field at its named column and a clear skip flag; the kernels' row
    length and offsets are the constexprs derived from the same names."""
    scalars = adam_rule.adam_scalars(3e-3, (0.85, 0.97), 1e-7, 0.1, 0.5, age=7)
    row = kernel_step._scalar_row(scalars)
    assert len(row) == len(kernel_step.SCALAR_COLUMNS) == kernel_step.ROW.value
    for name, column in kernel_step.COLUMN.items():
        assert row[column] == (0.0 if name == "skip" else getattr(scalars, name)), name
    assert kernel_step.SKIP.value == kernel_step.COLUMN["skip"]
    assert kernel_step.ALPHA.value == kernel_step.COLUMN["alpha"]


def test_kernels_read_the_scalar_table_through_named_offsets():
    """No literal offset or row length into the scalar table is left in the kernels' source."""
    source = inspect.getsource(kernel_step)
    assert not re.search(r"tl\.load\(h \+ \d", source)
    assert not re.search(r"hyper \+ bid \* \d", source)
    assert re.search(r"hyper \+ bid \* ROW", source)


def test_scalar_table_applies_flags_and_lags_by_name():
    """``_scalar_table`` writes the skip flag into the skip column and scales alpha and sqrt(1 - b2^t) by the
    lag corrections, leaving every other column as the host row has it."""
    scalars = adam_rule.scalars_by_age(1e-3, (0.9, 0.999), 1e-8, 0.0, 1.0)
    flags = [torch.tensor(True), torch.tensor(False)]
    lags = [torch.tensor(2, dtype=torch.int32), torch.tensor(0, dtype=torch.int32)]
    table = kernel_step._scalar_table([5, 9], scalars, flags, lags, (0.9, 0.999), torch.device("cpu"))
    plain = kernel_step._scalar_table([5, 9], scalars, None, None, (0.9, 0.999), torch.device("cpu"))
    col = kernel_step.COLUMN
    assert table[:, col["skip"]].tolist() == [1.0, 0.0]
    fix = adam_rule.lag_vectors([5, 9], lags, (0.9, 0.999))
    assert table[0, col["alpha"]] == (plain[0, col["alpha"]] * fix.c1[0]).float()
    assert table[0, col["alpha"]] != plain[0, col["alpha"]]  # a lag of 2 changes alpha
    assert table[1, col["alpha"]] == plain[1, col["alpha"]]  # a lag of 0 is exactly 1.0
    others = [c for name, c in col.items() if name not in ("skip", "alpha", "bias2_sqrt")]
    assert torch.equal(table[:, others], plain[:, others])


def test_codes_without_their_absmax_are_refused_by_both_engines():
    """uint8 codes passed as a bare tensor (the old ``exp_avg_absmaxes=`` call without its lists): both engines
    raise the same TypeError before anything changes, instead of reading the codes as numbers."""
    from subspace_optim import quant

    gen = torch.Generator().manual_seed(3)
    w, g = torch.randn(6, 300, generator=gen), torch.randn(6, 300, generator=gen)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=gen))[0]
    state = {**quant.zeros((2, 300), "int8", torch.device("cpu"), "exp_avg")}
    state.update(quant.zeros((2, 300), "int8", torch.device("cpu"), "exp_avg_sq"))
    codes = state["exp_avg"].clone()
    before = w.clone()
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, scale=1.0, sides=["left"])
    for run in (functional.subspace_adamw, kernel_step.subspace_adamw):
        with pytest.raises(TypeError, match="uint8 codes with an absmax"):
            run([w], [g], [basis], [state["exp_avg"]], [quant.moment(state, "exp_avg_sq")], [1], **hyper)
        assert torch.equal(w, before) and torch.equal(state["exp_avg"], codes)
    plain = torch.randn(300, generator=gen)
    with pytest.raises(TypeError, match="uint8 codes with an absmax"):
        functional.adamw(
            [plain],
            [g[0]],
            [state["exp_avg"][0]],
            [state["exp_avg_sq"][0]],
            [torch.tensor(0.0)],
            lr=1e-3,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=0.0,
            foreach=None,
        )
