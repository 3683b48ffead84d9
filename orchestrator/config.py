"""The study file: typed, validated configuration of a privacy–utility study.

A study file is YAML read with ``yaml.safe_load`` and validated by :class:`StudyConfig`. Every
error names the field path, what was expected and what was found (:class:`StudyFileError`);
unknown dataset, model, defense, attack or metric names list the known ones. A hyperparameter
value is either a constant or a search range ``{type: float|int|categorical, low, high, log,
choices}``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attacks import AttackerCapabilities, attack_class, available_attacks
from defenses import ParamSpec, available_defenses, defense_class
from fl import data as fl_data
from fl import models as fl_models
from fl.simulation import FederationConfig
from fl.simulation.observation import MESSAGE_KIND
from orchestrator.metrics import known_metrics, validate_metric


class StudyFileError(ValueError):
    """A study file is unreadable or invalid; the message names the file and the field."""


def _strict() -> ConfigDict:
    return ConfigDict(extra="forbid")


class DataSection(BaseModel):
    """Which dataset, where its files are, and the image size."""

    model_config = _strict()

    dataset: str
    root: Path = Path("~/.cache/obscura/data")
    download: bool = False
    image_size: int | None = Field(None, ge=8, le=512)

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

    model_config = ConfigDict(extra="allow")

    name: str

    @model_validator(mode="after")
    def _known_model(self) -> ModelSection:
        known = fl_models.available()
        if self.name not in known:
            raise ValueError(f"unknown model {self.name!r}; known models: {', '.join(known)}")
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

    name: str
    label: str | None = Field(None, description="Name used in metric names (default: name).")
    rounds: list[int] = Field(default_factory=lambda: [0])
    victims: int = Field(1, ge=1)
    params: dict[str, Any] = Field(default_factory=dict)
    capabilities: AttackerCapabilities = Field(default_factory=AttackerCapabilities)
    batch_victims: Literal["auto", "on", "off"] = Field(
        "off",
        description="Reconstruct this attack's victims in one batched optimisation (Inverting "
        "Gradients on FedSGD): 'on', 'off', or 'auto' (on a GPU only; slower on CPUs). Equal "
        "to separate runs up to float rounding, which signed Adam can amplify on long runs. "
        "Not yet verified on CUDA (benchmarks/gpu_check.py checks it): an opt-in there.",
    )

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
        attack = attack_class(self.name)(**self.params)  # AttackConfigError names the field
        if attack.needs_bn_stats() and not self.capabilities.knows_bn_stats:
            raise ValueError(
                f"attack {self.name!r} (so configured) matches the BatchNorm statistics the "
                "client's returned buffers reveal; grant them with capabilities: "
                "{knows_bn_stats: true}, or drop its BatchNorm prior"
            )
        return self

    @property
    def key(self) -> str:
        """The attack's name in metric names and tables."""
        return self.label or self.name


class ObjectiveSection(BaseModel):
    """One objective of the multi-objective search."""

    model_config = _strict()

    metric: str
    mode: Literal["min", "max"]


class SearchSection(BaseModel):
    """How Optuna explores the space."""

    model_config = _strict()

    sampler: Literal["nsga2", "tpe", "gp", "random"] = "nsga2"
    trials: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    max_failures: int = Field(0, ge=0, description="Retries of a failed trial (Ray Tune).")
    checkpoint_every: int = Field(
        1,
        ge=0,
        description="Rounds between a trial's checkpoints (0: none); a retried trial resumes "
        "from its latest one.",
    )


class ResourcesSection(BaseModel):
    """Resources each trial asks Ray for (fractional GPUs allowed)."""

    model_config = _strict()

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class TrackingSection(BaseModel):
    """MLflow tracking and which private images may be stored there."""

    model_config = _strict()

    mlflow_uri: str = "sqlite:///mlflow.db"
    log_images: Literal["pairs", "reconstructions", "none"] = "pairs"

    @field_validator("mlflow_uri")
    @classmethod
    def _absolute_sqlite(cls, value: str) -> str:
        """Relative SQLite/file paths are made absolute: Ray changes a trial's directory."""
        prefix = "sqlite:///"
        if value.startswith(prefix) and not value.startswith(prefix + "/"):
            return prefix + str(Path(value[len(prefix) :]).expanduser().resolve())
        return value


class StudyConfig(BaseModel):
    """A whole study (see the README's study-file reference)."""

    model_config = _strict()

    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    plugins: list[str] = Field(
        default_factory=list, description="Modules imported first (custom defenses, attacks)."
    )
    data: DataSection
    model: ModelSection
    federation: FederationConfig
    defenses: dict[str, dict[str, ParamValue]]
    attacks: list[AttackSection]
    objectives: list[ObjectiveSection]
    search: SearchSection = Field(default_factory=SearchSection)
    resources: ResourcesSection = Field(default_factory=ResourcesSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    output: Path = Path("results")
    device: str = "auto"
    success_psnr: float = Field(20.0, description="PSNR (dB) above which an attack succeeds.")
    lpips_backbone: Path | None = Field(
        None,
        description="Local AlexNet features file for LPIPS (offline); default: "
        "OBSCURA_LPIPS_BACKBONE or torchvision's download.",
    )

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
        if not value:
            raise ValueError("list at least one objective")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> StudyConfig:
        fed = self.federation
        kind = MESSAGE_KIND[fed.algorithm]
        labels = [a.key for a in self.attacks]
        if len(set(labels)) != len(labels):
            raise ValueError("two attacks share a name; give one of them a distinct `label`")
        for i, attack in enumerate(self.attacks):
            kinds = attack_class(attack.name).requirements.kinds
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
                _check_value(cls, name, key, int(spec.low) if spec.type == "int" else spec.low)
                _check_value(cls, name, key, int(spec.high) if spec.type == "int" else spec.high)
            out[key] = spec
        else:
            _check_value(cls, name, key, value)
            out[key] = value
    return out


def _check_value(cls: type, name: str, key: str, value: Any) -> None:
    try:
        cls.Params(**{key: value})
    except ValidationError as err:
        msg = "; ".join(e["msg"] for e in err.errors())
        raise ValueError(f"defenses.{name}.{key}: {msg} (found {value!r})") from None


def import_plugins(modules: list[str]) -> None:
    """Import the study's plugin modules (they register custom defenses/attacks/objectives).

    Only modules the user named explicitly are imported; an import error is a study-file error.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise StudyFileError(f"plugins: cannot import {module!r}: {err}") from None


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: the field path, the message, and the value found."""
    lines = [f"{source}: invalid study file"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        found = e.get("input")
        shown = repr(found) if not isinstance(found, dict) else "a mapping"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if e["type"] == "missing":
            lines.append(f"  {loc}: required field is missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown field (found {shown}); check the spelling")
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
    try:
        raw = yaml.safe_load(text)
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


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``federation.rounds=3``) in a copy of the raw mapping."""
    import copy

    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def dump_study(config: StudyConfig) -> str:
    """The validated study as YAML (for MLflow parameters and the report)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
