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

from attacks import get_attack
from attacks.batched import run_inverting_gradients_batched
from attacks.metrics import score
from attacks.plots import save_pair_grid
from defenses import get_defense
from fl import data as fl_data
from fl import models as fl_models
from fl.simulation import CaptureConfig, RoundRecord, Simulator, resolve_device
from orchestrator.config import StudyConfig
from orchestrator.metrics import (
    COST_PER_ATTACK,
    attack_summary,
    custom_objectives,
    worst_case,
)

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


def _batch_victims(mode: str, device: torch.device) -> bool:
    """Whether an attack's victims go into one batched optimisation: ``on``, ``off``, or
    ``auto`` = on a GPU (on a CPU the batched loop measured slower than separate runs). Both
    are opt-ins (the default is ``off``); on CUDA the batched path is not yet verified against
    separate runs, which a warning says."""
    batched = mode == "on" or (mode == "auto" and device.type == "cuda")
    if batched and device.type == "cuda":
        log.warning(
            "batch_victims=%s on %s: not yet verified against separate runs on a GPU "
            "(benchmarks/gpu_check.py checks it); 'off' runs the victims one by one",
            mode,
            device,
        )
    return batched


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
    if config.lpips_backbone is not None:
        from attacks.lpips_net import configure

        configure(backbone_path=config.lpips_backbone)
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
    rounds = sorted({r for a in config.attacks for r in a.rounds})
    victims = max(a.victims for a in config.attacks)
    capture = CaptureConfig(rounds=rounds, victims=victims, reveal_labels=True)

    t0 = time.perf_counter()
    sim = Simulator(
        model,
        train,
        config.federation,
        test=test,
        hooks=hooks,
        capture=capture,
        device=dev,
        seed=config.seed,
        on_round=on_round,
    )
    if restore is not None:
        sim.load_state_dict(restore)
    rounds_total = config.federation.rounds
    try:
        while sim.round < rounds_total:
            record = sim.run_round()
            if on_checkpoint is not None and (
                sim.round % max(1, checkpoint_every) == 0 or sim.round == rounds_total
            ):
                on_checkpoint(sim.state_dict(), record)
        result = sim.run()
    finally:
        sim.close()  # client threads (parallel_clients) end with the trial, also on failure
    seconds_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    seconds_metrics = 0.0
    records: list[dict[str, Any]] = []
    per_attack: dict[str, dict[str, float | None]] = {}
    images: list[Path] = []
    victim_rank: dict[tuple[int, int], int] = {}
    for rnd, clients in ((r.round, r.clients) for r in result.history):
        for rank, client in enumerate(clients):
            victim_rank[(rnd, client)] = rank
    seconds_per_attack: dict[str, float] = {}
    for spec in config.attacks:
        t_attack = time.perf_counter()
        attack = get_attack(spec.name, seed=config.seed, **spec.params)
        rows: list[dict[str, Any]] = []
        chosen = [
            (obs, truth)
            for obs, truth in result.captures
            if obs.round in spec.rounds and victim_rank[(obs.round, obs.client)] < spec.victims
        ]
        if _batch_victims(spec.batch_victims, dev) and len(chosen) > 1:
            reconstructions = run_inverting_gradients_batched(
                attack, [o for o, _ in chosen], spec.capabilities
            )  # falls back to separate runs where batching does not apply
        else:
            reconstructions = [attack.run(o, spec.capabilities) for o, _ in chosen]
        for (obs, truth), rec in zip(chosen, reconstructions, strict=True):
            seconds = rec.seconds
            t1 = time.perf_counter()
            s = score(rec, truth, success_psnr=config.success_psnr, device=str(dev))
            seconds_metrics += time.perf_counter() - t1
            if progress is not None:
                progress(
                    f"attack {spec.key} round {obs.round} client {obs.client}: "
                    f"PSNR max {s['psnr_max']:.2f} dB, {seconds:.1f} s"
                )
            for img in s["per_image"]:
                rows.append(
                    {
                        "attack": spec.key,
                        "round": obs.round,
                        "client": obs.client,
                        "image_index": int(img["index"]),
                        "psnr": float(img["psnr"]),
                        "ssim": float(img["ssim"]),
                        "lpips": None if img.get("lpips") is None else float(img["lpips"]),
                        "label_correct": img.get("label_correct"),
                        "seconds": seconds,
                        "diverged": bool(rec.diverged),
                    }
                )
            if image_dir is not None and config.tracking.log_images != "none":
                order = s["assignment"]
                rec_sorted = rec.images[order]
                name = f"{spec.key}_round{obs.round}_client{obs.client}.png"
                psnrs = [float(i["psnr"]) for i in s["per_image"]]
                truth_images = truth.images if config.tracking.log_images == "pairs" else None
                images.append(
                    save_pair_grid(
                        truth_images,
                        rec_sorted,
                        image_dir / name,
                        psnr=psnrs,
                        title=f"{spec.key}, round {obs.round}, client {obs.client}",
                    )
                )
        per_attack[spec.key] = attack_summary(rows, config.success_psnr)
        records.extend(rows)
        seconds_per_attack[spec.key] = time.perf_counter() - t_attack
    seconds_attack = time.perf_counter() - t0

    final = result.final_metrics
    metrics: dict[str, float | None] = {
        f"test_{k}": (None if v is None else float(v)) for k, v in final.items()
    }
    for key, summary in per_attack.items():
        metrics.update({f"{key}_{k}": v for k, v in summary.items()})
    metrics.update(worst_case(per_attack))
    delta = getattr(hooks.params, "delta", 1e-5)  # a DP defense's own delta, else 1e-5
    metrics["epsilon"] = hooks.epsilon(float(delta))
    metrics["seconds_train"] = seconds_train
    metrics["seconds_attack"] = seconds_attack
    metrics["seconds_metrics"] = seconds_metrics
    metrics.update({f"{key}_{COST_PER_ATTACK}": s for key, s in seconds_per_attack.items()})
    metrics["peak_memory_mb"] = _peak_memory_mb(dev)
    rounds_rows = [
        {
            "round": r.round,
            "train_loss": r.train_loss,
            "seconds": r.seconds,
            **{f"test_{k}": v for k, v in r.metrics.items()},
        }
        for r in result.history
    ]
    for name, objective in custom_objectives().items():
        value = objective.fn({"metrics": dict(metrics), "rounds": rounds_rows, "attacks": records})
        metrics[name] = None if value is None else float(value)
    return TrialOutcome(metrics, rounds_rows, records, images, str(dev))
