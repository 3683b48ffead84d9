"""benchmarks/gpu_check.py: usable without a GPU (help, a clear refusal) and correct on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def test_help_works_without_a_gpu() -> None:
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    assert "--device" in done.stdout and "--data-root" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_without_a_gpu_it_says_so_and_exits_1() -> None:
    done = _run()
    assert done.returncode == 1
    assert "no CUDA GPU is visible" in done.stderr and "--device cpu" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_bad_options_exit_2_naming_the_option() -> None:
    for args, option in ((["--device", "tpu"], "--device"), (["--repeats", "0"], "--repeats")):
        done = _run(*args)
        assert done.returncode == 2 and option in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_every_check_passes_on_the_cpu(shared_dir: Path, tmp_path: Path) -> None:
    """The same checks on the CPU (small sizes, a fake Ray GPU): each compares what it says it
    compares and passes, so the script is ready for the first machine with a GPU."""
    out = tmp_path / "checks.json"
    done = _run(
        "--device",
        "cpu",
        "--quick",
        "--iterations",
        "5",
        "--repeats",
        "1",
        "--data-root",
        str(shared_dir / "data"),
        "--json",
        str(out),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("[PASS]") == 4 and "[FAIL]" not in done.stdout
    import json

    checks = json.loads(out.read_text())["checks"]
    assert [c["name"] for c in checks] == [
        "exact convolutions",
        "batched victims",
        "vectorised clients",
        "two trials on one GPU (Ray)",
    ]
    assert all(c["passed"] and c["figures"] for c in checks)
