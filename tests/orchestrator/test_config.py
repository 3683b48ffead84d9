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


ACCURACY = {"metric": "test_accuracy", "mode": "max"}
PSNR = {"metric": "attack_psnr_max", "mode": "min"}
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
    (
        {
            "attacks": [
                {"name": "inverting_gradients", "params": {"feature_prior": 1, "labels": "soft"}}
            ]
        },
        "feature_prior > 0 needs fixed labels",
    ),
    ({"objectives": [{"metric": "psnr", "mode": "min"}, ACCURACY]}, "known metrics"),
    ({"objectives": [{"metric": "test_accuracy", "mode": "up"}, PSNR]}, "objectives.0.mode"),
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


# Bad input caught before any work (issue 18): exit 2, one line naming the field, no traceback.
IDLG = {"name": "idlg", "rounds": [0], "victims": 1, "params": {"iterations": 2}}
NAN, INF = float("nan"), float("inf")
BAD_INPUT = [
    ({"attacks": [dict(IDLG, label="../../x")]}, "attacks.0.label: String should match"),
    ({"attacks": [dict(IDLG, label="a/b")]}, "attacks.0.label"),
    ({"attacks": [dict(IDLG, label="a\\b")]}, "attacks.0.label"),
    ({"attacks": [dict(IDLG, label="a..b")]}, "'a..b' cannot name files: the attack's label"),
    ({"success_psnr": NAN}, "success_psnr: Input should be a finite number"),
    ({"federation.lr": INF}, "federation.lr: Input should be a finite number"),
    ({"federation.lr": "inf"}, "federation.lr: Input should be a finite number"),
    ({"federation.partition.alpha": NAN}, "federation.partition.alpha: Input should be a finite"),
    ({"resources": {"cpu": INF}}, "resources.cpu: Input should be a finite number"),
    ({"defenses.prune": {"percent": NAN}}, "defenses.prune.percent: Input should be a finite"),
    (
        {"defenses.prune": {"percent": {"type": "float", "low": 10, "high": INF}}},
        "defenses.prune.percent: invalid search range: Input should be a finite number",
    ),
    ({"attacks": [dict(IDLG, params={"lr": NAN})]}, "lr: Input should be a finite number"),
    ({"seed": -1}, "seed: Input should be greater than or equal to 0"),
    ({"seed": 2**32}, "seed: Input should be less than 4294967296"),
    ({"federation.rounds": 10**6}, "federation.rounds: Input should be less than or equal to"),
    ({"federation.clients": 10**6}, "federation.clients: Input should be less than or equal"),
    ({"attacks": [dict(IDLG, params={"iterations": 10**7})]}, "params.iterations: at most"),
    ({"attacks": [dict(IDLG, params={"restarts": 10**4})]}, "params.restarts: at most"),
    ({"attacks": [dict(IDLG, params={"seed": 3})]}, "params.seed: an attack's seed is the study"),
    ({"model.hidden": [10**6, 10**6]}, "parameters, more than"),
    ({"model.hidden": [10**30]}, "model: mlp (hidden=[10"),
    ({"model.hidden": "wide"}, "option 'hidden'"),
    ({"objectives": [ACCURACY]}, "a single objective is not supported"),
    ({"objectives": [ACCURACY, ACCURACY]}, "'test_accuracy' is listed twice"),
    ({"device": "../x"}, "device: not a device"),
    ({"device": "meta"}, "device: not a device"),
    ({"search.trials": 10**6}, "search.trials: Input should be less than or equal to 100000"),
    ({"plugins": [""]}, "plugins.0: '' is not a module name"),
    ({"plugins": ["../evil"]}, "plugins.0: '../evil' is not a module name"),
]


