"""Running a study: Ray Tune trials, proposed by Optuna, tracked in MLflow and Parquet.

Each Ray Tune trial runs :func:`orchestrator.trial.run_trial` with the resources of the study's
``resources`` section. Optuna (through Ray Tune's ``OptunaSearch``, multi-objective) proposes the
defense and its hyperparameters from a define-by-run space; its study lives in
``<output>/<study>/optuna.db`` so it can be resumed and inspected with Optuna's own tools. A
driver-side callback writes each finished trial to MLflow (parent run = study, child run = trial)
and to the Parquet files, one atomic write at a time. At the end the Pareto front over the
study's objectives is computed, printed, plotted to ``pareto.png`` and logged.

Resuming (``--resume``) starts a new Tune run for the trials still missing, on the same Optuna
storage, Parquet files and MLflow parent run: a trial interrupted by a killed driver is marked
failed in Optuna, dropped from Parquet and its MLflow run marked KILLED, and then run again; one
recorded in Parquet whose completion had not yet reached Optuna is completed there from its row.

The folder has one writer: the driver holds :class:`orchestrator.folder_lock.StudyLock` for the
whole run. A resume is refused when the study file changed (:mod:`orchestrator.resume_check`).
Round checkpoints hold the victims' images: they are deleted when the Tune run ends, however it
ends, and first thing on a resume for the runs a killed driver left (:mod:`orchestrator.privacy`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from orchestrator.analysis import StudyResults
from orchestrator.config import StudyConfig, dump_study, load_study
from orchestrator.folder_lock import StudyLock
from orchestrator.privacy import drop_trial_images, private_dir, purge_private
from orchestrator.reconcile import Reconciled, reconcile
from orchestrator.results import ResultStore, StudyIOError, atomic_write
from orchestrator.resume_check import check_study_folder
from orchestrator.search_space import (
    define_by_run,
    initial_points,
    make_sampler,
    trial_params,
)

if TYPE_CHECKING:
    from orchestrator.tracking import StudyTracker


#: Ray loggers whose INFO lines (one "Checkpoint successfully created" per round of every trial)
#: would bury the study's progress; kept at WARNING in the workers unless ``--verbose``.
RAY_CHATTER = ("ray.train", "ray.tune")


def quiet_ray_chatter() -> None:
    """Raise Ray Train's and Tune's worker loggers to WARNING (errors still show)."""
    for name in RAY_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)


def _trainable(
    tune_config: dict[str, Any],
    study_raw: dict[str, Any],
    customs: dict[str, dict[str, Any]],
    quiet: bool = True,
) -> None:
    """The function every Ray Tune trial runs (module level so Ray can ship it)."""
    import ray
    from ray import tune

    from orchestrator.registry import restore_customs
    from orchestrator.trial import run_trial

    if quiet:
        quiet_ray_chatter()
    restore_customs(customs)
    config = StudyConfig.model_validate(study_raw)
    defense, params = trial_params(config, tune_config)
    trial_id = tune.get_context().get_trial_id() or "local"
    image_dir = None
    if config.tracking.log_images != "none":
        image_dir = config.folder / "images" / trial_id
    outcome = run_trial(
        config,
        defense,
        params,
        image_dir=image_dir,
        restore=_load_checkpoint(),
        on_checkpoint=(
            functools.partial(_save_checkpoint, config) if config.search.checkpoint_every else None
        ),
        checkpoint_every=config.search.checkpoint_every,
    )
    report: dict[str, Any] = {
        k: (float("nan") if v is None else float(v)) for k, v in outcome.metrics.items()
    }
    report.update(
        defense=defense,
        device=outcome.device,
        gpu_ids=json.dumps([str(g) for g in ray.get_gpu_ids()]),
        params_json=json.dumps(params, default=str),
        rounds_json=json.dumps(outcome.rounds),
        attacks_json=json.dumps(outcome.attacks),
        images_json=json.dumps([str(p) for p in outcome.images]),
    )
    tune.report(report)


CHECKPOINT_FILE = "simulator.pt"
STAGING = ".staging"


def _load_checkpoint() -> dict[str, Any] | None:
    """The simulator state of this trial's latest round checkpoint, when Ray Tune retries it."""
    import torch
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state: dict[str, Any] = torch.load(
            Path(folder) / CHECKPOINT_FILE, weights_only=True, map_location="cpu"
        )
    print(f"[obscura] trial resumes from its checkpoint after round {state['round']}", flush=True)
    return state


