"""Calibration table of gradient-inversion attacks on CNN clients with BatchNorm in train mode.

What it measures: for each dataset (RetinaMNIST and PneumoniaMNIST test images resized 28 -> 32
px bilinear, chosen by ``--seed``; scikit-image photographs at 32 px with fixed random labels
over 10 classes), model (Inverting Gradients' ConvNet at width 16 and 32, ResNet-18 with its
small-image stem, all with BatchNorm), model state (seeded initialisation, or after 5 FedAvg
rounds on a 400-image subset of the training split: 4 clients, 1 local epoch at batch 32, lr
0.05 -- ``TRAINING``, ``--train lr=0.1`` overrides; cached under ``--cache``; the time it took
and the test accuracy are printed), batch size and method, the victim's client step is
observed in train mode (the FedSGD gradient, or ``--algorithm fedavg``: the weights after
``--local-steps`` SGD steps) with the input normalised by the training split's per-channel
mean/std (photos: their own), each method reconstructs it, and the canonical metric protocol
(``attacks.scoring.metrics.score``) scores it. Per row: the mean over ``--images`` victims (batch B:
that many batches of B different images) of PSNR, PSNR gain over the flat image at the
normalisation mean, PSNR gain over the population's mean image ("over mean": the per-pixel mean
of the training split, disjoint from the test-split victims; for the photographs, of the crops
that are not victims), SSIM, LPIPS, the share of victims identified (the victim is the nearest
of the batch and the reference pool to its reconstruction: pixel distance, then LPIPS), label
accuracy, the median seconds, and ``vs ig`` (mean PSNR minus that of the group's "ig" row, which
runs first). The "flat" row is that flat image itself (gain 0), the "mean image" row the
population's mean image (gain over mean 0): what is known without any client. A summary line
per group follows the table.

Methods are the ``METHODS`` registry below (label -> registered attack, parameters); every
method gets ``--iterations`` and, when given, ``--restarts`` (the ``*_avg`` methods average
4 restarts of their own and run only when named); ``--param ig.tv=0.1`` overrides one parameter
(value parsed as JSON or a Python literal). The attacker knows the BatchNorm statistics (the
returned buffers) and, with ``--labels known``, the labels.

Attacks on public data (named only: ``learned``, ``feature`` and their ``*_prior`` ablations and
``*_static`` non-adaptive variants, ``ig_learned``, ``ig_bn_feat_learned``, ``gias``): the attacker
holds ``--public`` training images (default 4,000; at most all but 400, which stay the reference:
mean image and identification pool), disjoint from the test-split victims, and neither labels nor
BatchNorm statistics reach the learned inverters. Each row trains one inverter at the group's
weights, shared by its victims (its time is in the first victim's seconds); a line per group gives
each learned attack's PSNR over its prior-only ablation. ``--defense NAME`` (``--defense-param
KEY=VALUE``) applies a defense to the victims' steps; the adaptive attacks simulate it on their
public batches, the ``*_static`` ones do not.

    python benchmarks/cnn_attacks.py [--datasets retinamnist pneumoniamnist photos]
        [--models convnet16 convnet32 resnet18] [--states untrained fedavg5] [--batches 1 4]
        [--methods ig ig_bn ig_bn_project ig_bn_feat ig_feat stg ig_bn_avg ...]
        [--param ig_bn.bn_prior=0.1] [--iterations 1500] [--restarts N] [--images 4]
        [--labels known|infer] [--public 4000] [--defense NAME] [--defense-param KEY=VALUE]
        [--algorithm fedsgd|fedavg] [--lr 0.01] [--local-steps 1] [--train KEY=VALUE] [--seed 0]
        [--data-root ../shared/data] [--cache ~/.cache/obscura/cnn_attacks]
        [--json results.jsonl] [--grid FOLDER] [--threads N] [--device auto]
    python benchmarks/cnn_attacks.py --datasets photos --models convnet16 --states untrained \\
        --batches 1 --iterations 200 --images 2 --threads 1        # a quick look

``--json PATH`` appends one JSON object per line (JSON Lines) after every victim, so a killed run
keeps what it measured. ``--grid FOLDER`` saves one PNG per method row: the victims' true
images above their reconstructions (assignment order), each with its PSNR. LPIPS uses
OBSCURA_LPIPS_BACKBONE, or ../shared/weights/lpips_alexnet_features.pth when present. Run on an
idle machine.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _isolate  # noqa: F401  (first: keeps the attacks package importable)
import torch

from attacks import (
    AttackConfigError,
    AttackerCapabilities,
    AttackerResources,
    PublicData,
    get_attack,
)
from attacks.scoring.metrics import Score, flat_value, score, score_images
from attacks.scoring.plots import save_pair_grid
from attacks.scoring.population import Reference
from defenses import get_defense
from fl import data, models
from fl.simulation import (
    FederationConfig,
    PartitionConfig,
    Simulator,
    evaluate,
    observe_client_step,
    resolve_device,
)
from fl.simulation.observation import GroundTruth, Observation
from tests._support.samples import sample_images

SIZE = 32
MIN_REFERENCE = 400  # training images kept for the reference when the attacker takes public ones
PHOTO_CLASSES = 10
PHOTO_POOL = 30  # every photograph crop tests._support.samples has

#: Method label -> (registered attack, parameters over its defaults).
_IG = {"tv": 0.2}
_IG_BN_PROJECT = {**_IG, "bn_prior": 0.3, "init": "mean", "bn_project": True}
_IG_BN_FEAT = {**_IG_BN_PROJECT, "feature_prior": 1.0}
_AVERAGE_4 = {"restarts": 4, "restart_average": True, "init_noise": 0.25}
_FEATURE_START = {"encoding": "classifier_input"}
METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "ig": ("inverting_gradients", _IG),
    "ig_bn": ("inverting_gradients", {**_IG, "bn_prior": 0.3, "init": "mean"}),
    "ig_bn_project": ("inverting_gradients", _IG_BN_PROJECT),
    "ig_bn_avg": ("inverting_gradients", {**_IG_BN_PROJECT, **_AVERAGE_4}),
    "ig_avg": ("inverting_gradients", {**_IG, **_AVERAGE_4, "init_noise": 0.0}),
    "ig_feat": ("inverting_gradients", {**_IG, "feature_prior": 1.0}),
    "ig_bn_feat": ("inverting_gradients", _IG_BN_FEAT),
    "ig_bn_feat_avg": ("inverting_gradients", {**_IG_BN_FEAT, **_AVERAGE_4}),
    "stg": ("see_through_gradients", {}),
    "stg_project": ("see_through_gradients", {"bn_project": True, "init": "mean"}),
    # attacks on public data (--public): learned inversion (Wu et al. 2023), the feature
    # decoder, each with its prior-only ablation and without the defense ("static"), and
    # Inverting Gradients started from the feature decoder's reconstruction
    "learned": ("learned_inversion", {}),
    "learned_prior": ("learned_inversion", {"ablation": "prior_only"}),
    "learned_static": ("learned_inversion", {"adaptive": False}),
    "feature": ("feature_inversion", {}),
    "feature_prior": ("feature_inversion", {"ablation": "prior_only"}),
    "feature_static": ("feature_inversion", {"adaptive": False}),
    "ig_learned": ("inverting_gradients", {**_IG, "init": "learned", "learned": _FEATURE_START}),
    "ig_bn_feat_learned": (
        "inverting_gradients",
        {**_IG_BN_FEAT, "init": "learned", "learned": _FEATURE_START},
    ),
    # GIAS (Jeon et al. 2021) with a DCGAN trained on the public images: latent search from
    # 2 random codes (--param gias.iterations=500: the paper's), then 1,000 fine-tuning steps
    "gias": ("gias", {"latent_restarts": 2, "finetune_iterations": 1000}),
}

AVERAGED = tuple(m for m, (_, params) in METHODS.items() if params.get("restart_average"))
"""Methods that average four restarts (four times the work): run only when named."""
ON_PUBLIC_DATA = tuple(
    m
    for m, (attack, params) in METHODS.items()
    if get_attack(attack, **params).requirements().public_data
)
"""Methods that train on public data (minutes each on a CPU): run only when named."""
#: Model label -> (registered model, options); every one has BatchNorm.
MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "convnet16": ("convnet", {"width": 16, "norm": "batch"}),
    "convnet32": ("convnet", {"width": 32, "norm": "batch"}),
    "resnet18": ("resnet18", {"small_stem": True, "norm": "batch"}),
}

#: Dataset label -> registered MedMNIST dataset, or None for the scikit-image photographs.
DATASETS: dict[str, str | None] = {
    "retinamnist": "retinamnist",
    "pneumoniamnist": "pneumoniamnist",
    "photos": None,
}

#: The FedAvg training of the "fedavg5" state (CPU-cheap; part of the cache key).
TRAINING: dict[str, Any] = {
    "rounds": 5,
    "clients": 4,
    "subset": 400,
    "local_epochs": 1,
    "batch_size": 32,
    "lr": 0.05,
}
STATES = ("untrained", "fedavg5")


@dataclass
class Source:
    """One dataset's victim pool: images in [0, 1] in the order victims take them, labels,
    the normalisation statistics and, for MedMNIST, the training split."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: data.ImageData | None = None
    test: data.ImageData | None = None
    indices: list[int] = field(default_factory=list)
    reference: Reference | None = None
    public: PublicData | None = None

    @property
    def channels(self) -> int:
        """Image channels (1 for PneumoniaMNIST, 3 otherwise)."""
        return int(self.images.shape[1])

    def victim(self, i: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Victim ``i`` at batch size ``batch``: images, labels and their pool indices."""
        sl = slice(i * batch, (i + 1) * batch)
        return self.images[sl], self.labels[sl], self.indices[sl]


def split_train(
    train: data.ImageData, public: int, seed: int, name: str
) -> tuple[PublicData | None, Reference]:
    """The attacker's ``public`` training images (at most all but ``MIN_REFERENCE``, chosen
    by ``seed``) and the reference of the rest; without public images the whole split."""
    if public <= 0:
        return None, Reference.from_images(train.images, seed=seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    count = min(public, len(train) - MIN_REFERENCE)
    chosen, rest = order[:count], order[count:]
    held = PublicData.from_tensors(
        train.float_images(chosen), train.labels[chosen], f"{count} {name} train images"
    )
    return held, Reference.from_images(train.images[rest], seed=seed)


def load_source(name: str, root: Path, count: int, seed: int, public: int = 0) -> Source:
    """``count`` victim images of dataset ``name`` chosen by ``seed`` (see the module docstring);
    ``public`` training images for the attacker (MedMNIST only), the reference from the rest.

    Raises:
        ValueError: more photographs asked for than exist.
    """
    g = torch.Generator().manual_seed(seed)
    registered = DATASETS[name]
    if registered is None:
        if count > PHOTO_POOL:
            raise ValueError(f"photos: {count} images asked for, only {PHOTO_POOL} exist")
        pool = sample_images(SIZE, PHOTO_POOL)
        labels = torch.randint(0, PHOTO_CLASSES, (PHOTO_POOL,), generator=g)
        idx = torch.randperm(PHOTO_POOL, generator=g)[:count]
        mean = tuple(float(v) for v in pool.mean(dim=(0, 2, 3)))
        std = tuple(float(v) for v in pool.std(dim=(0, 2, 3)))
        others = torch.ones(PHOTO_POOL, dtype=torch.bool)
        others[idx] = False
        reference = Reference.from_images(pool[others]) if others.any() else None
        return Source(
            name,
            pool[idx],
            labels[idx],
            PHOTO_CLASSES,
            mean,
            std,
            None,
            None,
            idx.tolist(),
            reference,
        )
    train = data.load(registered, root=root, split="train", image_size=SIZE)
    test = data.load(registered, root=root, split="test", image_size=SIZE)
    idx = torch.randperm(len(test), generator=g)[:count]
    held, reference = split_train(train, public, seed, name)
    return Source(
        name,
        test.float_images(idx),
        test.labels[idx].long(),
        train.info.num_classes,
        tuple(train.mean),
        tuple(train.std),
        train,
        test,
        idx.tolist(),
        reference,
        held,
    )


def build_model(label: str, source: Source, seed: int) -> torch.nn.Module:
    """Model ``label`` for ``source``'s images, initialised from ``seed``."""
    arch, opts = MODELS[label]
    torch.manual_seed(seed)
    return models.build(
        arch, channels=source.channels, classes=source.classes, image_size=SIZE, **opts
    )


