"""One trial: a full federated run with one defense configuration, then the configured attacks.

:func:`run_trial` is what a Ray Tune trial executes (and ``python -m orchestrator trial`` runs
in-process). It returns a :class:`TrialOutcome` with the trial's metrics (names in
:mod:`orchestrator.metrics`), its per-round history, one record per attacked image, and the
paths of the image grids it wrote (only as ``tracking.log_images`` allows).
"""

from __future__ import annotations

import functools
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attacks import AttackerResources, Reconstruction, get_attack, load_public_data
from attacks.inverting_gradients import batch_victims
from attacks.scoring.metrics import Score, score
from attacks.scoring.plots import save_pair_grid
from attacks.scoring.population import MIN_POOL, Reference
from defenses import Defense, get_defense
from fl import data as fl_data
from fl import models as fl_models
from fl.simulation import CaptureConfig, RoundRecord, RunResult, Simulator, resolve_device
from fl.simulation.observation import GroundTruth, Observation
from orchestrator.config import AttackSection, StudyConfig
from orchestrator.metrics import (
    COST_PER_ATTACK,
    PUBLIC_IMAGES,
    attack_summary,
    custom_objectives,
    worst_case,
)
from orchestrator.results import attack_record

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    """Everything a trial produced."""

    metrics: dict[str, float | None]
    rounds: list[dict[str, Any]]
    attacks: list[dict[str, Any]]
    images: list[Path] = field(default_factory=list)
    device: str = "cpu"


@functools.lru_cache(maxsize=4)
def _load_split(dataset: str, root: str, split: str, download: bool, size: int | None) -> Any:
    """Datasets are loaded once per process (a Ray worker may run several trials)."""
    return fl_data.load(dataset, root=root, split=split, download=download, image_size=size)


@functools.lru_cache(maxsize=2)
def _reference(dataset: str, root: str, download: bool, size: int | None, pool: int) -> Reference:
    """The population prior of a study: the evaluation (test) split, which no client trains on,
    as the mean image and identification pool (built once per process)."""
    test = _load_split(dataset, root, "test", download, size)
    ref = Reference.from_images(test.images, pool_size=pool)
    if ref.pool.shape[0] < MIN_POOL:
        log.warning(
            "identification pool of %d images (%s test split): fewer than %d make identifying a "
            "victim easy; read identification rates with that in mind",
            ref.pool.shape[0],
            dataset,
            MIN_POOL,
        )
    return ref


