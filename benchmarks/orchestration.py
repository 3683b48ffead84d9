"""What Ray Tune, Optuna and MLflow add to a study: total wall time vs the trials' own compute.

Acceptance (issue: orchestration): the orchestration adds at most 5 % to a study whose trials
take 30 s or more, comparing the total wall time with the sum of the trials' compute at the same
concurrency.

    python benchmarks/orchestration.py [--trials 8] [--concurrency 1] [--trial-seconds 30]
                                       [--rounds 5] [--data-root ../shared/data] [--keep]

Workload: a tiny but real study (as in the orchestrator tests): an MLP (16 hidden units) on
PneumoniaMNIST at 16 px, FedSGD with 2 clients (both sampled each round, batch 2, 16 examples
each), ``--rounds`` rounds with a Ray Tune checkpoint after every round (the default
``search.checkpoint_every: 1``), iDLG with 2 iterations on one victim of round 0, MLflow on a
SQLite store, Parquet, Optuna on SQLite and image pairs logged, all in a temporary folder. The
study's single defense, ``sleep``, is registered here in the driver and shipped to Ray's workers
by :mod:`orchestrator.registry` (it lives in ``__main__``, which Ray pickles by value).

Known compute: ``sleep`` calls ``time.sleep(trial_seconds / batches)`` on each of the trial's
``rounds x clients_per_round`` private batches (FedSGD: one batch per client and round), so a
trial spends ``--trial-seconds`` sleeping plus the real (tiny) federated run and attack. Sleeping
is enough here because the benchmark measures the orchestration's own cost, not the trial's;
it also keeps the CPU free for the driver, as a GPU trial would. The compute a trial counts is
what it measures itself and reports: ``seconds_train + seconds_attack`` (perf_counter around
the federated run and around the attacks, inside :func:`orchestrator.trial.run_trial`).

Measured: the wall time of ``ray.init`` (a local Ray with ``concurrency`` CPUs, one per trial)
plus the whole ``Study.run`` call (pre-flight data check, MLflow parent run, Optuna storage,
Ray Tune, every trial's worker start-up, MLflow child runs and Parquet writes, then the Pareto
front, its plot and the summary). Overhead = wall - ideal, ideal = sum of trial compute /
concurrency; overhead % = overhead / ideal. The breakdown comes from the driver's own clock,
timing wrappers put around ``Study._preflight``, ``StudyTracker.__init__``, ``Tuner.fit`` and
``summarise`` for the run, and the trials' ``started_at``/``finished_at`` (written by the
driver-side callback when Ray Tune starts and completes a trial): Ray start-up, the set-up
before Ray Tune, Tune's set-up up to the first trial, per trial the time outside its compute
(data loading, model building, reporting, MLflow/Parquet of that trial), the gap before a freed
slot runs the next trial (Tune's scheduling, Optuna's suggestion and starting the trial's new
Ray actor, ``reuse_actors=False``, with its imports), and the time from the last trial's end to
the return (Tune's teardown, the summary). Checkpoint reports made inside the federated run count
in ``seconds_train``; they are shown separately (``seconds_train`` minus the rounds' own
seconds) together with the overhead when they are counted as orchestration instead. Imports and
``ray.shutdown`` are printed but not counted.

Run it on an idle machine; keep ``--trial-seconds`` at 30 or more for the acceptance figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _isolate  # noqa: F401  (before our packages: benchmarks/attacks.py shadows attacks)
import torch
from pydantic import Field

from defenses import Defense, DefenseParams, register_defense
from fl.simulation.hooks import ClientContext

DEFENSE = "sleep"


class SleepParams(DefenseParams):
    """The trial's known compute: ``seconds`` slept in total over ``batches`` batches."""

    seconds: float = Field(1.0, ge=0)
    batches: int = Field(1, ge=1)


@register_defense(DEFENSE)
class SleepDefense(Defense):
    """A defense of known compute: it sleeps ``seconds / batches`` on each private batch and
    changes nothing."""

    Params = SleepParams

    def transform_batch(
        self, images: torch.Tensor, labels: torch.Tensor, model: Any, ctx: ClientContext
    ) -> torch.Tensor:
        time.sleep(self.params.seconds / self.params.batches)
        return images


