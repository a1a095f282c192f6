"""DeepSpeed: ZeRO stage 0 trains with projection; stages 1-3, which flatten parameters, are refused with an
error that points to FSDP2, inside deepspeed.initialize.

Skipped where deepspeed is not installed (an optional extra: `pip install -e ".[deepspeed]"`); the same
guard is tested without DeepSpeed in test_bad_input.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")


def _run(stage: int, precision: str = "fp32") -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("deepspeed_worker.py")
    out = subprocess.run(
        [sys.executable, str(worker), str(stage), str(port), precision], capture_output=True, text=True, timeout=300
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_stage0_trains_with_projection(precision):
    result = _run(0, precision)
    assert result["error"] is None
    assert result["refresh_counts"] == [2, 2]  # steps 0 and 2 refreshed both matrices


@pytest.mark.parametrize("stage", [1, pytest.param(2, marks=pytest.mark.slow), pytest.param(3, marks=pytest.mark.slow)])
def test_zero_stages_that_flatten_are_refused_at_initialize(stage):
    result = _run(stage)
    assert result["error"] is not None
    assert "DeepSpeed ZeRO stages 1-3" in result["error"] and "FSDP2" in result["error"]
    assert result["where"] == "initialize"
