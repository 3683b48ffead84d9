"""A study's ``plugins`` reach every Ray worker: a model, a dataset and an objective (and an
attack and a defense) registered by a plugin module that only the driver can import."""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from attacks import get_attack
from defenses import get_defense
from fl import data, models
from fl.registry import Registry
from orchestrator.config import import_plugins, load_study, parse_study
from orchestrator.metrics import custom_objectives
from orchestrator.registry import capture_customs, registries, restore_customs

PLUGIN = '''
"""A lab's plugin: its own model, dataset, objective, attack and defense."""
import os
from pathlib import Path

import torch
from torch import nn

from attacks import attack_class, register_attack
from defenses import register_defense
from defenses.base import Defense, DefenseParams
from fl import data, models
from fl.models.base import SplitModel
from orchestrator import register_objective

MARKS = Path(__file__).with_suffix(".marks")  # which process built the model, loaded the data


def _mark(what: str) -> None:
    with MARKS.open("a") as f:
        f.write(f"{what} {os.getpid()}\\n")


@models.register("plugin_mlp")
def build_plugin_mlp(channels, classes, image_size, *, hidden=8):
    _mark("model")
    features = nn.Sequential(
        nn.Flatten(), nn.Linear(channels * image_size * image_size, hidden), nn.Sigmoid()
    )
    return SplitModel(
        features, nn.Linear(hidden, classes), in_channels=channels, image_size=image_size
    )


INFO = data.DatasetInfo(
    "plugin_squares", 1, 2, ("dark", "bright"), ("train", "test"), 16, None, None, "a plugin's"
)


@data.register("plugin_squares", INFO)
def load_squares(root, split, download):
    _mark(f"dataset-{split}")
    generator = torch.Generator().manual_seed(0 if split == "train" else 1)
    labels = torch.arange(24) % 2
    noise = torch.randint(0, 96, (24, 1, 16, 16), generator=generator)
    images = (noise + 128 * labels.view(-1, 1, 1, 1)).to(torch.uint8)
    return data.ImageData(images, labels, INFO, mean=(), std=(), split=split)


@register_objective("plugin_images_attacked")
def images_attacked(result):
    return float(len(result["attacks"]))


@register_attack("plugin_idlg")
class PluginIDLG(attack_class("idlg")):
    pass


@register_defense("plugin_identity")
class PluginIdentity(Defense[DefenseParams]):
    pass
'''

NAMES = {
    "models": "plugin_mlp",
    "datasets": "plugin_squares",
    "objectives": "plugin_images_attacked",
    "attacks": "plugin_idlg",
    "defenses": "plugin_identity",
}


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[str]:
    """A plugin module written to ``tmp_path`` (importable from the driver only); its entries
    are removed from every registry afterwards."""
    name = f"lab_plugin_{tmp_path.name}".replace("-", "_")
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(PLUGIN))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield name
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)
        for kind, entry in NAMES.items():
            if entry in registries()[kind]:
                registries()[kind].unregister(entry)


def _plugin_study(raw: dict[str, Any], module: str) -> dict[str, Any]:
    """The tiny study on the plugin's model, dataset and objective."""
    return {
        **raw,
        "plugins": [module],
        "data": {**raw["data"], "dataset": "plugin_squares"},
        "model": {"name": "plugin_mlp", "hidden": 6},
        "objectives": [
            {"metric": "test_accuracy", "mode": "max"},
            {"metric": "plugin_images_attacked", "mode": "min"},
        ],
    }


def _forget(module: str, folder: Path) -> None:
    """Make this process like a fresh Ray worker: none of the plugin's entries registered,
    and the plugin module no longer importable."""
    for kind, entry in NAMES.items():
        registries()[kind].unregister(entry)
    sys.modules.pop(module, None)
    sys.path.remove(str(folder))
    importlib.invalidate_caches()
    assert importlib.util.find_spec(module) is None


def test_capture_and_restore_carry_all_five_registries_by_value(
    plugin: str, tmp_path: Path, valid_raw: dict[str, Any]
) -> None:
    """What a trial does on a worker, in-process: the customs of all five registries travel
    through cloudpickle by value and the study validates with them restored."""
    from ray import cloudpickle

    raw = _plugin_study(valid_raw, plugin)
    import_plugins([plugin])
    captured = capture_customs()
    assert {kind: set(entries) for kind, entries in captured.items()} == {
        kind: {name} for kind, name in NAMES.items()
    }
    blob = cloudpickle.dumps(captured)
    _forget(plugin, tmp_path)
    with pytest.raises(Exception, match="plugin_"):  # what the trial met before the fix
        parse_study(raw)
    restore_customs(cloudpickle.loads(blob))
    assert parse_study(raw).model.name == "plugin_mlp"
    model = models.build("plugin_mlp", channels=1, classes=2, image_size=16, hidden=6)
    assert model.num_classes == 2
    train = data.load("plugin_squares", root=tmp_path, split="train")
    assert train.images.shape == (24, 1, 16, 16) and data.info("plugin_squares").num_classes == 2
    assert custom_objectives()["plugin_images_attacked"].fn({"attacks": [{}, {}]}) == 2.0
    assert get_attack("plugin_idlg", iterations=1).name == "plugin_idlg"
    assert get_defense("plugin_identity").name == "plugin_identity"
    restore_customs(cloudpickle.loads(blob))  # a reused worker restores again
    assert not any(registries()[kind].is_builtin(name) for kind, name in NAMES.items())


@pytest.mark.slow  # a real Ray study: 56 s to 133 s on 2 shared cores
def test_a_study_on_a_plugins_model_dataset_and_objective_completes_on_ray(
    plugin: str, tmp_path: Path, tiny_study: Any, local_ray_run: Any
) -> None:
    """Through real Ray: the worker cannot import the plugin (it lies in ``tmp_path``, not on
    the worker's path), yet the trial builds the plugin's model, loads its dataset and reports
    its objective."""
    path = tiny_study(
        {
            "plugins": [plugin],
            "data.dataset": "plugin_squares",
            "model": {"name": "plugin_mlp", "hidden": 6},
            "defenses": {"none": {}},
            "objectives": [
                {"metric": "test_accuracy", "mode": "max"},
                {"metric": "plugin_images_attacked", "mode": "min"},
            ],
            "search.trials": 1,
            "search.concurrency": 1,
            "tracking.log_images": "none",
        }
    )
    cfg = load_study(path)  # imports the plugin in the driver
    local_ray_run(cfg)
    trials = pd.read_parquet(cfg.folder / "trials.parquet")
    assert len(trials) == 1, trials
    assert trials["status"].iloc[0] == "completed", trials.get("error")
    assert trials["plugin_images_attacked"].iloc[0] == 2.0  # one victim, batch of two
    assert trials["test_accuracy"].notna().all()
    marks = [line.split() for line in (tmp_path / f"{plugin}.marks").read_text().splitlines()]
    workers = {what for what, pid in marks if int(pid) != os.getpid()}
    assert {"model", "dataset-train", "dataset-test"} <= workers, marks


def test_the_five_registries_share_the_verbs() -> None:
    """Every registry of the project is a :class:`Registry` with its built-ins marked."""
    found = registries()
    assert sorted(found) == ["attacks", "datasets", "defenses", "models", "objectives"]
    assert all(isinstance(r, Registry) for r in found.values())
    assert {"idlg", "dlg"} <= found["attacks"].builtins()
    assert "none" in found["defenses"].builtins()
    assert "lenet" in found["models"].builtins()
    assert "pneumoniamnist" in found["datasets"].builtins()
    assert not found["objectives"].builtins()  # the built-in metrics are not registered