def _save_checkpoint(config: StudyConfig, state: dict[str, Any], record: Any) -> None:
    """Report a round to Ray Tune with the simulator's state as the trial's checkpoint.

    Ray Tune wants the search's objectives in every report; they are NaN until the trial's
    final report (multi-objective OptunaSearch ignores intermediate results)."""
    import tempfile

    import torch
    from ray import tune

    metrics: dict[str, Any] = {o.metric: float("nan") for o in config.objectives}
    metrics.update(phase="training", round=record.round, train_loss=record.train_loss)
    # staged inside the study's private ray/ folder (not /tmp), named like a checkpoint so
    # that the purges find what a worker killed mid-save leaves
    staging = private_dir(config.folder / "ray" / STAGING)
    with tempfile.TemporaryDirectory(prefix="checkpoint_staging-", dir=staging) as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


class Study:
    """A privacy–utility study (the Python API behind ``python -m orchestrator study``).

    ```python
    from orchestrator import Study
    study = Study.from_yaml("studies/quickstart.yaml")
    results = study.run(trials=4)
    results.front          # the Pareto-optimal trials (a DataFrame)
    ```
    """

    def __init__(self, config: StudyConfig) -> None:
        self.config = config

    @classmethod
    def from_yaml(
        cls, path: str | Path, overrides: dict[str, Any] | None = None, *, smoke: bool = False
    ) -> Study:
        """Load and validate a study file (``overrides``: dotted keys, e.g. ``search.trials``;
        ``smoke``: shrink it to minutes on a CPU, see :mod:`orchestrator.smoke`)."""
        return cls(load_study(path, overrides, smoke=smoke))

    @property
    def folder(self) -> Path:
        """The study's output folder."""
        return self.config.folder

    def run(
        self,
        *,
        trials: int | None = None,
        concurrency: int | None = None,
        address: str | None = None,
        output: str | Path | None = None,
        resume: bool = False,
        verbose: int = 1,
    ) -> StudyResults:
        """Run the study (or, with ``resume``, its missing trials) and return the results.

        Args:
            trials: overrides ``search.trials`` for this run (the study's config is unchanged).
            concurrency: overrides ``search.concurrency`` for this run.
            address: a Ray cluster to join (default: ``RAY_ADDRESS``, else a local Ray).
            output: overrides ``output`` for this run.
            resume: continue the study in its output folder.
            verbose: Ray Tune's verbosity (2 or more also shows Ray's worker log lines,
                such as its checkpoint notices, hidden at 1).

        Raises:
            FileExistsError: the folder already holds a study and ``resume`` is False.
            StudyFileError: the data, the tracking server or the cluster cannot serve the study;
                or ``resume`` without a study, with a changed study file or tracking URI.
            FolderLockedError: another driver runs this study folder.
            StudyIOError: a study file cannot be read or written (named in the message).
            pydantic.ValidationError: ``trials`` or ``concurrency`` out of the study-file bounds.
            KeyboardInterrupt: Ctrl-C; completed trials are kept for ``--resume``.
        """
        cfg = self._effective(trials, concurrency, output)
        self._preflight(cfg)
        folder = cfg.folder
        with contextlib.ExitStack() as held:
            locked = folder.exists()
            if locked:  # a second driver is refused before it starts Ray
                held.enter_context(StudyLock(folder))
            check_study_folder(cfg, resume=resume)
            # Ray first: an unreachable cluster or a GPU it lacks ends the study before
            # anything is written (no folder, no MLflow run).
            owns_ray = self._start_ray(address)
            self._check_cluster(cfg)
            if not locked:
                held.enter_context(StudyLock(folder))
                check_study_folder(cfg, resume=resume)  # again, now that no one else can write
            return self._run_locked(cfg, resume, output, owns_ray, verbose)

    def _run_locked(
        self,
        cfg: StudyConfig,
        resume: bool,
        output: str | Path | None,
        owns_ray: bool,
        verbose: int,
    ) -> StudyResults:
        """The study in its locked folder: records reconciled on resume, the Tune run, the
        front."""
        from orchestrator.summary import summarise
        from orchestrator.tracking import StudyTracker

        folder = cfg.folder
        if resume:  # the round checkpoints (private images) a killed driver left behind
            purge_private(folder / "ray")
        atomic_write(folder / "study.yaml", lambda fh: fh.write(dump_study(cfg).encode("utf-8")))
        store = ResultStore(folder)
        tracker = StudyTracker(cfg.tracking.mlflow_uri, cfg.study, folder, resume=resume)
        storage = f"sqlite:///{folder / 'optuna.db'}"
        state = (
            reconcile(cfg, store, tracker, storage, initial_points(cfg))
            if resume
            else Reconciled(done=0, points=initial_points(cfg))
        )
        drop_trial_images(folder / "images", state.dropped)
        if not resume or tracker_is_new(tracker):
            tracker.log_study(_flat_params(cfg), dump_study(cfg))
        if cfg.search.trials > state.done:
            private_dir(folder / "ray")
            if cfg.tracking.log_images != "none":
                private_dir(folder / "images")
            tuner = _tuner(cfg, store, tracker, storage, state, verbose)
            _fit(tuner, tracker, folder, cfg.output if output else None, owns_ray)
        return summarise(cfg, store, tracker)

    def _effective(
        self, trials: int | None, concurrency: int | None, output: str | Path | None
    ) -> StudyConfig:
        """A copy of the study's config with this run's overrides, validated like the study
        file's values (``pydantic.ValidationError`` names a bad one)."""
        search: dict[str, Any] = self.config.search.model_dump()
        if trials is not None:
            search["trials"] = trials
        if concurrency is not None:
            search["concurrency"] = concurrency
        update: dict[str, Any] = {"search": type(self.config.search).model_validate(search)}
        if output is not None:
            update["output"] = Path(output).expanduser().resolve()
        return self.config.model_copy(update=update, deep=True)

    def _preflight(self, cfg: StudyConfig) -> None:
        """Checks before anything is written: an ``http(s)`` tracking server answers, the
        dataset's files load (a missing or corrupt file is one readable error here, not a
        failure in every trial) and there are at least as many training examples as clients."""
        from fl import data as fl_data
        from orchestrator.config import StudyFileError
        from orchestrator.tracking import ensure_reachable

        ensure_reachable(cfg.tracking.mlflow_uri)
        d = cfg.data
        train = fl_data.load(
            d.dataset, root=d.root, split="train", download=d.download, image_size=d.image_size
        )
        fl_data.load(
            d.dataset, root=d.root, split="test", download=d.download, image_size=d.image_size
        )
        clients = cfg.federation.clients
        if clients > len(train):
            raise StudyFileError(
                f"federation.clients ({clients}) exceeds the {len(train)} training examples of "
                f"{d.dataset}; use fewer clients"
            )

    def _check_cluster(self, cfg: StudyConfig) -> None:
        """A GPU request on a cluster without GPUs would wait forever: reject it."""
        import ray

        from orchestrator.config import StudyFileError

        wanted = cfg.resources.gpu
        have = float(ray.cluster_resources().get("GPU", 0.0))
        if wanted > 0 and have == 0:
            raise StudyFileError(
                f"resources.gpu is {wanted:g} but the Ray cluster has no GPU; set "
                "resources.gpu: 0 or add GPU nodes"
            )

    @staticmethod
    def _start_ray(address: str | None) -> bool:
        """Connect to (or start) Ray unless it runs already; True when this call did."""
        import ray

        if ray.is_initialized():
            return False
        target = address or os.environ.get("RAY_ADDRESS")
        if target:
            from orchestrator.network import check_ray_address

            check_ray_address(target)
        try:
            if target:
                ray.init(address=target, log_to_driver=True)
            else:
                ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        except ConnectionError as err:
            raise ConnectionError(
                f"cannot reach the Ray cluster at {target!r}: {err}. Start it with "
                "`ray start --head` or drop --address to run locally"
            ) from err
        return True


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tracker_is_new(tracker: StudyTracker) -> bool:
    """Whether the parent run has no parameters yet (a fresh study)."""
    return not tracker.client.get_run(tracker.parent_run_id).data.params