def trained_model(label: str, source: Source, bench: Bench) -> torch.nn.Module:
    """Model ``label`` after the FedAvg run ``bench.training`` on ``source``'s training split,
    from ``--cache`` when an earlier run stored it (keyed by model, dataset, seed, training)."""
    assert source.train is not None and source.test is not None
    seed, training = bench.args.seed, bench.training
    model = build_model(label, source, seed)
    key = "-".join(f"{k}{v}" for k, v in training.items())
    path = bench.args.cache / f"{label}_{source.name}_seed{seed}_{key}.pt"
    if path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(stored["state"])
        how = f"trained in {stored['seconds']:.1f} s by an earlier run, from {path}"
    else:
        g = torch.Generator().manual_seed(seed)
        subset = source.train.subset(
            torch.randperm(len(source.train), generator=g)[: training["subset"]]
        )
        cfg = FederationConfig(
            algorithm="fedavg",
            clients_per_round=training["clients"],
            partition=PartitionConfig(scheme="iid"),
            **{k: v for k, v in training.items() if k != "subset"},
        )
        t0 = time.perf_counter()
        model = Simulator(model, subset, cfg, device=bench.device, seed=seed).run().model
        stored = {"seconds": time.perf_counter() - t0}
        stored["accuracy"] = evaluate(
            model,
            source.test.float_images(),
            source.test.labels,
            mean=source.mean,
            std=source.std,
            num_classes=source.classes,
        )["accuracy"]
        bench.args.cache.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({**stored, "state": state}, path)
        how = f"trained in {stored['seconds']:.1f} s, cached at {path}"
    print(
        f"{label} on {source.name}: {training['rounds']} FedAvg rounds ({key}), test accuracy "
        f"{stored['accuracy']:.3f}; {how}",
        flush=True,
    )
    bench.writer.write(
        {"kind": "training", "model": label, "dataset": source.name, "key": key, "seed": seed}
        | {"seconds": stored["seconds"], "accuracy": stored["accuracy"], "cache": str(path)}
    )
    return model.to(bench.device)


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, object]]:
    """``method.key=value`` strings -> {method: {key: value}}; value as JSON or a Python literal.

    Raises:
        ValueError: malformed item or unknown method.

    Example:
        >>> parse_overrides(["ig.tv=0.1", "stg.objective=cosine"])
        {'ig': {'tv': 0.1}, 'stg': {'objective': 'cosine'}}
    """
    out: dict[str, dict[str, object]] = {}
    for item in items:
        target, sep, raw = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not key:
            raise ValueError(f"--param {item!r}: expected method.key=value")
        if method not in METHODS:
            raise ValueError(f"--param {item!r}: unknown method {method!r}; known: {list(METHODS)}")
        out.setdefault(method, {})[key] = _literal(raw)
    return out


