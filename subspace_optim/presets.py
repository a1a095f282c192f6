"""Named configurations picked from the memory-quality frontier (docs/benchmarks.md, "Memory-quality frontier").

A preset is a plain dict of ``SubspaceAdamW`` options that any param group can take. It fills the options a group
does not set itself: ``SubspaceAdamW(groups, preset="balanced")`` puts it under every group's own keys (and over
the constructor's keywords, which are only defaults for the groups); ``param_groups(model, ..., preset=...)`` puts
it on the projected group under the options passed there. ``optim_args="preset=..."`` (Trainer) and ``--preset``
(``subspace-optim pretrain``) reach the same dicts.

- ``best_quality``: the lowest held-out loss of ours on the frontier: a stored, warm-refreshed fp32 basis and
  moments with Fira's residual.
- ``balanced``: at most GaLore 8-bit's state (int8 moments, bf16 bases at the same rank) at better quality: DCT
  bases (r indices), int8 first moment, factored second moment, Fira's residual.
- ``least_memory``: APOLLO-Mini's shape (rank 1, tensor-wise scaling, scale sqrt(128)) with nothing stored but
  an int8 first moment and two factors per matrix: LLaMA-7B weights + state 14.0 GB, below APOLLO-Mini's 14.53.
  A group's own ``rank`` overrides the preset's 1.
"""

from __future__ import annotations

import math
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "best_quality": {"residual": "fira"},
    "balanced": {"refresh": "dct", "residual": "fira", "moments_dtype": "int8", "second_moment": "factored"},
    "least_memory": {
        "rank": 1,
        "refresh": "seeded",
        "residual": "apollo_tensor",
        "moments": "keep",
        "scale": math.sqrt(128.0),
        "moments_dtype": "int8",
        "second_moment": "factored",
    },
}


def options_of(name: str) -> dict[str, Any]:
    """A copy of preset ``name``'s options; a ValueError naming the presets for an unknown name."""
    if name not in PRESETS:
        from .options import suggest

        raise ValueError(f"Unknown preset {name!r}{suggest(str(name), PRESETS)}: use one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def under(group: dict[str, Any], name: str | None) -> dict[str, Any]:
    """``group`` with preset ``name``'s options under its own keys (galore's aliases count as set)."""
    if name is None:
        return group
    from .options import ALIASES

    own = set(group) | {ALIASES[k] for k in group if k in ALIASES}
    return {**{k: v for k, v in options_of(name).items() if k not in own}, **group}