def study_raw(
    folder: Path, data_root: Path, trials: int, concurrency: int, seconds: float, rounds: int
) -> dict[str, Any]:
    """The benchmark's study: the orchestrator tests' tiny study with the ``sleep`` defense."""
    clients_per_round = 2
    raw: dict[str, Any] = {
        "study": "orchestration",
        "seed": 0,
        "data": {"dataset": "pneumoniamnist", "root": str(data_root), "image_size": 16},
        "model": {"name": "mlp", "hidden": [16]},
        "federation": {
            "algorithm": "fedsgd",
            "clients": 2,
            "clients_per_round": clients_per_round,
            "rounds": rounds,
            "batch_size": 2,
            "lr": 0.1,
            "partition": {"scheme": "iid", "max_per_client": 16},
        },
        "defenses": {DEFENSE: {"seconds": seconds, "batches": rounds * clients_per_round}},
        "attacks": [{"name": "idlg", "rounds": [0], "victims": 1, "params": {"iterations": 2}}],
        "objectives": [
            {"metric": "test_accuracy", "mode": "max"},
            {"metric": "attack_psnr_max", "mode": "min"},
        ],
        "search": {"sampler": "random", "trials": trials, "concurrency": concurrency},
        "resources": {"cpu": 1, "gpu": 0},
        "tracking": {"mlflow_uri": f"sqlite:///{folder}/mlflow.db", "log_images": "pairs"},
        "output": str(folder / "results"),
    }
    backbone = data_root.parent / "weights" / "lpips_alexnet_features.pth"
    if backbone.is_file():
        raw["lpips_backbone"] = str(backbone)
    return raw


@contextlib.contextmanager
def timed(targets: list[tuple[Any, str, str]]) -> Iterator[dict[str, tuple[float, float]]]:
    """Wrap ``owner.name`` for each ``(owner, name, label)`` to record ``label``: (POSIX start,
    seconds) of its last call; the originals are put back afterwards."""
    spans: dict[str, tuple[float, float]] = {}
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]

    def wrap(original: Any, label: str) -> Any:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start, t0 = time.time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spans[label] = (start, time.perf_counter() - t0)

        return wrapper

    for (owner, name, label), (_, _, original) in zip(targets, saved, strict=True):
        setattr(owner, name, wrap(original, label))
    try:
        yield spans
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


def _epoch(column: Any) -> list[float]:
    """POSIX seconds of a timestamp column."""
    return [ts.timestamp() for ts in column]


def _median(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f})"


def report(
    trials: Any,
    rounds: Any,
    *,
    concurrency: int,
    trial_seconds: float,
    imports: float,
    ray_start: float,
    run_start: float,
    run_end: float,
    run_seconds: float,
    spans: dict[str, tuple[float, float]],
) -> None:
    """Print the comparison and its breakdown."""
    done = trials[trials["status"] == "completed"]
    n = len(done)
    compute = (done["seconds_train"] + done["seconds_attack"]).tolist()
    total = float(sum(compute))
    ideal = total / concurrency
    wall = ray_start + run_seconds
    overhead = wall - ideal
    starts = sorted(_epoch(done["started_at"]))
    ends = sorted(_epoch(done["finished_at"]))
    durations = [
        f - s for s, f in zip(_epoch(done["started_at"]), _epoch(done["finished_at"]), strict=True)
    ]
    outside = [d - c for d, c in zip(durations, compute, strict=True)]
    gaps = [starts[k + concurrency] - ends[k] for k in range(n - concurrency)]
    round_seconds = rounds.groupby("trial_id")["seconds"].sum()
    in_run = [
        float(row.seconds_train) - float(round_seconds.get(row.trial_id, 0.0))
        for row in done.itertuples()
    ]
    strict_ideal = (total - sum(in_run)) / concurrency

    print(f"{'trials':<46} {n} completed of {len(trials)}")
    print(f"{'concurrency':<46} {concurrency}")
    print(f"{'known compute per trial (sleep)':<46} {trial_seconds:.2f} s")
    print(f"{'measured compute per trial (train + attack)':<46} {_median(compute)}")
    print(f"{'sum of trial compute':<46} {total:.2f} s")
    print(f"{'ideal wall time (sum / concurrency)':<46} {ideal:.2f} s")
    if n % concurrency:
        waves = math.ceil(n / concurrency) * statistics.mean(compute)
        print(f"{'  (uneven waves: ceil(n/c) x mean compute)':<46} {waves:.2f} s")
    print(f"{'measured wall time (ray.init + Study.run)':<46} {wall:.2f} s")
    print(f"{'overhead':<46} {overhead:.2f} s")
    print(f"{'overhead %  (wall - ideal) / ideal':<46} {100 * overhead / ideal:.2f} %")
    print()
    fit_start, fit_seconds = spans["fit"]
    summary_seconds = spans["summary"][1]
    print("breakdown (driver clock and the trials' started_at / finished_at):")
    print(f"  {'Ray start-up (ray.init)':<44} {ray_start:.2f} s")
    print(f"  {'Study.run before Ray Tune (Tuner.fit)':<44} {fit_start - run_start:.2f} s")
    print(f"  {'  of which pre-flight data check':<44} {spans['preflight'][1]:.2f} s")
    print(f"  {'  of which MLflow store and parent run':<44} {spans['mlflow'][1]:.2f} s")
    print(f"  {'Tuner.fit start to first trial start':<44} {starts[0] - fit_start:.2f} s")
    print(f"  {'first trial start to last trial end':<44} {ends[-1] - starts[0]:.2f} s")
    print(
        f"  {'last trial end to Tuner.fit return':<44} {fit_start + fit_seconds - ends[-1]:.2f} s"
    )
    print(f"  {'summary (front, plot, MLflow artifacts)':<44} {summary_seconds:.2f} s")
    print(f"  {'last trial end to Study.run return':<44} {run_end - ends[-1]:.2f} s")
    print(f"  {'per trial, outside its compute (median)':<44} {_median(outside)}")
    print(f"  {'between trials, slot freed to next start':<44} {_median(gaps)}")
    print(f"  {'checkpoint reports inside seconds_train':<44} {_median(in_run)}")
    strict = wall - strict_ideal
    print(
        f"  {'overhead counting those as orchestration':<44} {strict:.2f} s "
        f"({100 * strict / strict_ideal:.2f} %)"
    )
    print(f"  {'not counted: imports of ray/optuna/mlflow':<44} {imports:.2f} s")