def parse_training(items: Sequence[str]) -> dict[str, Any]:
    """``TRAINING`` with ``key=value`` overrides (not ``rounds``: the state is "fedavg5").

    Raises:
        ValueError: malformed item, unknown key, or a value that is not a positive number.

    Example:
        >>> parse_training(["lr=0.1"])["lr"], parse_training([])["subset"]
        (0.1, 400)
    """
    out = dict(TRAINING)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or key not in TRAINING or key == "rounds":
            known = [k for k in TRAINING if k != "rounds"]
            raise ValueError(f"--train {item!r}: expected KEY=VALUE with KEY one of {known}")
        value = _literal(raw)
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"--train {item!r}: the value must be a positive number")
        out[key] = value
    return out


def _literal(raw: str) -> object:
    """``raw`` as JSON, else as a Python literal, else the string itself (e.g. ``cosine``)."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


@dataclass(frozen=True)
class Group:
    """One (dataset, model, state, batch) cell of the table."""

    dataset: str
    model: str
    state: str
    batch: int

    def cells(self) -> str:
        """The group's leading table cells."""
        return f"| {self.dataset} | {self.model} | {self.state} | {self.batch} "


class Writer:
    """JSON Lines output, appended and flushed after every record (``--json``), or nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line."""
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")


HEADER = (
    "| dataset | model | state | B | method | PSNR dB | gain dB | over mean dB | SSIM | LPIPS "
    "| identified | id LPIPS | label acc | seconds | vs ig dB |"
)


