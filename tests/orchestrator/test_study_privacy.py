"""``log_images: none`` on disk: a real tiny study killed (SIGKILL) or interrupted (SIGINT) while
a trial holds round checkpoints, then resumed to the end, leaves no file that holds a victim's
pixels. The victims' images are taken from the trial's own checkpoint before the kill, and every
file under the study's folders is searched for their raw float32 bytes, not only ``.png``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.config import load_study

ROOT = Path(__file__).resolve().parents[2]

#: Inverting Gradients with 3,000 iterations keeps a trial in its attack phase (its round
#: checkpoints on disk) for ~2 s, long enough to be caught there.
SLOW_ATTACK = [
    {"name": "inverting_gradients", "rounds": [0], "victims": 1, "params": {"iterations": 3000}}
]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal (see test_study.py)


def _study(path: Path, *extra: str) -> subprocess.Popen:
    err = path.with_suffix(".stderr").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "study", str(path), *extra],
        cwd=ROOT,
        start_new_session=True,
        preexec_fn=_default_sigint,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )


def _victims_from_checkpoint(ray_dir: Path, evidence: Path) -> list[bytes]:
    """Wait until a trial holds a round checkpoint; copy it outside the study (``evidence``)
    and return byte patterns of its victims' images: the float32 bytes of each image's most
    varied row (a row of one grey would match any flat run)."""
    deadline = time.time() + 300
    while time.time() < deadline:
        for found in ray_dir.rglob("simulator.pt"):
            try:
                shutil.copyfile(found, evidence)
                state = torch.load(evidence, weights_only=True, map_location="cpu")
            except (OSError, RuntimeError, EOFError):  # deleted or half-written: try again
                continue
            images = [c["truth"]["images"] for c in state["captures"]]
            if images:
                return [_fingerprint(img) for img in images]
        time.sleep(0.05)
    pytest.fail("no trial held a round checkpoint in time")


def _fingerprint(images: torch.Tensor) -> bytes:
    flat = images.detach().to(torch.float32).reshape(-1, images.shape[-1]).numpy()
    row = flat[int(np.argmax(flat.std(axis=1)))]
    assert row.std() > 0.05, "the victim's image has no varied row"
    return np.ascontiguousarray(row).tobytes()


def _files_holding(folder: Path, patterns: list[bytes], skip: Path) -> list[Path]:
    """Every file under ``folder`` (but ``skip``) whose bytes contain one of ``patterns``."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != skip:
            data = path.read_bytes()
            if any(p in data for p in patterns):
                found.append(path)
    return found


def _resume(path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator", "study", str(path), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _tiny(tiny_study) -> Path:
    return tiny_study(
        {
            "search.concurrency": 1,
            "search.trials": 2,
            "attacks": SLOW_ATTACK,
            "tracking.log_images": "none",
        }
    )


@pytest.mark.slow
def test_a_killed_and_resumed_study_leaves_no_victim_pixels(tiny_study, tmp_path) -> None:
    path = _tiny(tiny_study)
    cfg = load_study(path)
    ray_dir = cfg.folder / "ray"
    evidence = tmp_path.parent / f"{tmp_path.name}-evidence.pt"  # outside the scanned folder
    proc = _study(path)
    try:
        patterns = _victims_from_checkpoint(ray_dir, evidence)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = _files_holding(tmp_path, patterns, evidence)
    # the scan finds them: the killed driver left its trial's checkpoint behind
    assert any(p.name == "simulator.pt" for p in left), left
    _resume(path)
    assert not _files_holding(tmp_path, patterns, evidence)
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("checkpoint_")]
    assert ray_dir.stat().st_mode & 0o777 == 0o700
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert (trials["status"] == "completed").sum() == 2 and len(trials) == 2
    evidence.unlink()


@pytest.mark.slow
def test_an_interrupted_study_leaves_no_victim_pixels(tiny_study, tmp_path) -> None:
    path = _tiny(tiny_study)
    cfg = load_study(path)
    evidence = tmp_path.parent / f"{tmp_path.name}-evidence.pt"
    proc = _study(path)
    try:
        patterns = _victims_from_checkpoint(cfg.folder / "ray", evidence)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = path.with_suffix(".stderr").read_text()
    assert proc.returncode == 130, err[-3000:]
    assert not _files_holding(tmp_path, patterns, evidence), err[-3000:]
    _resume(path)
    assert not _files_holding(tmp_path, patterns, evidence)
    evidence.unlink()
