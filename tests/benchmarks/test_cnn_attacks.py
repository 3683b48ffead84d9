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
    """Two iterations of ig and stg on one photograph: the flat and mean-image rows, one row per
    method and the summary; numbers finite and in range; labels granted at batch 1 are right;
    each baseline gains 0 over itself; one JSON record per (method, victim); one PNG per method
    with --grid."""
    out = tmp_path / "raw.jsonl"
    done = _run(
        "--datasets", "photos", "--models", "convnet16", "--states", "untrained",
        "--batches", "1", "--methods", "ig", "stg", "--iterations", "2", "--images", "1",
        "--threads", "1", "--device", "cpu", "--json", str(out), "--grid", str(tmp_path / "g"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    flat, mean, ig, stg = (_row(done.stdout, m) for m in ("flat", "mean image", "ig", "stg"))
    # cells: 5 PSNR, 6 gain over flat, 7 gain over the mean image, 8 SSIM, 9 LPIPS,
    # 10 identified, 11 identified by LPIPS, 12 label accuracy, 13 seconds, 14 vs ig
    for cells in (flat, mean, ig, stg):
        psnr, gain, prior, ssim = (float(cells[i]) for i in (5, 6, 7, 8))
        assert math.isfinite(psnr + gain + prior) and 0 < psnr < 60
        assert -1 <= ssim <= 1
        assert cells[9] == "n/a" or 0 <= float(cells[9]) <= 2
        assert cells[10] in ("0/1", "1/1")
        assert float(cells[13]) >= 0
    assert float(flat[6]) == 0.0 and flat[12] == "n/a"
    assert float(mean[7]) == 0.0 and float(flat[7]) == -float(mean[6])  # the two baselines
    assert mean[10] == "0/1"  # the mean of the other photographs identifies no one
    assert float(ig[12]) == 1.0 and float(stg[12]) == 1.0
    assert math.isfinite(float(stg[14]))  # stg vs ig, in dB
    assert "- photos convnet16 untrained B=1: vs ig: stg " in done.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    victims = [r for r in records if r["kind"] == "victim"]
    assert [r["method"] for r in victims] == ["flat", "mean image", "ig", "stg"]
    assert all(math.isfinite(r["psnr_mean"]) for r in victims)
    assert victims[2]["attack"] == "inverting_gradients" and victims[2]["iterations"] == 2
    assert victims[3]["attack"] == "see_through_gradients"
    assert victims[2]["prior"] == "mean_image" and victims[2]["identification_pool"] == 30
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