def _fmt(value: float | None, digits: int) -> str:
    """A table number (no "-0.00"), or n/a."""
    return "n/a" if value is None else f"{round(value, digits) + 0.0:.{digits}f}"


def _signed(value: float) -> str:
    """A signed dB difference (no "-0.00")."""
    return f"{round(value, 2) + 0.0:+.2f}"


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values, None when any is None (e.g. LPIPS unavailable)."""
    return None if not values or any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]


def _identified(rows: list[dict[str, Any]], key: str) -> str:
    """``k/n``: how many of the rows' images were identified (rank 1 by ``key``), or n/a."""
    ranks = [i[key] for r in rows for i in r["per_image"]]
    if not ranks or any(v is None for v in ranks):
        return "n/a"
    return f"{sum(v == 1 for v in ranks)}/{len(ranks)}"


def _training_note(rows: list[dict[str, Any]]) -> str:
    """`` inverter trained in N s`` for rows of a learned attack (the first victim's seconds
    hold the training; the table's seconds are the median), else nothing."""
    trained = sum(float((r.get("extras") or {}).get("inverter_seconds", 0.0)) for r in rows)
    return f" inverter trained in {trained:.0f} s" if trained > 0 else ""


def print_row(group: Group, method: str, rows: list[dict[str, Any]], ig: float | None) -> float:
    """Print one table row averaged over the victims' records; return its mean PSNR."""
    psnr = statistics.fmean(r["psnr_mean"] for r in rows)
    vs = "" if ig is None or method == "ig" else _signed(psnr - ig)
    print(
        group.cells()
        + f"| {method} | {psnr:.2f} | {_fmt(_mean([r['psnr_gain_mean'] for r in rows]), 2)} "
        f"| {_fmt(_mean([r['prior_gain_mean'] for r in rows]), 2)} "
        f"| {_fmt(_mean([r['ssim_mean'] for r in rows]), 3)} "
        f"| {_fmt(_mean([r['lpips_mean'] for r in rows]), 3)} "
        f"| {_identified(rows, 'id_rank')} | {_identified(rows, 'id_rank_lpips')} "
        f"| {_fmt(_mean([r['label_accuracy'] for r in rows]), 2)} "
        f"| {statistics.median(r['seconds'] for r in rows):.1f} | {vs} |"
        + (" diverged" if any(r.get("diverged") for r in rows) else "")
        + _training_note(rows),
        flush=True,
    )
    return psnr


