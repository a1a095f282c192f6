"""Kept CPU buffers (``workspace``): one buffer per name, device and dtype, grown to the largest request, whose
views callers reuse from step to step."""

from __future__ import annotations

import torch

from subspace_optim import workspace


def test_a_name_keeps_one_buffer_that_grows_to_the_largest_request():
    a = workspace.kept("test_grow", (4, 5), torch.float32, torch.device("cpu"))
    b = workspace.kept("test_grow", (3, 2), torch.float32, torch.device("cpu"))
    assert b.shape == (3, 2) and b.data_ptr() == a.data_ptr()  # smaller: a view of the same storage
    c = workspace.kept("test_grow", (50,), torch.float32, torch.device("cpu"))
    assert c.numel() == 50 and c.untyped_storage().nbytes() >= 200
    d = workspace.kept("test_grow", (20,), torch.float32, torch.device("cpu"))
    assert d.data_ptr() == c.data_ptr()
    other = workspace.kept("test_other", (20,), torch.float32, torch.device("cpu"))
    ints = workspace.kept("test_grow", (20,), torch.int32, torch.device("cpu"))
    assert len({d.data_ptr(), other.data_ptr(), ints.data_ptr()}) == 3  # names and dtypes do not share


def test_fp32_copy_is_the_float_values_in_the_kept_buffer():
    x = torch.randn(7, 9, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = workspace.fp32_copy(x, "test_copy")
    assert y.dtype == torch.float32 and torch.equal(y, x.float())
    z = workspace.fp32_copy(x.T.contiguous(), "test_copy")  # the next use overwrites the same buffer
    assert z.data_ptr() == y.data_ptr() and torch.equal(z, x.T.float())
