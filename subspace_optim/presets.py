"""Named configurations picked from the memory-quality frontier (docs/benchmarks.md, "Memory-quality frontier").

A preset is a plain dict of ``SubspaceAdamW`` options that any param group can take. It fills the options a group
does not set itself: ``SubspaceAdamW(groups, preset="balanced")`` puts it under every group's own keys (and over
the constructor's keywords, which are only defaults for the groups); ``param_groups(model, ..., preset=...)`` puts
it on the projected group under the options passed there. ``optim_args="preset=..."`` (Trainer) and ``--preset``
(``subspace-optim pretrain``) reach the same dicts.

Measured at llama_9m (held-out loss, seeds 0 and 1 unless said; galore-torch tuned alike: 4.7281):

- ``best_quality``: a stored, warm-refreshed fp32 basis and fp32 moments with Fira's residual (the library
  default): 4.6832; LLaMA-7B weights + state 31.24 GB at rank 1024.
- ``balanced``: far below GaLore 8-bit's memory (bf16 bases and int8 moments at the same rank) at better quality: a
  stored basis in 8-bit codes (``stored_basis``), an int8 first moment, a factored second moment, Fira's residual;
  for the embedding and head, whose factored second moment cost 1.2% at llama_20m, a full one, and both moments in
  4 bits (``plain_moments_dtype="int4"``, ``plain_second_moment="full"``). Against ``best_quality``: 4.7030 against
  4.6728 on four seeds (+0.65%), and at llama_20m 4.1601 against 4.1358 (+0.59%, two seeds) (docs/benchmarks.md,
  "Where the factored cost sits"). LLaMA-7B 16.36 GB at rank 1024 against GaLore 8-bit's 19.18; LLaMA-1B at rank
  512, 599 MiB of state (bf16 weights). At half the rank (hidden / 8: 512 at 7B) it is 15.06 GB, below APOLLO's
  16.14, and below galore-torch at its rank on four seeds, every one (4.7064 against 4.7367).
- ``least_memory``: APOLLO-Mini's shape (rank 1, tensor-wise scaling, scale sqrt(128)) with nothing stored but a
  seed, an int8 first moment and two factors per matrix: 5.0555 against apollo-torch APOLLO-Mini's 5.8013; LLaMA-7B
  13.76 GB, below APOLLO-Mini's 14.53 (7.42 GB with torchao's int8 weights). Its projection is apollo-torch's
  Gaussian stream: at rank 1 random signs trained 2.2% worse at the same scale (5.2360 against 5.1231, both before
  the factored second moment's floor), and a d x 1 projection costs nothing to materialize. A group's own ``rank``
  overrides the preset's 1.
"""

from __future__ import annotations

import math
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "best_quality": {"residual": "fira"},
    "balanced": {
        "residual": "fira",
        "moments_dtype": "int8",
        "basis_dtype": "int8",
        "second_moment": "factored",
        # the embedding and head: a full V, both moments in 4 bits (their factored V is what cost quality)
        "plain_moments_dtype": "int4",
        "plain_second_moment": "full",
    },
    "least_memory": {
        "rank": 1,
        "refresh": "seeded",
        "seed_stream": "apollo",  # a Gaussian: at rank 1 it trains better than random signs (module docstring)
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