def method_params(
    method: str, args: argparse.Namespace, overrides: dict[str, dict[str, object]]
) -> tuple[str, dict[str, object]]:
    """Registered attack and parameters of ``method``: the ``METHODS`` entry, then
    ``--iterations``, ``--restarts`` (when given: otherwise the entry's own, default 1) and
    seed 0, then the ``--param`` overrides."""
    attack, base = METHODS[method]
    merged = {**base, "iterations": args.iterations, "seed": 0}
    if args.restarts is not None:
        merged["restarts"] = args.restarts
    return attack, {**merged, **overrides.get(method, {})}


@dataclass
class Bench:
    """What every measurement of one run shares: the options, where results go, LPIPS."""

    args: argparse.Namespace
    device: torch.device
    writer: Writer
    lpips_backbone: str | None
    overrides: dict[str, dict[str, object]]
    training: dict[str, Any]

    @property
    def capabilities(self) -> AttackerCapabilities:
        """The attacker: BatchNorm statistics known, labels as ``--labels`` says."""
        return AttackerCapabilities(knows_labels=self.args.labels == "known", knows_bn_stats=True)

    def params(self, method: str) -> tuple[str, dict[str, object]]:
        """Registered attack and parameters of ``method`` (registry, options, overrides)."""
        return method_params(method, self.args, self.overrides)

    def observe(
        self, model: torch.nn.Module, source: Source, group: Group
    ) -> list[tuple[Observation, GroundTruth, list[int]]]:
        """The client steps of the group's ``--images`` victims."""
        out = []
        for i in range(self.args.images):
            x, y, idx = source.victim(i, group.batch)
            obs, truth = observe_client_step(
                model,
                x.to(self.device),
                y.to(self.device),
                algorithm=self.args.algorithm,
                lr=self.args.lr,
                local_steps=self.args.local_steps,
                mean=source.mean,
                std=source.std,
                reveal_labels=self.args.labels == "known",
                seed=i,
                hooks=self.defense(),
            )
            out.append((obs, truth, idx))
        return out

    def defense(self) -> Any:
        """A fresh instance of ``--defense`` with its ``--defense-param`` values."""
        return get_defense(self.args.defense, **self.args.defense_params)

    def resources(self, source: Source) -> AttackerResources:
        """The attacker's public images and the defense's algorithm (a factory of fresh
        instances: the attacker's own private state)."""
        return AttackerResources(
            public=source.public, defense=self.defense, defense_name=self.args.defense
        )

    def record(self, group: Group, method: str, victim: int, idx: list[int], s: dict) -> dict:
        """A per-victim record: the group, the method and its scores; written to ``--json``."""
        row = {
            **group.__dict__,
            "kind": "victim",
            "method": method,
            "victim": victim,
            "indices": idx,
            "algorithm": self.args.algorithm,
            "labels": self.args.labels,
            **s,
        }
        self.writer.write(row)
        return row


