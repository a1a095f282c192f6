"""A built-in text corpus that exists on every machine with Python: the standard library's own source.

Real text (code, comments and docstrings written by people), gathered deterministically (sorted
paths), with a held-out split by file so evaluation never sees training files. No network.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_files() -> list[Path]:
    """The standard library's .py files in sorted order, without test suites and third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(root.rglob("*.py")) if not (_SKIP_DIRS & set(f.relative_to(root).parts[:-1]))]
    if not files:
        raise FileNotFoundError(f"no Python standard library sources under {root}")
    return files


def _is_heldout(path: Path, heldout_fraction: float) -> bool:
    digest = hashlib.sha256(path.name.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < heldout_fraction


def stdlib_text(max_bytes: int = 4_000_000, *, split: str = "train", heldout_fraction: float = 0.05) -> str:
    """Up to ``max_bytes`` of standard-library source for ``split`` ("train" or "heldout").

    Files are assigned to a split by a hash of their name, so the split does not depend on which other
    files exist or on ``max_bytes``.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"Invalid split: {split!r} - use 'train' or 'heldout'")
    want_heldout = split == "heldout"
    parts: list[str] = []
    size = 0
    for f in stdlib_files():
        if _is_heldout(f, heldout_fraction) != want_heldout:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        size += len(text.encode())
        if size >= max_bytes:
            break
    return "\n\n".join(parts).encode()[:max_bytes].decode("utf-8", errors="ignore")
