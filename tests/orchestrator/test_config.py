"""Study files: valid ones load; bad ones exit with status 2 and name the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main
from orchestrator.config import StudyFileError, load_study

ROOT = Path(__file__).resolve().parents[2]


def test_valid_tiny_study_loads(tiny_study) -> None:
    cfg = load_study(tiny_study())
    assert cfg.study == "tiny" and cfg.federation.algorithm == "fedsgd"
    assert set(cfg.search_ranges()["prune"]) == {"percent"}
    assert "idlg_psnr_max" in cfg.metric_names()
    assert cfg.folder.is_absolute()


BAD = [
    ({"federation.clients_per_round": 5}, "clients_per_round"),
    ({"federation.rounds": "many"}, "federation.rounds"),
    ({"data.dataset": "imagenet"}, "known datasets"),
    ({"model.name": "vgg"}, "known models"),
    ({"model.depth": 3}, "no option 'depth'"),
    ({"defenses.precodee": {}}, "known defenses"),
    ({"defenses.prune": {"percentage": 3}}, "no hyperparameter 'percentage'"),
    ({"defenses.prune": {"percent": {"type": "float", "low": 90, "high": 10}}}, "must not exceed"),
    ({"defenses.prune": {"percent": 150}}, "defenses.prune.percent"),
    ({"attacks": [{"name": "dlgg"}]}, "known attacks"),
    ({"attacks": [{"name": "idlg", "rounds": [5]}]}, "beyond the last round"),
    ({"attacks": [{"name": "idlg", "victims": 3}]}, "victims"),
    ({"attacks": [{"name": "dlm_plus"}]}, "weights messages"),
    ({"attacks": [{"name": "idlg", "params": {"iters": 3}}]}, "iters"),
    ({"attacks": [{"name": "see_through_gradients"}]}, "knows_bn_stats: true"),
    ({"attacks": [{"name": "inverting_gradients", "params": {"bn_prior": 0.1}}]}, "BatchNorm"),
    ({"objectives": [{"metric": "psnr", "mode": "min"}]}, "known metrics"),
    ({"objectives": [{"metric": "test_accuracy", "mode": "up"}]}, "objectives.0.mode"),
    ({"search.sampler": "grid"}, "search.sampler"),
    ({"search.trials": 0}, "search.trials"),
    ({"bogus": 1}, "bogus: unknown field"),
    ({"defenses": {}}, "at least one defense"),
]


@pytest.mark.parametrize(("changes", "expected"), BAD)
def test_bad_study_files_exit_2_naming_the_field(tiny_study, capsys, changes, expected) -> None:
    path = tiny_study(changes)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err


def test_missing_required_section_and_non_yaml(tiny_study, delete, tmp_path, capsys) -> None:
    assert main(["validate", str(tiny_study({"federation": delete}))]) == 2
    assert "federation: required field is missing" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    assert main(["validate", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("- just\n- a list\n")
    assert main(["validate", str(bad)]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2


def test_yaml_is_loaded_safely(tmp_path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("study: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(StudyFileError, match="not valid YAML"):
        load_study(path)


def test_cli_bad_file_prints_no_traceback(tiny_study) -> None:
    path = tiny_study({"federation.clients_per_round": 9})
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "federation" in proc.stderr and "Traceback" not in proc.stderr


def test_every_study_in_studies_folder_validates(shared_dir) -> None:
    files = sorted((ROOT / "studies").glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_study(path, {"data.root": str(shared_dir / "data")})
        assert cfg.attacks and cfg.objectives


def test_list_command_names_everything(capsys) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "pneumoniamnist", "convnet", "precode", "shadow", "dlm_plus", "attack_psnr_max",
        "analytic", "see_through_gradients (gradient/weights; needs knows_bn_stats)",
        "attack_psnr_gain_max",
    ):  # fmt: skip
        assert name in out


def test_smoke_shrinks_every_study_but_keeps_its_structure(shared_dir) -> None:
    from orchestrator.cli import build_parser

    assert build_parser().parse_args(["study", "x.yaml", "--smoke"]).smoke
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        full = load_study(path, {"data.root": str(shared_dir / "data")})
        small = load_study(path, {"data.root": str(shared_dir / "data")}, smoke=True)
        assert small.study == full.study + "-smoke"
        assert list(small.defenses) == list(full.defenses)
        assert [a.key for a in small.attacks] == [a.key for a in full.attacks]
        assert small.objectives == full.objectives
        assert small.federation.rounds <= 2 and small.federation.clients <= 4
        assert small.search.trials == len(full.defenses)
        assert all(a.params.get("iterations", 0) <= 10 for a in small.attacks)
