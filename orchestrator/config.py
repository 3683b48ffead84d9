"""The study file: typed, validated configuration of a privacy–utility study.

A study file is YAML read with ``yaml.safe_load`` and validated by :class:`StudyConfig`. Every
error names the field path, what was expected and what was found (:class:`StudyFileError`);
unknown dataset, model, defense, attack or metric names list the known ones. A hyperparameter
value is either a constant or a search range ``{type: float|int|categorical, low, high, log,
choices}``.
"""

from __future__ import annotations

import importlib
import re
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attacks import AttackerCapabilities, PublicDataSpec, attack_class, available_attacks
from attacks.inverting_gradients import BATCH_VICTIMS_DESCRIPTION, BatchVictims
from attacks.public import same_dataset
from defenses import Defense, ParamSpec, available_defenses, defense_class
from fl import data as fl_data
from fl import models as fl_models
from fl.simulation import FederationConfig
from fl.simulation.observation import MESSAGE_KIND
from orchestrator.metrics import known_metrics, validate_metric


class StudyFileError(ValueError):
    """A study file is unreadable or invalid; the message names the file and the field."""


MAX_MODEL_PARAMETERS = 1_000_000_000
"""Largest model a study may build (weights counted on the meta device at validation)."""
MAX_TRIALS = 100_000
"""Most trials (``search.trials``) one study may ask for."""
MAX_CONCURRENCY = 10_000
"""Most trials at once (``search.concurrency``)."""
MAX_ITERATIONS = 1_000_000
"""Most optimiser iterations per restart of an attack (``attacks[].params.iterations``)."""
MAX_RESTARTS = 1000
"""Most restarts of an attack (``attacks[].params.restarts``)."""
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""``yaml.safe_load``'s loader, in C where PyYAML has libyaml (the same types, 8x faster)."""
SEED_LIMIT = 2**32
"""Seeds lie in ``[0, SEED_LIMIT)`` (NumPy's and Optuna's generators take them)."""
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
"""Study names and attack labels: they become parts of file names (no ``/``, ``\\``, ``..``)."""
MODULE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
"""A plugin: an absolute, dotted Python module name."""


def _strict() -> ConfigDict:
    """Unknown keys rejected and NaN/infinity refused in every float field."""
    return ConfigDict(extra="forbid", allow_inf_nan=False)


class DataSection(BaseModel):
    """Which dataset, where its files are, and the image size."""

    model_config = _strict()

    dataset: str = Field(
        description="A registered dataset (python -m orchestrator list), or 'folder' for your "
        "own images."
    )
    root: Path = Field(
        Path("~/.cache/obscura/data"),
        description="Where the dataset files are (or go, with download); made absolute.",
    )
    download: bool = Field(
        False, description="Download missing files from the official source (checksum verified)."
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=512,
        description="Resize the images to this side length at load time (default: native size).",
    )

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        known = fl_data.available()
        if value.lower() not in known:
            raise ValueError(f"unknown dataset {value!r}; known datasets: {', '.join(known)}")
        return value.lower()

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value: Path) -> Path:
        return value.expanduser().resolve()