def _tuner(
    cfg: StudyConfig,
    store: ResultStore,
    tracker: StudyTracker,
    storage: str,
    state: Reconciled,
    verbose: int,
) -> Any:
    """The Ray Tune experiment (a ``tune.Tuner``) of the trials still to run."""
    from ray import tune

    from orchestrator.callback import StudyCallback
    from orchestrator.registry import capture_customs

    searcher = _searcher(cfg, storage, state.points)
    trainable = tune.with_resources(
        tune.with_parameters(
            _trainable,
            study_raw=cfg.model_dump(mode="json"),
            customs=capture_customs(),
            quiet=verbose < 2,
        ),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu},
    )
    callback = StudyCallback(cfg, store, tracker, first_number=state.done, searcher=searcher)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=cfg.search.trials - state.done,
            max_concurrent_trials=cfg.search.concurrency,
            # A worker process runs trial after trial: no new process, imports and dataset
            # load per trial (seconds each); trials share no other state.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"{cfg.study}-{state.done}",
            storage_path=str(cfg.folder / "ray"),
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=cfg.search.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=verbose,
        ),
    )


def _fit(
    tuner: Any, tracker: StudyTracker, folder: Path, output: Path | None, owns_ray: bool
) -> None:
    """Run the experiment, then delete every round checkpoint however it ended (a Ray this
    study started is shut down first when it did not complete, so no trial writes one
    after); on Ctrl-C mark the parent run interrupted and say how to resume."""
    try:
        # Ctrl-C raises KeyboardInterrupt here instead of Ray Tune's own handler, which would
        # return as if the study were done and suggest Tuner.restore (not ours). Round
        # checkpoints make Tune snapshot often; its warning about that is noise.
        with _environ(
            TUNE_DISABLE_SIGINT_HANDLER="1",
            TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S="0",
        ):
            tuner.fit()
    except BaseException as err:
        if owns_ray:
            import ray

            ray.shutdown()
        _purge_after_failure(folder / "ray")
        if isinstance(err, KeyboardInterrupt):
            tracker.interrupt()
            print(
                f"\nStudy interrupted. Completed trials are saved in {folder}.\n"
                f"Resume with: python -m orchestrator study <study file> --resume"
                + (f" --output {output}" if output else ""),
                file=sys.stderr,
            )
        raise
    purge_private(folder / "ray")


