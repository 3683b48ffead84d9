"""The metric table (attacks.scoring.table) is the one place a per-image metric is declared:
scoring, the trial metrics and their worst case, the attacks.parquet schema and the docs follow."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from attacks.scoring.table import METRICS, STATISTICS, TRIAL_STATISTICS, reference_markdown
from orchestrator.metrics import PRIVACY, WORST
from orchestrator.results import ATTACKS_SCHEMA

ROOT = Path(__file__).resolve().parents[2]


def test_names_are_unique_and_everything_derives_from_the_table() -> None:
    names = [m.name for m in METRICS]
    assert len(set(names)) == len(names)
    assert len({s.name for s in STATISTICS}) == len(STATISTICS)
    assert ATTACKS_SCHEMA.names[5:-2] == names
    assert tuple(s.name for s in TRIAL_STATISTICS) == PRIVACY
    assert WORST["lpips_min"] == WORST["lpips_mean"] == "min"
    assert WORST["prior_gain_max"] == WORST["identification_rate"] == "max"
    text = reference_markdown()
    assert all(f"`{n}`" in text for n in names)
    assert all(f"`attack_{s}`" in text for s in PRIVACY)


def test_a_metric_reads_only_the_metrics_before_it() -> None:
    """Each compute function gets the metrics computed so far; a dependency declared after its
    user would be a KeyError at scoring time: the order of the table is the order of use."""
    import torch

    from attacks.scoring.metrics import score_images

    truth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = score_images(
        (truth + 0.1).clamp(0, 1),
        truth,
        torch.tensor([0, 1, 1]),
        torch.tensor([0, 1, 0]),
        lpips=False,
    )
    assert [set(i) for i in s.per_image] == [{"index", *(m.name for m in METRICS)}] * 3
    assert s["label_accuracy"] == 2 / 3


_NEW_METRIC = textwrap.dedent(
    """
    import attacks.scoring.table as table

    def mean_absolute_error(ctx, done):
        return [float(abs(r - t).mean()) for r, t in zip(ctx.rec_hwc, ctx.truth_hwc)]

    table.METRICS = (*table.METRICS, table.ImageMetric(
        "mae", "float64", "min", False, "mean absolute pixel error",
        mean_absolute_error, batch=("mean", "min"), trial=("mean", "min"), schema_version=4))
    table.STATISTICS = tuple(s for m in table.METRICS for s in m.statistics)
    table.TRIAL_STATISTICS = tuple(s for s in table.STATISTICS if s.per_trial)
    table.SCHEMA_VERSION = 4
    """
)

_USE_IT = textwrap.dedent(
    """
    import sys
    import torch
    from attacks.scoring.metrics import score_images
    from orchestrator.metrics import attack_summary, builtin_names, worst_case
    from orchestrator.results import ATTACKS_SCHEMA, ResultStore, attack_record

    truth = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    s = score_images((truth + 0.25).clamp(0, 1), truth, lpips=False)
    assert abs(s.per_image[0]["mae"] - 0.25) < 0.05 and s["mae_min"] <= s["mae_mean"]
    rows = [attack_record("idlg", 0, 0, i, seconds=1.0, diverged=False) for i in s.per_image]
    summary = attack_summary(rows, 20.0)
    assert summary["mae_mean"] == s["mae_mean"]
    assert worst_case({"a": summary, "b": {**summary, "mae_min": 0.0}})["attack_mae_min"] == 0.0
    assert "idlg_mae_mean" in builtin_names(["idlg"]) and "attack_mae_min" in builtin_names()
    assert ATTACKS_SCHEMA.field("mae").type == "double"
    from pathlib import Path
    store = ResultStore(Path(sys.argv[1]))
    store.upsert_trial({"trial_id": "t", "status": "completed", "defense": "none"})
    store.add_attacks("t", rows)
    back = ResultStore(Path(sys.argv[1])).attacks()
    assert back["mae"].tolist() == [r["mae"] for r in rows]
    print("ok")
    """
)


def test_adding_a_metric_touches_only_the_table(tmp_path: Path) -> None:
    """The worked example of the docs: one entry added to the table (here at run time, before
    anything reads it) is scored, summarised per trial, worst-cased, stored and read back."""
    code = _NEW_METRIC + _USE_IT
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