class ModelSection(BaseModel):
    """The model architecture; any further key is a model option (e.g. ``width``)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    name: str = Field(
        description="A registered model; every other key of the section is one of its options "
        "(width, norm, hidden, ...). It is built on PyTorch's meta device at validation (no "
        f"memory): a bad option or more than {MAX_MODEL_PARAMETERS:.0e} parameters is refused."
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        known = fl_models.available()
        if value not in known:
            raise ValueError(f"unknown model {value!r}; known models: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _known_model(self) -> ModelSection:
        accepted = fl_models.options(self.name)
        bad = [k for k in self.options() if k not in accepted]
        if bad:
            raise ValueError(
                f"model {self.name!r} has no option {', '.join(map(repr, bad))}; "
                f"options: {', '.join(accepted) or '(none)'}"
            )
        return self

    def options(self) -> dict[str, Any]:
        """The model options (every key except ``name``)."""
        return dict(self.model_extra or {})


ParamValue = Any


class AttackSection(BaseModel):
    """One attack of the study: which rounds and how many victims it attacks, with what."""

    model_config = _strict()

    name: str = Field(description="A registered attack (python -m orchestrator list).")
    label: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Name used in metric names and image file names (default: name): letters, "
        "digits, '_', '-', '.', no '..'.",
    )
    rounds: list[int] = Field(
        default_factory=lambda: [0],
        description="0-based rounds whose captured client messages are attacked (each below "
        "federation.rounds).",
    )
    victims: int = Field(
        1,
        ge=1,
        description="Clients attacked in each of those rounds, the first in sampling order (at "
        "most federation.clients_per_round).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description=f"The attack's parameters (python -m orchestrator list); iterations at "
        f"most {MAX_ITERATIONS}, restarts at most {MAX_RESTARTS}; no seed (the study's).",
    )
    capabilities: AttackerCapabilities = Field(
        default_factory=AttackerCapabilities,
        description="What the attacker is granted beyond the observation (labels, learning "
        "rate, local steps, batch size, the returned BatchNorm buffers).",
    )
    batch_victims: BatchVictims = Field("off", description=BATCH_VICTIMS_DESCRIPTION)

    @field_validator("name")
    @classmethod
    def _known_attack(cls, value: str) -> str:
        if value not in available_attacks():
            raise ValueError(
                f"unknown attack {value!r}; known attacks: {', '.join(available_attacks())}"
            )
        return value

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("an attack needs at least one round")
        if any(r < 0 for r in value):
            raise ValueError("rounds are 0-based and cannot be negative")
        return sorted(set(value))

    @model_validator(mode="after")
    def _params(self) -> AttackSection:
        if ".." in self.key or not re.match(NAME_PATTERN, self.key):
            what = "label" if self.label else "name (give the attack a `label`)"
            raise ValueError(
                f"{self.key!r} cannot name files: the attack's {what} must match "
                f"{NAME_PATTERN} without '..'"
            )
        if "seed" in self.params:
            raise ValueError(
                "params.seed: an attack's seed is the study's `seed`; remove it from params"
            )
        attack = attack_class(self.name)(**self.params)  # AttackConfigError names the field
        for key, most in (("iterations", MAX_ITERATIONS), ("restarts", MAX_RESTARTS)):
            value = getattr(attack.params, key)
            if value > most:
                raise ValueError(f"params.{key}: at most {most} (found {value})")
        if attack.requirements().bn_stats and not self.capabilities.knows_bn_stats:
            raise ValueError(
                f"attack {self.name!r} (so configured) matches the BatchNorm statistics the "
                "client's returned buffers reveal; grant them with capabilities: "
                "{knows_bn_stats: true}, or drop its BatchNorm prior"
            )
        public = self.capabilities.public_data
        if attack.requirements().public_data and public is None:
            raise ValueError(
                f"attack {self.name!r} (so configured) trains on public images of the clients' "
                "kind; grant them with capabilities: {public_data: {split: test, count: 1000}}"
            )
        if (
            public is not None
            and public.dataset is not None
            and public.dataset not in fl_data.available()
        ):
            raise ValueError(
                f"capabilities.public_data.dataset: unknown dataset {public.dataset!r}; "
                f"known: {', '.join(fl_data.available())}"
            )
        return self

    @property
    def key(self) -> str:
        """The attack's name in metric names and tables."""
        return self.label or self.name


class ObjectiveSection(BaseModel):
    """One objective of the multi-objective search."""

    model_config = _strict()

    metric: str = Field(
        description="A trial metric (e.g. test_accuracy, attack_prior_gain_max) or a custom "
        "objective's name."
    )
    mode: Literal["min", "max"] = Field(description="Minimise or maximise it.")