def main(argv: list[str] | None = None) -> int:
    default_root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument(
        "--trial-seconds", type=float, default=30.0, help="known compute (sleep) per trial"
    )
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds per trial")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=default_root,
        help="folder holding pneumoniamnist.npz (default: ../shared/data)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the output folder")
    parser.add_argument("--verbose", type=int, default=0, help="Ray Tune verbosity (0-3)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.concurrency < 1 or args.rounds < 1 or args.trial_seconds < 0:
        parser.error("--trials, --concurrency and --rounds must be >= 1, --trial-seconds >= 0")

    t0 = time.perf_counter()
    import mlflow  # noqa: F401
    import optuna
    import ray
    from ray import tune

    import orchestrator.summary
    import orchestrator.tracking
    from orchestrator import Study
    from orchestrator.config import parse_study

    imports = time.perf_counter() - t0
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    folder = Path(tempfile.mkdtemp(prefix="obscura-orchestration-"))
    data_root = args.data_root.expanduser().resolve()
    raw = study_raw(
        folder, data_root, args.trials, args.concurrency, args.trial_seconds, args.rounds
    )
    cfg = parse_study(raw, "benchmark")
    print(
        f"study: {args.trials} trials at concurrency {args.concurrency}, "
        f"{args.trial_seconds:g} s of sleep per trial over {args.rounds} rounds; "
        f"output {folder}",
        flush=True,
    )
    ray.shutdown()
    try:
        t0 = time.perf_counter()
        ray.init(
            num_cpus=args.concurrency,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=args.verbose > 0,
        )
        ray_start = time.perf_counter() - t0
        targets = [
            (Study, "_preflight", "preflight"),
            (orchestrator.tracking.StudyTracker, "__init__", "mlflow"),
            (tune.Tuner, "fit", "fit"),
            (orchestrator.summary, "summarise", "summary"),
        ]
        with timed(targets) as spans:
            run_start = time.time()
            t0 = time.perf_counter()
            results = Study(cfg).run(verbose=args.verbose)
            run_seconds = time.perf_counter() - t0
            run_end = time.time()
    finally:
        t0 = time.perf_counter()
        ray.shutdown()
        shutdown = time.perf_counter() - t0

    import pandas as pd

    rounds = pd.read_parquet(results.folder / "rounds.parquet")
    print()
    report(
        results.trials,
        rounds,
        concurrency=min(args.concurrency, args.trials),
        trial_seconds=args.trial_seconds,
        imports=imports,
        ray_start=ray_start,
        run_start=run_start,
        run_end=run_end,
        run_seconds=run_seconds,
        spans=spans,
    )
    print(f"  {'not counted: ray.shutdown':<44} {shutdown:.2f} s")
    if args.keep:
        print(f"\noutput kept: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
