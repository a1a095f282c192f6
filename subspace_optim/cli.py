"""The ``subspace-optim`` command. Subcommands import their dependencies lazily, so ``--help`` is fast."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: subspace-optim <command> [flags]
       subspace-optim --version

commands:
  pretrain    pretrain a LLaMA from configs/ with AdamW, SubspaceAdamW and others on the same data,
              and write a comparison report (subspace-optim pretrain --help)
"""


def version() -> str:
    """The installed distribution's version (what pip installed, so what a bug report should name); from a
    source tree that was never installed, the package's ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("subspace-optim")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        print(f"subspace-optim {version()}")
        return 0
    command, rest = args[0], args[1:]
    if command == "pretrain":
        from .pretrain import main as pretrain_main

        return pretrain_main(rest)
    print(f"subspace-optim: unknown command {command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