class SearchSection(BaseModel):
    """How Optuna explores the space."""

    model_config = _strict()

    sampler: Literal["nsga2", "tpe", "gp", "random"] = Field(
        "nsga2", description="Optuna's sampler, seeded with the study's seed."
    )
    trials: int = Field(8, ge=1, le=MAX_TRIALS, description=f"Trials (at most {MAX_TRIALS}).")
    concurrency: int = Field(
        1, ge=1, le=MAX_CONCURRENCY, description=f"Trials at once (at most {MAX_CONCURRENCY})."
    )
    max_failures: int = Field(
        0, ge=0, le=1000, description="Retries of a failed trial (Ray Tune; at most 1000)."
    )
    checkpoint_every: int = Field(
        1,
        ge=0,
        le=100_000,
        description="Rounds between a trial's checkpoints (0: none); a retried trial resumes "
        "from its latest one.",
    )


class ResourcesSection(BaseModel):
    """Resources each trial asks Ray for (fractional GPUs allowed)."""

    model_config = _strict()

    cpu: float = Field(1.0, gt=0, le=4096, description="CPUs per trial (at most 4096).")
    gpu: float = Field(0.0, ge=0, le=256, description="GPUs per trial (at most 256).")


class TrackingSection(BaseModel):
    """MLflow tracking and which private images may be stored there."""

    model_config = _strict()

    mlflow_uri: str = Field(
        "sqlite:///mlflow.db",
        description="Any MLflow tracking URI; relative SQLite paths are made absolute. No "
        "password in it (user:password@ is refused and never echoed): set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for an http(s) server, or the "
        "database's own mechanism (e.g. PGPASSWORD, ~/.pgpass).",
    )
    log_images: Literal["pairs", "reconstructions", "none"] = Field(
        "pairs",
        description="Images stored in MLflow and the output folder: 'pairs' (ground truth above "
        "reconstruction: clients' private training images), 'reconstructions' or 'none'. Use "
        "'reconstructions' or 'none' for real patient data.",
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _absolute_sqlite(cls, value: str) -> str:
        """Relative SQLite/file paths are made absolute: Ray changes a trial's directory. A
        password in the URI is refused: the study file, ``study.yaml`` and MLflow would keep it."""
        try:
            password = urlsplit(value).password
        except ValueError as err:
            raise ValueError(f"not a valid URI ({err})") from None
        if password is not None:
            raise ValueError(
                "the URI holds a password (user:password@); remove it and set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                "(for a database URI, its own mechanism, e.g. PGPASSWORD or ~/.pgpass)"
            )
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value.startswith(prefix + "/"):
            return prefix + str(Path(value[len(prefix) :]).expanduser().resolve())
        return value


class ValiditySection(BaseModel):
    """When the study's undefended control counts as broken, so that the front can rank
    defenses (:mod:`orchestrator.validity`)."""

    model_config = _strict()

    min_gain_db: float = Field(
        3.0,
        ge=0,
        allow_inf_nan=False,
        description="Least PSNR gain over the population mean image (dB, "
        "attack_prior_gain_max) the control's strongest attack must reach on its best image, "
        "unless it identifies min_identified of its victims; below both the study warns that its "
        "attacks are too weak.",
    )
    min_identified: float = Field(
        0.25,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="Least share of the control's attacked images (attack_identification_rate) "
        "whose victim its strongest attack picks out of the reference pool; enough on its own "
        "for the control to pass. 0.25 is 64 times the chance rate of a 256-image pool and "
        "leaves a defense room to lower it.",
    )
    min_ssim: float | None = Field(
        None,
        ge=-1,
        le=1,
        allow_inf_nan=False,
        description="Least SSIM (attack_ssim_max) the control must reach too (default: none).",
    )


def _check_public(i: int, public: PublicDataSpec, dataset: str, holdout: float) -> None:
    """Refuse public data that would be a client's: the study's own train split, or a holdout
    the partition does not keep (the trial checks the drawn images by index as well)."""
    where = f"attacks.{i}.capabilities.public_data"
    same = public.dataset is None or same_dataset(public.dataset, dataset)
    if same and public.split == "train":
        raise ValueError(
            f"{where}.split: 'train' of the study's dataset is the clients' data; use 'test', "
            "'val', or 'holdout' with federation.partition.holdout > 0"
        )
    if public.split == "holdout" and not same:
        raise ValueError(
            f"{where}.split: 'holdout' is a share of the study's own train split; for "
            f"{public.dataset!r} use 'train', 'val' or 'test'"
        )
    if public.split == "holdout" and holdout <= 0:
        raise ValueError(
            f"{where}.split: 'holdout' needs federation.partition.holdout > 0 (the share of the "
            "train split no client receives), e.g. 0.2"
        )
    info = fl_data.info(public.dataset or dataset)
    split = "train" if public.split == "holdout" else public.split
    if info.splits and split not in info.splits:
        raise ValueError(
            f"{where}.split: {info.name} has no {split!r} split (it has {', '.join(info.splits)})"
        )


class StudyConfig(BaseModel):
    """A whole study (see the README's study-file reference)."""

    model_config = _strict()

    study: str = Field(
        pattern=NAME_PATTERN,
        description="Name: the MLflow experiment and the output sub-folder (letters, digits, "
        "'_', '.', '-'; starts with a letter or digit).",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=SEED_LIMIT,
        description="Seeds the model initialisation, the partition, client sampling, the "
        "attacks and the Optuna sampler; in [0, 2**32).",
    )
    plugins: list[Annotated[str, Field(pattern=MODULE_PATTERN)]] = Field(
        default_factory=list,
        description="Modules imported first: they register custom defenses, attacks, models, "
        "datasets or objectives (shipped to every Ray worker).",
    )
    data: DataSection = Field(description="The dataset, where its files are, the image size.")
    model: ModelSection = Field(description="The model: its name and options.")
    federation: FederationConfig = Field(
        description="The federated run: algorithm, clients, rounds, local work, partition."
    )
    defenses: dict[str, dict[str, ParamValue]] = Field(
        description="Defense name -> its hyperparameters, each a constant or a search range "
        "{type: float|int|categorical, low, high, log, choices}; 'none: {}' is the control."
    )
    attacks: list[AttackSection] = Field(
        description="The attacks run on the captured client messages (at least one)."
    )
    objectives: list[ObjectiveSection] = Field(
        description="Two or more {metric, mode}, each metric once: the search's Pareto front is "
        "over them."
    )
    search: SearchSection = Field(
        default_factory=SearchSection, description="How Optuna explores the space."
    )
    resources: ResourcesSection = Field(
        default_factory=ResourcesSection, description="What each trial asks Ray for."
    )
    tracking: TrackingSection = Field(
        default_factory=TrackingSection,
        description="MLflow, and which private images may be stored there.",
    )
    validity: ValiditySection = Field(
        default_factory=ValiditySection,
        description="When the undefended control counts as broken, so the front can rank defenses.",
    )
    output: Path = Field(
        Path("results"), description="Results go to output/<study>/ (made absolute)."
    )
    device: str = Field(
        "auto",
        description="'auto' (the GPU Ray assigned, else the CPU), 'cpu', 'cuda', 'cuda:N' or "
        "'mps'.",
    )
    success_psnr: float = Field(
        20.0, ge=0, le=200, description="PSNR (dB, 0-200) above which an attack succeeds."
    )
    identification_pool: int = Field(
        1024,
        ge=1,
        le=100_000,
        description="Most images of the evaluation split kept as the identification pool (all "
        "when the split is smaller); fewer than 256 make identification easy and are warned of.",
    )
    lpips_backbone: Path | None = Field(
        None,
        description="Local AlexNet features file for LPIPS (offline); default: "
        "OBSCURA_LPIPS_BACKBONE or torchvision's download.",
    )

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        """``auto`` or a torch device string (``cpu``, ``cuda``, ``cuda:1``)."""
        if value == "auto":
            return value
        try:
            kind = torch.device(value).type
        except (RuntimeError, ValueError):
            kind = None
        if kind not in ("cpu", "cuda", "mps"):
            raise ValueError("not a device: use auto, cpu, cuda, cuda:<index> or mps")
        return value

    @field_validator("lpips_backbone")
    @classmethod
    def _backbone_exists(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        value = value.expanduser().resolve()
        if not value.is_file():
            raise ValueError(f"LPIPS backbone file {str(value)!r} does not exist")
        return value

    @field_validator("output")
    @classmethod
    def _absolute_output(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("defenses")
    @classmethod
    def _defenses(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("list at least one defense (use `none: {}` for the control)")
        out: dict[str, dict[str, Any]] = {}
        for name, params in value.items():
            if name not in available_defenses():
                raise ValueError(
                    f"unknown defense {name!r}; known defenses: {', '.join(available_defenses())}"
                )
            out[name] = _defense_params(name, params or {})
        return out

    @field_validator("attacks")
    @classmethod
    def _some_attack(cls, value: list[AttackSection]) -> list[AttackSection]:
        if not value:
            raise ValueError("list at least one attack")
        return value

    @field_validator("objectives")
    @classmethod
    def _some_objective(cls, value: list[ObjectiveSection]) -> list[ObjectiveSection]:
        """Two objectives or more: a study's result is their Pareto front (a single objective
        is not supported)."""
        if len(value) < 2:
            raise ValueError(
                "list at least two objectives (a utility and a privacy metric): a study's "
                "result is their Pareto front; a single objective is not supported"
            )
        metrics = [o.metric for o in value]
        twice = sorted({m for m in metrics if metrics.count(m) > 1})
        if twice:
            raise ValueError(f"objective {', '.join(map(repr, twice))} is listed twice")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        fed = self.federation
        kind = MESSAGE_KIND[fed.algorithm]
        labels = [a.key for a in self.attacks]
        if len(set(labels)) != len(labels):
            raise ValueError("two attacks share a name; give one of them a distinct `label`")
        for i, attack in enumerate(self.attacks):
            kinds = attack_class(attack.name)(**attack.params).requirements().kinds
            if kind not in kinds:
                raise ValueError(
                    f"attacks.{i} ({attack.name}) works on {'/'.join(kinds)} messages but "
                    f"federation.algorithm {fed.algorithm!r} sends {kind} messages"
                )
            late = [r for r in attack.rounds if r >= fed.rounds]
            if late:
                raise ValueError(
                    f"attacks.{i}.rounds {late} lie beyond the last round "
                    f"(federation.rounds is {fed.rounds}, rounds are 0-based)"
                )
            public = attack.capabilities.public_data
            if public is not None:
                _check_public(i, public, self.data.dataset, fed.partition.holdout)
            if attack.victims > fed.clients_per_round:
                raise ValueError(
                    f"attacks.{i}.victims ({attack.victims}) exceeds the clients sampled per "
                    f"round (federation.clients_per_round = {fed.clients_per_round})"
                )
        for i, obj in enumerate(self.objectives):
            try:
                validate_metric(obj.metric, labels)
            except ValueError as err:
                raise ValueError(f"objectives.{i}.metric: {err}") from None
        if self.search.concurrency > self.search.trials:
            self.search.concurrency = self.search.trials
        return self

    @model_validator(mode="after")
    def _model_builds(self) -> StudyConfig:
        """Build the model on the meta device (no memory): bad options and absurd sizes are
        refused here, not in every trial."""
        info = fl_data.info(self.data.dataset)
        size = self.data.image_size or info.native_size or 32
        options = self.model.options()
        shown = f"{self.model.name} ({', '.join(f'{k}={v!r}' for k, v in options.items())})"
        try:
            with torch.device("meta"):
                model = fl_models.build(
                    self.model.name,
                    channels=info.channels or 3,
                    classes=info.num_classes or 2,
                    image_size=size,
                    **options,
                )
        except ValueError as err:  # the builder's own check names the option
            raise ValueError(f"model: {err}") from None
        except (TypeError, RuntimeError, OverflowError) as err:  # e.g. sizes past int64
            first = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise ValueError(f"model: {shown} cannot be built ({first})") from None
        count = sum(p.numel() for p in model.parameters())
        if count > MAX_MODEL_PARAMETERS:
            raise ValueError(
                f"model: {shown} has {count:.3g} parameters, more than the "
                f"{MAX_MODEL_PARAMETERS:.0e} a study may build"
            )
        return self

    @property
    def folder(self) -> Path:
        """The study's output folder: ``output / study``."""
        return self.output / self.study

    def metric_names(self) -> list[str]:
        """Every metric a trial of this study reports."""
        return known_metrics([a.key for a in self.attacks])

    def search_ranges(self) -> dict[str, dict[str, ParamSpec]]:
        """Per defense, the hyperparameters searched and their ranges."""
        return {
            d: {k: v for k, v in params.items() if isinstance(v, ParamSpec)}
            for d, params in self.defenses.items()
        }

    def constants(self, defense: str) -> dict[str, Any]:
        """The fixed hyperparameters the study sets for ``defense``."""
        return {k: v for k, v in self.defenses[defense].items() if not isinstance(v, ParamSpec)}


def _defense_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate one defense's entry: known names, valid constants, valid ranges."""
    if not isinstance(params, dict):
        raise ValueError(f"defenses.{name} must be a mapping of hyperparameters")
    cls = defense_class(name)
    fields = cls.Params.model_fields
    out: dict[str, Any] = {}
    for key, value in params.items():
        if key not in fields:
            raise ValueError(
                f"defense {name!r} has no hyperparameter {key!r}; "
                f"hyperparameters: {', '.join(fields) or '(none)'}"
            )
        if isinstance(value, dict):
            try:
                spec = ParamSpec(**value)
            except ValidationError as err:
                msg = "; ".join(e["msg"] for e in err.errors())
                raise ValueError(f"defenses.{name}.{key}: invalid search range: {msg}") from None
            if spec.type == "categorical":
                for choice in spec.choices or ():
                    _check_value(cls, name, key, choice)
            else:
                assert spec.low is not None and spec.high is not None  # ParamSpec checked both
                _check_value(cls, name, key, int(spec.low) if spec.type == "int" else spec.low)
                _check_value(cls, name, key, int(spec.high) if spec.type == "int" else spec.high)
            out[key] = spec
        else:
            _check_value(cls, name, key, value)
            out[key] = value
    return out


def check_defense_value(name: str, key: str, value: Any) -> None:
    """Validate one hyperparameter value of defense ``name`` as a study-file constant would be
    (used for ``trial --set <defense>.<key>=VALUE``).

    Raises:
        StudyFileError: ``defenses.<name>.<key>: <problem> (found <value>)``.

    Example:
        >>> check_defense_value("prune", "percent", 50.0)  # valid: returns None
    """
    try:
        _check_value(defense_class(name), name, key, value)
    except ValueError as err:
        raise StudyFileError(str(err)) from None


def _check_value(cls: type[Defense[Any]], name: str, key: str, value: Any) -> None:
    try:
        cls.Params(**{key: value})
    except ValidationError as err:
        msg = "; ".join(e["msg"] for e in err.errors())
        raise ValueError(f"defenses.{name}.{key}: {msg} (found {value!r})") from None


def import_plugins(modules: list[str]) -> None:
    """Import the study's plugin modules (they register custom attacks, defenses, models,
    datasets and objectives; :mod:`orchestrator.registry` ships them to Ray's workers).

    Only modules the user named explicitly are imported. A name that is not an absolute dotted
    module name, or a module that fails to import (not found, a ``SyntaxError``, any exception
    its code raises), is a study-file error naming the plugin and where it failed.

    Raises:
        StudyFileError: ``plugins.<i>: ...`` with the module, the error and its file and line.

    Example:
        >>> import_plugins(["json"])  # already importable: registers nothing, raises nothing
    """
    for i, module in enumerate(modules):
        if not re.match(MODULE_PATTERN, module):
            raise StudyFileError(
                f"plugins.{i}: {module!r} is not a module name (an absolute dotted Python "
                "module name, e.g. mylab.defenses)"
            )
        try:
            importlib.import_module(module)
        except Exception as err:  # the plugin's own code may raise anything
            raise StudyFileError(f"plugins.{i}: cannot import {module!r}: {_where(err)}") from None


def _where(err: Exception) -> str:
    """``Type: message`` of a failed import, with the plugin file and line that raised it."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, SyntaxError | ModuleNotFoundError):
        return text  # the message already says where (or that nothing was found)
    frames = traceback.extract_tb(err.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename]
    if own:
        text += f" (at {own[-1].filename}:{own[-1].lineno})"
    return text


_PASSWORD = re.compile(r"(//[^/@:\s]*):[^/@\s]*@")


def _redact(text: str) -> str:
    """``text`` with any URI password (``//user:password@``) replaced by ``***``."""
    return _PASSWORD.sub(r"\1:***@", text)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the field path, the message, and the value found."""
    lines = [f"{source}: invalid study file"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = _redact(e["msg"].removeprefix("Value error, "))
        found = e.get("input")
        shown = _redact(repr(found)) if not isinstance(found, dict) else "a mapping"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if e["type"] == "missing":
            lines.append(f"  {loc}: required field is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown field (found {shown}); check the spelling")
        elif not loc:  # a whole-study check: its message names the fields
            lines.append(f"  {msg}")
        elif "(found " in msg or isinstance(found, dict):  # shown already, or a whole section
            lines.append(f"  {loc}: {msg}")
        else:
            lines.append(f"  {loc}: {msg} (found {shown})")
    return "\n".join(lines)


def load_study(
    path: str | Path, overrides: dict[str, Any] | None = None, *, smoke: bool = False
) -> StudyConfig:
    """Read and validate a study file; raise :class:`StudyFileError` with a readable message.

    ``overrides`` set dotted keys after ``smoke`` (see :mod:`orchestrator.smoke`) shrank it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise StudyFileError(f"{path}: cannot read the study file ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise StudyFileError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=SAFE_LOADER)  # a safe loader (no Python objects)
    except yaml.YAMLError as err:
        raise StudyFileError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise StudyFileError(
            f"{path}: a study file must be a YAML mapping (found {type(raw).__name__})"
        )
    if smoke:
        from orchestrator.smoke import smoke as shrink

        raw = shrink(raw)
    if overrides:
        raw = apply_overrides(raw, overrides)
    plugins = raw.get("plugins") or []
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        import_plugins(plugins)
    return parse_study(raw, str(path))


def parse_study(raw: dict[str, Any], source: str = "study") -> StudyConfig:
    """Validate an already-parsed study mapping."""
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise StudyFileError(format_validation_error(err, source)) from None
    except ValueError as err:  # raised by nested constructors outside pydantic's wrapping
        raise StudyFileError(f"{source}: {err}") from None


OVERRIDE_KEY = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$"
"""A ``--set`` key: dotted names; a number indexes a list (``attacks.0.label``)."""


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``federation.rounds=3``, ``attacks.0.victims=2``) in a copy of the raw
    mapping; missing mappings on the way are created, list entries must exist.

    Raises:
        StudyFileError: a malformed key, or an index past the end of a list.

    Example:
        >>> apply_overrides({"a": [{"b": 1}]}, {"a.0.b": 2, "c.d": 3})
        {'a': [{'b': 2}], 'c': {'d': 3}}
    """
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        if not re.match(OVERRIDE_KEY, dotted):
            raise StudyFileError(f"--set {dotted!r}: not a dotted key (e.g. federation.rounds)")
        node: Any = out
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            key: Any = part  # the key into a section, an int index into a list
            if not isinstance(node, dict | list):
                where = ".".join(parts[:i])
                raise StudyFileError(f"--set {dotted}: {where} is a value, not a section")
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[:i])
                    raise StudyFileError(
                        f"--set {dotted}: {where} is a list of {len(node)}; index it with "
                        f"0..{len(node) - 1}"
                    )
                key = int(part)
            elif not last and not isinstance(node.get(part), dict | list):
                node[part] = {}
            if last:
                node[key] = value
            else:
                node = node[key]
    return out


def dump_study(config: StudyConfig) -> str:
    """The validated study as YAML (for MLflow parameters and the report)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
