"""The ``subspace-optim`` command itself: ``--version``, through the installed entry point."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from subspace_optim import cli


def _installed_command() -> str:
    """The console script pip made for ``[project.scripts]`` (next to this interpreter, else on PATH)."""
    found = shutil.which("subspace-optim", path=str(Path(sys.executable).parent)) or shutil.which("subspace-optim")
    if found is None:
        pytest.skip("the subspace-optim command is not installed here (pip install -e .)")
    return found


def test_version_through_the_installed_command(tmp_path):
    """A bug report can say which release it is about: `subspace-optim --version` prints the installed one."""
    proc = subprocess.run(
        [_installed_command(), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"subspace-optim {importlib.metadata.version('subspace-optim')}\n"


def test_version_falls_back_to_the_package_attribute(monkeypatch, capsys):
    """Run from a source tree that was never installed, there is no distribution metadata: the package's
    ``__version__`` is printed instead."""
    import subspace_optim

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"subspace-optim {subspace_optim.__version__}\n"
    assert "--version" in cli.USAGE