def _purge_after_failure(ray_dir: Path) -> None:
    """The checkpoints' purge while another error is on its way out: a file that cannot be
    deleted is named in a warning instead of replacing that error."""
    try:
        purge_private(ray_dir)
    except StudyIOError as err:
        print(f"[obscura] warning: {err}", file=sys.stderr, flush=True)


def _searcher(cfg: StudyConfig, storage: str, points: list[dict[str, Any]]) -> Any:
    from orchestrator.tune_searcher import RecordedFirstOptunaSearch

    return RecordedFirstOptunaSearch(
        space=define_by_run(cfg),
        metric=[o.metric for o in cfg.objectives],
        mode=[o.mode for o in cfg.objectives],
        points_to_evaluate=points or None,
        sampler=make_sampler(cfg.search.sampler, cfg.seed),
        study_name=cfg.study,
        storage=optuna.storages.RDBStorage(storage),
    )


def _flat_params(cfg: StudyConfig) -> dict[str, Any]:
    return {
        "dataset": cfg.data.dataset,
        "image_size": cfg.data.image_size,
        "model": cfg.model.name,
        **{f"model.{k}": v for k, v in cfg.model.options().items()},
        **{f"federation.{k}": v for k, v in cfg.federation.model_dump().items()},
        "defenses": ",".join(cfg.defenses),
        "attacks": ",".join(a.key for a in cfg.attacks),
        **{
            f"attack.{a.key}.public_data": a.capabilities.public_data.describe(cfg.data.dataset)
            for a in cfg.attacks
            if a.capabilities.public_data is not None
        },
        "objectives": ",".join(f"{o.metric}:{o.mode}" for o in cfg.objectives),
        "sampler": cfg.search.sampler,
        "trials": cfg.search.trials,
        "seed": cfg.seed,
    }