def baseline_rows(
    bench: Bench, group: Group, victims: list, source: Source, kind: str
) -> list[dict[str, Any]]:
    """Scores of a guess that needs no client, one record per victim: ``kind`` "flat" (the flat
    image at the normalisation mean) or "mean image" (the reference's per-pixel mean)."""
    rows = []
    value = flat_value(source.mean, source.std)
    for i, (_, truth, idx) in enumerate(victims):
        if kind == "flat":
            image = torch.tensor(value).view(1, -1, 1, 1)
        else:
            assert source.reference is not None
            image = source.reference.mean_image.unsqueeze(0)
        guess = image.to(truth.images).expand_as(truth.images).clone()
        s = score_images(
            guess,
            truth.images,
            flat=value,
            device=bench.device,
            lpips_backbone=bench.lpips_backbone,
            reference=source.reference,
        )
        rows.append(bench.record(group, kind, i, idx, _keep(s, label_accuracy=None, seconds=0.0)))
    return rows


def method_rows(
    bench: Bench, group: Group, method: str, victims: list, source: Source
) -> list[dict[str, Any]]:
    """Run ``method`` on every victim of the group and score it, one record per victim (and,
    with ``--grid``, one picture of the group's truths above their reconstructions)."""
    attack_name, params = bench.params(method)
    rows = []
    shown: list[tuple[torch.Tensor, torch.Tensor, list[float]]] = []
    attack = get_attack(attack_name, **params)  # one per row: a learned inverter is shared
    if attack.requirements().public_data and source.public is None:
        print(f"{group.cells()}| {method} | skipped: no public images (--public) |", flush=True)
        return []
    resources = bench.resources(source)
    for i, (obs, truth, idx) in enumerate(victims):
        rec = attack.run(obs, bench.capabilities, resources)
        s = score(
            rec,
            truth,
            device=bench.device,
            lpips_backbone=bench.lpips_backbone,
            reference=source.reference,
        )
        order = torch.as_tensor(s["assignment"], dtype=torch.long)
        shown.append((truth.images, rec.images[order], [r["psnr"] for r in s["per_image"]]))
        extra = {
            "attack": attack_name,
            "params": params,
            "seconds": rec.seconds,
            "iterations": rec.iterations,
            "loss": rec.loss,
            "diverged": rec.diverged,
            "label_source": rec.label_source,
            "defense": bench.args.defense,
            "public": None if source.public is None else len(source.public),
            "extras": rec.extras,
        }
        rows.append(bench.record(group, method, i, idx, _keep(s, **extra)))
    if bench.args.grid is not None:
        save_grid(bench.args.grid, group, method, shown)
    return rows


