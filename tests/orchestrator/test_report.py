"""The study report: a self-contained HTML page and Markdown, checked in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.report import report


def _study_files(folder: Path) -> dict[str, bytes]:
    """The study's own outputs (everything but the report's files), by relative path."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("report")
    }


def test_report_holds_every_section(completed_study) -> None:
    cfg, _ = completed_study
    before = _study_files(cfg.folder)
    html_path, md_path = report(cfg.folder)
    assert _study_files(cfg.folder) == before  # the report only reads the study's files
    page = html_path.read_text()
    for title in (
        "Settings",
        "Pareto front",
        "Pareto-optimal trials",
        "Best trial per defense",
        "Reconstructions (ground truth above",
        "Attack success rates",
        "Cost",
    ):
        assert title in page, title
    assert page.count("data:image/png;base64,") >= 2  # the plot and at least one grid
    assert "http://" not in page and "https://" not in page and "<script" not in page
    md = md_path.read_text()
    assert "![Pareto front](report_pareto.png)" in md and "| defense |" in md
    for grid in re.findall(r"\]\((images/[^)]+)\)", md):
        assert (cfg.folder / grid).exists()


def test_report_command_and_bad_folder(completed_study, tmp_path, capsys) -> None:
    cfg, _ = completed_study
    assert main(["report", str(cfg.folder), "--utility-loss", "0.05"]) == 0
    assert main(["report", str(tmp_path)]) == 2
    assert "no trials.parquet" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None,
    reason="Debian's chromium is not installed (.ci/run installs it; apt-get install chromium)",
)
def test_report_renders_in_headless_chromium(completed_study, tmp_path) -> None:
    cfg, _ = completed_study
    html_path, _ = report(cfg.folder)
    shot = tmp_path / "report.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--window-size=1200,3000",
        "--virtual-time-budget=3000",
    ]
    dom = subprocess.run(
        [_chromium(), *flags, "--dump-dom", html_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<table>" in dom.stdout and dom.stdout.count("<img") >= 2
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not [line for line in console if "error" in line.lower()], console
    shotp = subprocess.run(
        [_chromium(), *flags, f"--screenshot={shot}", html_path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shotp.returncode == 0 and shot.exists(), shotp.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # rendered content, not a blank page


def test_log_images_none_keeps_every_image_out(tiny_study, local_ray_run) -> None:
    """With tracking.log_images: none no private image reaches the output, MLflow or report."""
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_study

    cfg = load_study(tiny_study({"tracking.log_images": "none", "search.trials": 2}))
    local_ray_run(cfg)
    plots = {"pareto.png", "report_pareto.png"}
    pngs = [p for p in Path(cfg.folder).rglob("*.png") if p.name not in plots]
    assert not pngs, pngs
    html_path, _ = report(cfg.folder)
    page = html_path.read_text()
    assert page.count("data:image/png;base64,") == 1  # the Pareto plot only
    client = MlflowClient(tracking_uri=cfg.tracking.mlflow_uri)
    exp = client.get_experiment_by_name(cfg.study)
    for run in client.search_runs([exp.experiment_id]):
        arts = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "images" not in arts


def test_success_table_shows_both_gains_and_identification(tiny_study, tmp_path) -> None:
    """The attack table gives the PSNR gain over the mean image, the share identified and the
    gain over a flat image beside the PSNR ('–' for rows of files written before them)."""
    from orchestrator import load_study
    from orchestrator.report import _success_section
    from orchestrator.results import ResultStore

    cfg = load_study(tiny_study())
    store = ResultStore(tmp_path / "res")
    for tid in ("t0", "t1"):
        store.upsert_trial({"trial_id": tid, "status": "completed", "defense": tid})
    row = {"attack": "idlg", "round": 0, "client": 0, "ssim": 0.5, "seconds": 1.0}
    store.add_attacks(
        "t0",
        [
            {**row, "image_index": 0, "psnr": 25.0, "psnr_gain": 10.5, "diverged": False}
            | {"prior_gain": 7.5, "id_rank": 1, "identified": True},
            {**row, "image_index": 1, "psnr": 15.0, "psnr_gain": -1.25, "diverged": False}
            | {"prior_gain": -4.25, "id_rank": 9, "identified": False},
        ],
    )
    store.add_attacks("t1", [{**row, "image_index": 0, "psnr": 12.0, "diverged": False}])
    _, _, md = _success_section(cfg, store.trials(), store.attacks())
    assert (
        "| PSNR mean | PSNR max | gain over mean image, mean | gain over mean image, max "
        "| identified | gain over flat, max |"
    ) in md
    assert "| t0 | idlg | 2 | 50% | 20 | 25 | 1.625 | 7.5 | 50% | 10.5 |" in md
    assert "| t1 | idlg | 1 | 0% | 12 | 12 | – | – | – | – |" in md