@pytest.mark.parametrize(("changes", "expected"), BAD_INPUT)
def test_bad_input_is_one_line_naming_the_field(tiny_study, capsys, changes, expected) -> None:
    assert main(["validate", str(tiny_study(changes))]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err
    problems = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(problems) <= 1, err


def test_edge_values_inside_the_limits_still_load(tiny_study) -> None:
    label = dict(IDLG, label="ig.v2-1")
    cfg = load_study(tiny_study({"seed": 2**32 - 1, "attacks": [label], "device": "cpu"}))
    assert cfg.seed == 2**32 - 1 and cfg.attacks[0].key == "ig.v2-1"
    assert "ig.v2-1_psnr_max" in cfg.metric_names()


def test_mlflow_uri_with_a_password_is_refused_without_echoing_it(tiny_study, capsys) -> None:
    uri = "https://alice:s3cret@mlflow.example.org"
    assert main(["validate", str(tiny_study({"tracking.mlflow_uri": uri}))]) == 2
    err = capsys.readouterr().err
    assert "tracking.mlflow_uri" in err and "MLFLOW_TRACKING_PASSWORD" in err
    assert "s3cret" not in err and "alice:***@" in err
    ok = "https://alice@mlflow.example.org"  # a user name alone is no secret
    assert load_study(tiny_study({"tracking.mlflow_uri": ok})).tracking.mlflow_uri == ok


def test_study_file_that_is_not_utf8_names_the_file(tiny_study, capsys) -> None:
    path = tiny_study()
    path.write_bytes(path.read_bytes() + "# caf\xe9\n".encode("latin-1"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: not UTF-8 text") and "byte" in err, err
    assert len(err.splitlines()) == 1


PLUGINS = [
    ("syntax", "def broken(:\n", "SyntaxError"),
    ("needs", "import obscura_no_such_dependency\n", "No module named 'obscura_no_such_dep"),
    ("raises", "x = 1\nraise RuntimeError('boom in the plugin')\n", "RuntimeError: boom in"),
]


@pytest.mark.parametrize(("kind", "code", "expected"), PLUGINS)
def test_plugin_failing_on_import_names_it(
    tiny_study, tmp_path, monkeypatch, capsys, kind, code, expected
) -> None:
    module = f"obscura_bad_plugin_{kind}"
    (tmp_path / f"{module}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["validate", str(tiny_study({"plugins": [module]}))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: plugins.0: cannot import '{module}'") and expected in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if "RuntimeError" in expected:
        assert f"{module}.py:2" in err  # where the plugin raised


TRIAL_SETS = [
    (["defense=prune", "prune.percent=.nan"], "defenses.prune.percent: Input should be a finite"),
    (["defense=prune", "prune.percent=150"], "defenses.prune.percent"),
    (["federation.lr=.inf"], "federation.lr: Input should be a finite number"),
    (["seed=-3"], "seed: Input should be greater than or equal to 0"),
    (["attacks.3.label=x"], "attacks is a list of 1"),
    (["attacks.0.label=../x"], "attacks.0.label"),
    (["=3"], "is not a dotted key"),
]


@pytest.mark.parametrize(("sets", "expected"), TRIAL_SETS)
def test_trial_set_is_validated_like_the_study_file(tiny_study, capsys, sets, expected) -> None:
    argv = ["trial", str(tiny_study())]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 2  # before any training: the error comes first
    err = capsys.readouterr().err
    assert expected in err, err
    assert "Traceback" not in err and "round 0" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["study", "x.yaml", "--concurrency", "0"], "search.concurrency: Input should be greater"),
        (["study", "x.yaml", "--concurrency", "two"], "search.concurrency: Input should be a"),
        (["study", "x.yaml", "--trials", "1000000"], "search.trials: Input should be less than"),
        (["report", "x", "--utility-loss", "nan"], "--utility-loss: expected a number in [0, 1]"),
    ],
)
def test_command_line_numbers_are_validated_like_the_study_file(capsys, argv, expected) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_overrides_reach_list_entries(tiny_study) -> None:
    cfg = load_study(tiny_study(), {"attacks.0.label": "first", "attacks.0.victims": 2})
    assert cfg.attacks[0].key == "first" and cfg.attacks[0].victims == 2
    with pytest.raises(StudyFileError, match=r"attacks\.0\.label"):
        load_study(tiny_study(), {"attacks.0.label": "../x"})
