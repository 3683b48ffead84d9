"""benchmarks/cnn_attacks.py: a tiny run prints its table rows and JSON records, all finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cnn_attacks.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300
    )


def _row(stdout: str, method: str) -> list[str]:
    """The cells of the table row of ``method`` (exactly one must exist)."""
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| photos | convnet16 | untrained | 1 | ")
    ]
    found = [r for r in rows if r[4] == method]
    assert len(found) == 1, stdout
    return found[0]


def test_a_tiny_run_on_photos_prints_finite_rows(tmp_path: Path) -> None:
    """Two iterations of ig and stg on one photograph: a flat row, one row per method and the
    summary; numbers finite and in range; labels granted at batch 1 are right; the flat image
    is its own baseline (gain 0); one JSON record per (method, victim); one PNG per method
    with --grid."""
    out = tmp_path / "raw.jsonl"
    done = _run(
        "--datasets", "photos", "--models", "convnet16", "--states", "untrained",
        "--batches", "1", "--methods", "ig", "stg", "--iterations", "2", "--images", "1",
        "--threads", "1", "--device", "cpu", "--json", str(out), "--grid", str(tmp_path / "g"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    flat, ig, stg = (_row(done.stdout, m) for m in ("flat", "ig", "stg"))
    for cells in (flat, ig, stg):
        psnr, gain, ssim = float(cells[5]), float(cells[6]), float(cells[7])
        assert math.isfinite(psnr + gain) and 0 < psnr < 60
        assert -1 <= ssim <= 1
        assert cells[8] == "n/a" or 0 <= float(cells[8]) <= 2
        assert float(cells[10]) >= 0
    assert float(flat[6]) == 0.0 and flat[9] == "n/a"
    assert float(ig[9]) == 1.0 and float(stg[9]) == 1.0
    assert math.isfinite(float(stg[11]))  # stg vs ig, in dB
    assert "- photos convnet16 untrained B=1: vs ig: stg " in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    victims = [r for r in records if r["kind"] == "victim"]
    assert [r["method"] for r in victims] == ["flat", "ig", "stg"]
    assert all(math.isfinite(r["psnr_mean"]) for r in victims)
    assert victims[1]["attack"] == "inverting_gradients" and victims[1]["iterations"] == 2
    assert victims[2]["attack"] == "see_through_gradients"
    pictures = sorted(p.name for p in (tmp_path / "g").iterdir())
    assert pictures == [f"photos_convnet16_untrained_b1_{m}.png" for m in ("ig", "stg")]
    assert all(
        (tmp_path / "g" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pictures
    )


def test_a_bad_param_override_exits_2_naming_it() -> None:
    """A parameter the method's attack lacks fails before any data is loaded."""
    done = _run("--param", "ig.foo=1")
    assert done.returncode == 2 and "'inverting_gradients': foo" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_averaged_method_keeps_its_own_four_restarts_unless_restarts_is_given(
    tmp_path: Path,
) -> None:
    """``ig_bn_avg`` averages its own four restarts; ``--restarts`` overrides that when given."""
    for extra, restarts in (([], 4), (["--restarts", "2"], 2)):
        out = tmp_path / f"raw{restarts}.jsonl"
        done = _run(
            "--datasets", "photos", "--models", "convnet16", "--states", "untrained",
            "--batches", "1", "--methods", "ig_bn_avg", "--iterations", "2", "--images", "1",
            "--threads", "1", "--device", "cpu", "--json", str(out), *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        records = [json.loads(line) for line in out.read_text().splitlines()]
        (rec,) = [r for r in records if r.get("method") == "ig_bn_avg"]
        assert rec["params"]["restarts"] == restarts and rec["params"]["restart_average"]
        assert math.isfinite(rec["psnr_mean"])