def _reset_peak_memory(device: torch.device) -> None:
    """Start a trial's peak-memory measurement: CUDA's peak counter, or on Linux the process's
    peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) so that a Ray worker
    reused for several trials reports each trial's own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    clear = Path("/proc/self/clear_refs")
    if clear.exists():
        try:
            clear.write_text("5")
        except OSError as err:  # not permitted in some containers: the process peak is used
            print(f"[obscura] peak memory is the process's, not the trial's: {err}", flush=True)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the trial in MiB: CUDA memory allocated on a GPU; on a CPU the peak
    resident set since :func:`_reset_peak_memory` (``VmHWM``), else the process's peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_trial(
    config: StudyConfig,
    defense: str,
    params: dict[str, Any],
    *,
    image_dir: Path | None = None,
    device: str | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    progress: Callable[[str], None] | None = None,
    restore: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any], RoundRecord], None] | None = None,
    checkpoint_every: int = 1,
) -> TrialOutcome:
    """Run one trial of ``config`` with ``defense`` at ``params`` (over its defaults).

    Seeds torch from the study seed so that trials differ only by their defense configuration.
    ``progress`` receives one line per finished attack run (``on_round`` one record per round).

    Round-level checkpoints: ``on_checkpoint`` receives the simulator's state
    (:meth:`fl.simulation.Simulator.state_dict`) every ``checkpoint_every`` rounds and after
    the last round; ``restore`` is such a state, from which the federated run continues (the
    result equals the uninterrupted run's). ``seconds_train`` counts this attempt's rounds only.
    Attacks see only the captured observations, restricted to each attack's capabilities;
    scoring uses the ground truth (the clients' ORIGINAL images) with the canonical protocol.
    """
    dev = resolve_device(device or config.device)
    _reset_peak_memory(dev)
    d = config.data
    train = _load_split(d.dataset, str(d.root), "train", d.download, d.image_size)
    test = _load_split(d.dataset, str(d.root), "test", d.download, d.image_size)
    torch.manual_seed(config.seed)
    model = fl_models.build(
        config.model.name,
        channels=train.channels,
        classes=train.info.num_classes,
        image_size=train.image_size[0],
        **config.model.options(),
    )
    hooks = get_defense(defense, **params)
    t0 = time.perf_counter()
    sim = _simulator(config, model, (train, test), hooks, dev, on_round)
    if restore is not None:
        sim.load_state_dict(restore)
    try:
        result = _federate(sim, config.federation.rounds, on_checkpoint, checkpoint_every)
    finally:
        sim.close()  # client threads (parallel_clients) end with the trial, also on failure
    seconds_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    knowledge = _Knowledge(defense, params, sim.partition, sim.holdout, train.channels)
    attacked = _attack(config, result, dev, image_dir, progress, knowledge)
    metrics = _trial_metrics(result, attacked, hooks)
    metrics.update(seconds_train=seconds_train, seconds_attack=time.perf_counter() - t0)
    metrics["seconds_metrics"] = attacked.seconds_metrics
    metrics.update({f"{k}_{COST_PER_ATTACK}": v for k, v in attacked.seconds_per_attack.items()})
    metrics["peak_memory_mb"] = _peak_memory_mb(dev)
    rounds = _round_rows(result)
    for name, objective in custom_objectives().items():
        value = objective.fn({"metrics": dict(metrics), "rounds": rounds, "attacks": attacked.rows})
        metrics[name] = None if value is None else float(value)
    return TrialOutcome(metrics, rounds, attacked.rows, attacked.images, str(dev))


def _simulator(
    config: StudyConfig,
    model: torch.nn.Module,
    data: tuple[Any, Any],
    hooks: Defense[Any],
    device: torch.device,
    on_round: Callable[[RoundRecord], None] | None,
) -> Simulator:
    """The trial's federated run on ``data`` (train, test), capturing exactly what the union
    of its attacks is granted (the private labels only when an attack knows them)."""
    capture = CaptureConfig(
        rounds=sorted({r for a in config.attacks for r in a.rounds}),
        victims=max(a.victims for a in config.attacks),
        reveal_labels=any(a.capabilities.knows_labels for a in config.attacks),
    )
    train, test = data
    return Simulator(
        model,
        train,
        config.federation,
        test=test,
        hooks=hooks,
        capture=capture,
        device=device,
        seed=config.seed,
        on_round=on_round,
    )


def _federate(
    sim: Simulator,
    rounds: int,
    on_checkpoint: Callable[[dict[str, Any], RoundRecord], None] | None,
    checkpoint_every: int,
) -> RunResult:
    """The remaining rounds, with a checkpoint every ``checkpoint_every`` rounds and at the end."""
    while sim.round < rounds:
        record = sim.run_round()
        due = sim.round % max(1, checkpoint_every) == 0 or sim.round == rounds
        if on_checkpoint is not None and due:
            on_checkpoint(sim.state_dict(), record)
    return sim.run()


@dataclass(frozen=True)
class _Knowledge:
    """What the trial tells its attackers beyond the observations: the defense and its
    hyperparameters (Kerckhoffs), and, to keep public data off every client's, the partition
    and the held-out train indices."""

    defense: str
    params: dict[str, Any]
    partition: list[Any]
    holdout: Any
    channels: int

    def resources(self, config: StudyConfig, spec: AttackSection) -> AttackerResources:
        """The resources of ``spec``'s attacker: its public data (loaded and checked against
        every client's indices) and a factory of fresh instances of the trial's defense."""
        granted = spec.capabilities.public_data
        d = config.data
        public = None
        if granted is not None:
            public = load_public_data(
                granted,
                dataset=d.dataset,
                root=str(d.root),
                seed=config.seed,
                image_size=d.image_size,
                download=d.download,
                holdout=self.holdout,
                clients=self.partition,
                channels=self.channels,
            )
        return AttackerResources(
            public=public,
            defense=functools.partial(get_defense, self.defense, **self.params),
            defense_name=self.defense,
            rounds=config.federation.rounds,
        )


@dataclass
class _Attacked:
    """What the attacks of a trial produced: one record per attacked image, each attack's
    summary, the image grids written, and the time spent scoring and per attack."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, dict[str, float | None]] = field(default_factory=dict)
    images: list[Path] = field(default_factory=list)
    seconds_metrics: float = 0.0
    seconds_per_attack: dict[str, float] = field(default_factory=dict)
    public_images: dict[str, int] = field(default_factory=dict)


def _attack(
    config: StudyConfig,
    result: RunResult,
    device: torch.device,
    image_dir: Path | None,
    progress: Callable[[str], None] | None,
    knowledge: _Knowledge,
) -> _Attacked:
    """Every configured attack on its victims (the first ``victims`` sampled clients of each
    attacked round), scored against the ground truth; attackers granted public data train on
    it (its loading and their training count in the attack's seconds)."""
    out = _Attacked()
    d = config.data
    reference = _reference(
        d.dataset, str(d.root), d.download, d.image_size, config.identification_pool
    )
    rank = {(r.round, client): i for r in result.history for i, client in enumerate(r.clients)}
    for spec in config.attacks:
        started = time.perf_counter()
        chosen = [
            (obs, truth)
            for obs, truth in result.captures
            if obs.round in spec.rounds and rank[(obs.round, obs.client)] < spec.victims
        ]
        attack = get_attack(spec.name, seed=config.seed, **spec.params)
        resources = knowledge.resources(config, spec)
        if resources.public is not None:
            out.public_images[spec.key] = len(resources.public)
        reconstructions = attack.run_many(
            [o for o, _ in chosen],
            spec.capabilities,
            batched=len(chosen) > 1 and batch_victims(spec.batch_victims, device),
            resources=resources,
        )  # batched where the attack has such a path and the victims allow it
        rows: list[dict[str, Any]] = []
        for (obs, truth), rec in zip(chosen, reconstructions, strict=True):
            t1 = time.perf_counter()
            s = score(
                rec,
                truth,
                success_psnr=config.success_psnr,
                device=str(device),
                lpips_backbone=config.lpips_backbone,
                reference=reference,
            )
            out.seconds_metrics += time.perf_counter() - t1
            if progress is not None:
                progress(
                    f"attack {spec.key} round {obs.round} client {obs.client}: "
                    f"PSNR max {s['psnr_max']:.2f} dB ({s['prior_gain_max']:+.2f} dB over the "
                    f"mean image), identified {s['identification_rate']:.0%}, {rec.seconds:.1f} s"
                )
            rows.extend(
                attack_record(
                    spec.key, obs.round, obs.client, img, seconds=rec.seconds, diverged=rec.diverged
                )
                for img in s.per_image
            )
            if image_dir is not None and config.tracking.log_images != "none":
                out.images.append(_save_grid(config, spec.key, obs, truth, rec, s, image_dir))
        out.summaries[spec.key] = attack_summary(rows, config.success_psnr)
        out.rows.extend(rows)
        out.seconds_per_attack[spec.key] = time.perf_counter() - started
    return out


def _save_grid(
    config: StudyConfig,
    key: str,
    obs: Observation,
    truth: GroundTruth,
    rec: Reconstruction,
    scored: Score,
    image_dir: Path,
) -> Path:
    """The reconstruction grid of one victim (ground truth above it when ``log_images`` is
    ``pairs``), reconstructions in the order of the metric protocol's assignment."""
    psnrs = [float(i["psnr"]) for i in scored["per_image"]]
    truth_images = truth.images if config.tracking.log_images == "pairs" else None
    return save_pair_grid(
        truth_images,
        rec.images[scored["assignment"]],
        image_dir / f"{key}_round{obs.round}_client{obs.client}.png",
        psnr=psnrs,
        title=f"{key}, round {obs.round}, client {obs.client}",
    )


def _trial_metrics(
    result: RunResult, attacked: _Attacked, hooks: Defense[Any]
) -> dict[str, float | None]:
    """Final test metrics, every attack's summary, the worst case and the privacy loss ε."""
    metrics: dict[str, float | None] = {
        f"test_{k}": (None if v is None else float(v)) for k, v in result.final_metrics.items()
    }
    for key, summary in attacked.summaries.items():
        metrics.update({f"{key}_{k}": v for k, v in summary.items()})
    metrics.update(worst_case(attacked.summaries))
    for key in attacked.summaries:  # None: the attacker held no public data
        count = attacked.public_images.get(key)
        metrics[f"{key}_{PUBLIC_IMAGES}"] = None if count is None else float(count)
    metrics["epsilon"] = hooks.epsilon()  # at the defense's own δ
    return metrics


def _round_rows(result: RunResult) -> list[dict[str, Any]]:
    """One row per round: loss, seconds and the test metrics after it."""
    return [
        {
            "round": r.round,
            "train_loss": r.train_loss,
            "seconds": r.seconds,
            **{f"test_{k}": v for k, v in r.metrics.items()},
        }
        for r in result.history
    ]