def save_grid(
    folder: Path, group: Group, method: str, shown: list[tuple[torch.Tensor, torch.Tensor, list]]
) -> Path:
    """``folder/<dataset>_<model>_<state>_b<B>_<method>.png``: every victim's images (truth
    above reconstruction, in the scoring's assignment order) with their PSNR."""
    name = f"{group.dataset}_{group.model}_{group.state}_b{group.batch}_{method}"
    truths = torch.cat([t.cpu() for t, _, _ in shown])
    recs = torch.cat([r.cpu() for _, r, _ in shown])
    values = [v for _, _, vs in shown for v in vs]
    title = f"{method}: {group.dataset}, {group.model}, {group.state}, batch {group.batch}"
    path = save_pair_grid(truths, recs, folder / f"{name}.png", psnr=values, title=title)
    print(f"grid: {path}", flush=True)
    return path


def _keep(s: Score, **extra: Any) -> dict[str, Any]:
    """The score as a plain record worth storing (without the assignment bookkeeping), with
    ``extra`` entries."""
    drop = ("assignment", "assignment_cost", "per_image")
    out = {k: v for k, v in s.items() if k not in drop}
    return {**out, "per_image": [dict(i) for i in s.per_image], **extra}


def run_group(
    bench: Bench, group: Group, model: torch.nn.Module, source: Source
) -> dict[str, float]:
    """Print the group's flat row and one row per method; return PSNR gains over "ig"."""
    victims = bench.observe(model, source, group)
    for kind in ("flat", "mean image") if source.reference is not None else ("flat",):
        print_row(group, kind, baseline_rows(bench, group, victims, source, kind), None)
    order = sorted(bench.args.methods, key=lambda m: m != "ig")  # "ig" first: others vs it
    ig: float | None = None
    psnr: dict[str, float] = {}
    for method in order:
        rows = method_rows(bench, group, method, victims, source)
        if not rows:
            continue
        psnr[method] = print_row(group, method, rows, ig)
        if method == "ig":
            ig = psnr[method]
    for method, ablation in (("learned", "learned_prior"), ("feature", "feature_prior")):
        if method in psnr and ablation in psnr:
            print(
                f"{group.cells()}| {method} over its prior-only ablation: "
                f"{_signed(psnr[method] - psnr[ablation])} dB PSNR |",
                flush=True,
            )
    return {m: v - ig for m, v in psnr.items() if ig is not None and m != "ig"}


def run_all(bench: Bench) -> list[tuple[Group, dict[str, float]]]:
    """Every (dataset, model, state, batch) group in turn; returns each group's gains."""
    a = bench.args
    summaries = []
    for dataset in a.datasets:
        source = load_source(dataset, a.data_root, a.images * max(a.batches), a.seed, a.public)
        for label in a.models:
            for state in a.states:
                if state == "fedavg5" and source.train is None:
                    print(f"{dataset}: no training split, state {state} skipped", flush=True)
                    continue
                model = STATE_BUILDERS[state](label, source, bench)
                for batch in a.batches:
                    group = Group(dataset, label, state, batch)
                    summaries.append((group, run_group(bench, group, model, source)))
    return summaries


STATE_BUILDERS: dict[str, Callable[[str, Source, Bench], torch.nn.Module]] = {
    "untrained": lambda label, source, bench: build_model(label, source, bench.args.seed).to(
        bench.device
    ),
    "fedavg5": trained_model,
}
"""State -> (model label, source, bench) -> the victims' global model."""


