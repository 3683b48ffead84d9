"""``python -m orchestrator``: study, trial, validate, report, list.

Exit status: 0 on success, 2 for a bad study file or bad command-line input (the message names
the field and the fix; never a traceback), 1 when a run fails, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator.config import (
    OVERRIDE_KEY,
    SearchSection,
    StudyFileError,
    check_defense_value,
    load_study,
)

EXIT_BAD_INPUT = 2


def _parse_sets(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as ``{dotted key: YAML value}`` (validated later like the
    study file's values)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise StudyFileError(f"--set {item!r}: expected KEY=VALUE (e.g. precode.beta=0.001)")
        key, value = item.split("=", 1)
        key = key.strip()
        if not re.match(OVERRIDE_KEY, key):
            raise StudyFileError(f"--set {item!r}: {key!r} is not a dotted key (e.g. seed=1)")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise StudyFileError(f"--set {item!r}: value is not valid YAML ({err})") from None
    return out


def _search_value(field: str) -> Callable[[str], int]:
    """An argparse type: the value validated as the study file's ``search.<field>``."""

    def parse(text: str) -> int:
        try:
            return int(getattr(SearchSection.model_validate({field: text}), field))
        except ValidationError as err:
            msg = "; ".join(e["msg"] for e in err.errors())
            raise argparse.ArgumentTypeError(f"search.{field}: {msg} (found {text!r})") from None

    parse.__name__ = f"search.{field}"
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a finite number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (found {text!r})") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (found {text!r})")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    """Validate a study file and summarise it."""
    cfg = load_study(args.file, smoke=args.smoke)
    ranges = cfg.search_ranges()
    print(f"{args.file}: valid study {cfg.study!r}")
    print(f"  data: {cfg.data.dataset} ({cfg.data.root}), model: {cfg.model.name}")
    f = cfg.federation
    print(
        f"  federation: {f.algorithm}, {f.clients} clients ({f.clients_per_round} per round), "
        f"{f.rounds} rounds"
    )
    for name in cfg.defenses:
        searched = ", ".join(ranges[name]) or "no searched hyperparameters"
        print(f"  defense {name}: {searched}")
    print(f"  attacks: {', '.join(a.key for a in cfg.attacks)}")
    print(f"  objectives: {', '.join(f'{o.metric} ({o.mode})' for o in cfg.objectives)}")
    print(
        f"  search: {cfg.search.sampler}, {cfg.search.trials} trials, "
        f"concurrency {cfg.search.concurrency}; output: {cfg.folder}"
    )
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """Run (or resume) a study (exit 1 with one line when its folder is locked by another
    driver or a study file cannot be read or written)."""
    from orchestrator.folder_lock import FolderLockedError
    from orchestrator.results import StudyIOError
    from orchestrator.study import Study

    study = Study.from_yaml(args.file, _parse_sets(args.set or []) or None, smoke=args.smoke)
    try:
        study.run(
            trials=args.trials,
            concurrency=args.concurrency,
            address=args.address,
            output=args.output,
            resume=args.resume,
            verbose=2 if args.verbose else 1,
        )
    except KeyboardInterrupt:
        return 130
    except (FolderLockedError, StudyIOError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_trial(args: argparse.Namespace) -> int:
    """Run one trial in-process (no Ray) and print its results as JSON."""
    from defenses import defense_class
    from orchestrator.search_space import default_point, defense_params
    from orchestrator.trial import run_trial

    sets = _parse_sets(args.set or [])
    raw_overrides = {}
    defense = sets.pop("defense", None)
    cfg = load_study(args.file)
    if defense is None:
        defense = "none" if "none" in cfg.defenses else next(iter(cfg.defenses))
    if defense not in cfg.defenses:
        raise StudyFileError(
            f"--set defense={defense}: not one of the study's defenses ({', '.join(cfg.defenses)})"
        )
    searched = default_point(cfg, defense)
    defaults = defense_class(defense).defaults()
    for key, value in sets.items():
        head, _, tail = key.partition(".")
        if head == defense and tail:
            if tail not in defaults:
                raise StudyFileError(
                    f"--set {key}: defense {defense!r} has no hyperparameter {tail!r}; "
                    f"hyperparameters: {', '.join(defaults)}"
                )
            check_defense_value(defense, tail, value)
            searched[tail] = value
        else:
            raw_overrides[key] = value
    params = defense_params(cfg, defense, searched)
    if raw_overrides:
        cfg = load_study(args.file, raw_overrides)
    image_dir = Path(args.images) if args.images else None

    def show_round(rec: Any) -> None:
        acc = rec.metrics.get("accuracy")
        shown = "n/a" if acc is None else f"{acc:.4f}"
        print(
            f"round {rec.round}: train loss {rec.train_loss:.4f}, test accuracy {shown}, "
            f"{rec.seconds:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def show(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    outcome = run_trial(
        cfg,
        defense,
        params,
        image_dir=image_dir,
        device=args.device,
        on_round=show_round,
        progress=show,
    )
    print(
        json.dumps(
            {
                "defense": defense,
                "params": params,
                "device": outcome.device,
                "metrics": outcome.metrics,
                "rounds": outcome.rounds,
            },
            indent=2,
            default=str,
        )
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report (HTML, Markdown, the front's plot) from a study's files (exit 1 with
    one line when it has no completed trial or a file cannot be read)."""
    from orchestrator.report import NothingToReportError, report
    from orchestrator.results import StudyIOError

    try:
        report(Path(args.dir), utility_loss=args.utility_loss)  # prints where it wrote
    except (NothingToReportError, StudyIOError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List datasets, models, defenses (with their search ranges), attacks and metrics."""
    from attacks import AttackParams, attack_class, available_attacks
    from attacks.labels import LABEL_RULES
    from defenses import available_defenses, defense_class
    from fl import data, models
    from orchestrator.metrics import COST_PER_ATTACK, PRIVACY, PUBLIC_IMAGES, known_metrics

    print("datasets:", ", ".join(data.available()))
    print("models:")
    for name in models.available():
        opts = ", ".join(f"{k}={v!r}" for k, v in models.options(name).items())
        print(f"  {name}: {opts or '(no options)'}")
    print("defenses:")
    for name in available_defenses():
        cls = defense_class(name)
        print(f"  {name}: {(cls.__doc__ or '').strip().splitlines()[0]}")
        for key, default in cls.defaults().items():
            spec = cls.search_space.get(key)
            rng = ""
            if spec is not None:
                rng = (
                    f" search {list(spec.choices or ())}"
                    if spec.type == "categorical"
                    else f" search {spec.type} [{spec.low}, {spec.high}]"
                    + (" log" if spec.log else "")
                )
            print(f"      {key} = {default!r}{rng}")
    print(f"attacks (every one also takes {', '.join(AttackParams.model_fields)}):")
    for name in available_attacks():
        attack = attack_class(name)
        needed = attack().requirements()  # with the attack's defaults
        kinds = "/".join(needed.kinds)
        wants = [
            w
            for w, on in (("knows_bn_stats", needed.bn_stats), ("public_data", needed.public_data))
            if on
        ]
        needs = f"; needs {', '.join(wants)}" if wants else ""
        print(f"  {name} ({kinds}{needs}): {(attack.__doc__ or '').strip().splitlines()[0]}")
        for key, field in attack.Params.model_fields.items():
            if key not in AttackParams.model_fields or key == "iterations":
                default = field.get_default(call_default_factory=True)
                print(f"      {key} = {default!r}")
    print("label inference rules (attacks.infer_labels):", ", ".join(["auto", *LABEL_RULES]))
    per_attack = [f"<attack>_{p}" for p in (*PRIVACY, COST_PER_ATTACK, PUBLIC_IMAGES)]
    print("metrics (per attack: " + ", ".join(per_attack) + "):")
    print("  " + ", ".join(known_metrics()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m orchestrator``."""
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator",
        description="Obscura: privacy-utility Pareto studies of federated-learning defenses.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("study", help="run a study (Ray Tune x Optuna, MLflow, Parquet)")
    p.add_argument("file", help="study YAML file")
    p.add_argument(
        "--trials", type=_search_value("trials"), help="number of trials (overrides search.trials)"
    )
    p.add_argument(
        "--concurrency",
        type=_search_value("concurrency"),
        help="trials at once (overrides search.concurrency)",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--output", help="output folder (overrides output)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted study")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a study key, e.g. --set data.root=../shared/data",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the study to minutes on a CPU (same structure; results in <study>-smoke)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own log lines too (checkpoint notices of every round; hidden by default)",
    )
    p.set_defaults(func=cmd_study)
    p = sub.add_parser("trial", help="run one trial in-process (no Ray) and print JSON")
    p.add_argument("file")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="defense=NAME, <defense>.<param>=V, or any study key (federation.rounds=2)",
    )
    p.add_argument("--device", help="device override (auto, cpu, cuda, cuda:1)")
    p.add_argument("--images", help="folder for reconstruction grids (default: none written)")
    p.set_defaults(func=cmd_trial)
    p = sub.add_parser("validate", help="check a study file")
    p.add_argument("file")
    p.add_argument("--smoke", action="store_true", help="validate the --smoke version")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser(
        "report", help="write report.html and report.md (Pareto table, plot, best trials, images)"
    )
    p.add_argument("dir", help="the study's output folder (output/<study>)")
    p.add_argument(
        "--utility-loss",
        type=_fraction,
        default=0.01,
        help="utility a defense may lose against the control (default 0.01 = 1 point)",
    )
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("list", help="list datasets, models, defenses, attacks and metrics")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StudyFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        # Known operational failures get one readable line (exit 1); anything else is a bug
        # and keeps its traceback.
        from fl.data import DatasetError
        from orchestrator.tracking import TrackingError

        if isinstance(err, DatasetError | TrackingError | ConnectionError):
            print(f"error: {err}", file=sys.stderr)
            return 1
        raise
