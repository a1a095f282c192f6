"""The repository's top-level ``kernels/`` folder never shadows another package named ``kernels``.

transformers imports the PyPI package ``kernels``. Our folder of Triton kernels ships as
``subspace_optim.kernels``; if it were a regular package, a repository root on ``sys.path`` (a ``PYTHONPATH``,
``python -m pytest``, a notebook started in the clone, ``python -`` with a README example) would make
``import kernels`` find it first and break transformers. These tests run real subprocesses from the repository
root, the way a user does.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_at_root(code: str) -> str:
    """Run ``code`` in a fresh interpreter whose cwd and ``PYTHONPATH`` are the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout.strip()


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_repo_root_on_path_does_not_shadow_the_pypi_kernels_package():
    pytest.importorskip("transformers")
    code = (
        "from transformers import LlamaForCausalLM\n"
        "import kernels\n"
        "print(getattr(kernels, '__file__', None) or 'namespace:' + repr(list(kernels.__path__)))\n"
    )
    where = _run_at_root(code)
    if _pypi_kernels_installed():
        site = Path(sysconfig.get_paths()["purelib"]).resolve()
        assert Path(where).resolve().is_relative_to(site), f"`import kernels` resolved to {where}, not {site}"
    else:  # nothing else named kernels: ours is at most a namespace portion, never a module with code
        assert where.startswith("namespace:"), where


def test_kernels_folder_is_not_a_regular_package():
    """The structural reason the test above holds: a folder with ``__init__.py`` on sys.path wins the import
    outright, a folder without one is only a namespace portion that any real package anywhere on the path beats."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "subspace_optim" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


def test_subspace_optim_kernels_import_from_the_repo_root():
    """``python -m pytest`` and a REPL in the clone import the package from the source tree: the Triton modules
    must be reachable as ``subspace_optim.kernels`` there too, and never as a top-level ``kernels.step``."""
    pytest.importorskip("triton")
    code = (
        "import importlib.util, subspace_optim\n"
        "from subspace_optim.kernels import step\n"
        "print(step.subspace_adamw.__module__)\n"
        "try:\n"
        "    import kernels.step\n"
        "except ImportError:\n"
        "    print('no top-level kernels.step')\n"
    )
    lines = _run_at_root(code).splitlines()
    assert lines == ["subspace_optim.kernels.step", "no top-level kernels.step"], lines


@pytest.mark.slow
def test_wheel_ships_the_kernels_inside_the_package(tmp_path):
    """A wheel carries kernels/ as subspace_optim/kernels/ and nothing at the top level but the package."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    out = subprocess.run([*command, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    kernel_files = {n.rsplit("/", 1)[1] for n in names if n.startswith("subspace_optim/kernels/")}
    assert {"step.py", "refresh.py", "gemm.py", "probe.py", "_common.py"} <= kernel_files, sorted(names)
    top = {n.split("/", 1)[0] for n in names}
    assert all(t == "subspace_optim" or t.endswith(".dist-info") for t in top), sorted(top)