def lpips_backbone() -> str | None:
    """OBSCURA_LPIPS_BACKBONE, else ../shared/weights/lpips_alexnet_features.pth when present."""
    if os.environ.get("OBSCURA_LPIPS_BACKBONE"):
        return os.environ["OBSCURA_LPIPS_BACKBONE"]
    shared = (
        Path(__file__).resolve().parents[1].parent / "shared/weights/lpips_alexnet_features.pth"
    )
    return str(shared) if shared.exists() else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path, default=root, help="MedMNIST .npz folder")
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--states", nargs="+", choices=STATES, default=list(STATES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=[m for m in METHODS if m not in AVERAGED + ON_PUBLIC_DATA],
        help="default: all but the four-restart methods "
        + ", ".join(AVERAGED)
        + " and those on public data "
        + ", ".join(ON_PUBLIC_DATA),
    )
    p.add_argument(
        "--public",
        type=int,
        default=None,
        help="training images the attacker holds (at most all but "
        f"{MIN_REFERENCE}, the reference being the rest; default 4000 when a method on public "
        "data runs, else 0)",
    )
    p.add_argument("--defense", default="none", help="the victims' defense (at its defaults)")
    p.add_argument(
        "--defense-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter of --defense",
    )
    p.add_argument(
        "--param", action="append", default=[], metavar="METHOD.KEY=VALUE", help="override"
    )
    p.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override the fedavg5 training ({', '.join(k for k in TRAINING if k != 'rounds')})",
    )
    p.add_argument("--iterations", type=int, default=1500, help="every method's iterations")
    p.add_argument(
        "--restarts", type=int, default=None, help="restarts of every method (default: its own)"
    )
    p.add_argument("--images", type=int, default=4, help="victims per row")
    p.add_argument("--labels", choices=["known", "infer"], default="known")
    p.add_argument("--algorithm", choices=["fedsgd", "fedavg"], default="fedsgd")
    p.add_argument("--lr", type=float, default=0.01, help="FedAvg client learning rate")
    p.add_argument("--local-steps", type=int, default=1, help="FedAvg client steps")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and victim choice")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "obscura" / "cnn_attacks",
        help="folder of the trained states",
    )
    p.add_argument("--json", type=Path, default=None, help="JSON Lines of per-victim numbers")
    p.add_argument(
        "--grid", type=Path, default=None, help="folder for one PNG per row: truth over recon"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    for name in ("iterations", "restarts", "images", "local_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.batches) < 1:
        p.error("--batches must be at least 1")
    if "photos" in args.datasets and args.images * max(args.batches) > PHOTO_POOL:
        p.error(f"photos: --images x the largest of --batches must be at most {PHOTO_POOL}")
    if args.public is None:
        args.public = 4000 if set(args.methods) & set(ON_PUBLIC_DATA) else 0
    try:
        args.defense_params = {
            k: _literal(v) for k, _, v in (item.partition("=") for item in args.defense_param)
        }
        get_defense(args.defense, **args.defense_params)
        args.overrides = parse_overrides(args.param)
        args.training = parse_training(args.train)
        for method in args.methods:  # a bad parameter fails now, not after hours of training
            name, params = method_params(method, args, args.overrides)
            get_attack(name, **params)
    except (ValueError, AttackConfigError) as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the table (see the module docstring); returns the exit status."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, writer = resolve_device(args.device), Writer(args.json)
    bench = Bench(args, device, writer, lpips_backbone(), args.overrides, args.training)
    bench.writer.write({"kind": "run", "argv": sys.argv[1:] if argv is None else argv})
    print(
        f"device={bench.device} threads={torch.get_num_threads()} {SIZE} px, "
        f"{args.algorithm}, labels {args.labels}, {args.iterations} iterations, "
        f"defense {args.defense} {args.defense_params or ''}, public images {args.public}, "
        f"restarts {args.restarts or 'per method'}, {args.images} victims per row, "
        f"LPIPS backbone {bench.lpips_backbone or 'none (LPIPS n/a)'}"
    )
    print(HEADER)
    print("|" + "|".join("---" for _ in HEADER.split("|")[1:-1]) + "|", flush=True)
    t0 = time.perf_counter()
    summaries = run_all(bench)
    print()
    for group, gains in summaries:
        alone = "(no other method)" if "ig" in args.methods else "(no ig row)"
        text = ", ".join(f"{m} {_signed(g)} dB" for m, g in gains.items()) or alone
        print(f"- {group.dataset} {group.model} {group.state} B={group.batch}: vs ig: {text}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
