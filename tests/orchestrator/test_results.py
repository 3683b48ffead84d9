"""Parquet result tables: schemas, round-trips, upserts, atomic writes and resume."""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator import results
from orchestrator.results import (
    ATTACKS_SCHEMA,
    ROUNDS_FIXED_FIELDS,
    TRIALS_FIXED_SCHEMA,
    ResultStore,
    write_parquet_atomic,
)

T0 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def _trial(trial_id: str, **extra: Any) -> dict[str, Any]:
    """A minimal valid completed trial row plus ``extra`` columns."""
    return {"trial_id": trial_id, "status": "completed", "defense": "none", **extra}


def _attack(**extra: Any) -> dict[str, Any]:
    """A valid attacks row (image 0 of client 0, round 0) with ``extra`` overrides."""
    row: dict[str, Any] = {
        "attack": "idlg",
        "round": 0,
        "client": 0,
        "image_index": 0,
        "psnr": 18.5,
        "psnr_gain": 4.25,
        "prior_psnr": 17.0,
        "prior_ssim": 0.6,
        "prior_gain": 1.5,
        "ssim": 0.42,
        "lpips": 0.31,
        "id_rank": 3,
        "id_rank_lpips": 1,
        "identified": False,
        "label_correct": True,
        "seconds": 2.5,
        "diverged": False,
    }
    row.update(extra)
    return row


def _leftover_temps(folder: Path) -> list[str]:
    """Names of temporary files left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    """An empty store in a fresh folder below tmp_path (the store creates the folder)."""
    return ResultStore(tmp_path / "study")


# ------------------------------------------------------------------------------------ trials


def test_trials_round_trip_and_schema(store: ResultStore) -> None:
    store.upsert_trial(
        _trial(
            "t-none",
            number=0,
            device="cpu",
            mlflow_run_id="run0",
            started_at=T0,
            finished_at=T0 + timedelta(seconds=90),
            test_accuracy=0.91,
            attack_psnr=31.5,
        )
    )
    store.upsert_trial(
        _trial(
            "t-dp",
            number=1,
            defense="dp_sgd",
            param_noise_multiplier=1.1,
            param_clip_mode="flat",
            param_microbatches=4,
            param_secure=True,
            test_accuracy=0.8,
            attack_psnr=12.0,
        )
    )
    store.upsert_trial(
        {
            "trial_id": "t-fail",
            "number": np.int64(2),
            "status": "failed",
            "defense": "soteria",
            "error": "RuntimeError: boom",
            "param_prune_ratio": np.float32(0.25),
            "started_at": 1_700_000_000.5,
        }
    )
    table = pq.read_table(store.trials_path)
    schema = table.schema
    fixed = list(TRIALS_FIXED_SCHEMA.names)
    assert schema.names[: len(fixed)] == fixed
    for field in TRIALS_FIXED_SCHEMA:
        assert schema.field(field.name).type == field.type
        assert schema.field(field.name).nullable == field.nullable
    # param columns sorted, then metrics sorted
    assert schema.names[len(fixed) :] == [
        "param_clip_mode",
        "param_microbatches",
        "param_noise_multiplier",
        "param_prune_ratio",
        "param_secure",
        "attack_psnr",
        "test_accuracy",
    ]
    assert schema.field("param_clip_mode").type == pa.string()
    assert schema.field("param_microbatches").type == pa.int64()
    assert schema.field("param_noise_multiplier").type == pa.float64()
    assert schema.field("param_secure").type == pa.bool_()
    assert schema.field("attack_psnr").type == pa.float64()
    assert schema.field("started_at").type == pa.timestamp("us", tz="UTC")

    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert rows["t-none"]["started_at"] == T0  # microseconds kept
    assert rows["t-none"]["finished_at"] == T0 + timedelta(seconds=90)
    assert rows["t-none"]["number"] == 0 and rows["t-none"]["pareto"] is False
    assert rows["t-none"]["param_microbatches"] is None
    assert rows["t-dp"]["param_microbatches"] == 4
    assert rows["t-dp"]["param_secure"] is True
    assert rows["t-dp"]["param_clip_mode"] == "flat"
    assert rows["t-dp"]["error"] is None and rows["t-dp"]["started_at"] is None
    assert rows["t-fail"]["number"] == 2
    assert rows["t-fail"]["param_prune_ratio"] == pytest.approx(0.25)
    assert rows["t-fail"]["test_accuracy"] is None
    assert rows["t-fail"]["started_at"] == datetime(2023, 11, 14, 22, 13, 20, 500000, timezone.utc)

    df = store.trials()
    assert list(df["trial_id"]) == ["t-none", "t-dp", "t-fail"]
    assert str(df["param_microbatches"].dtype) == "Int64"
    assert df["param_microbatches"].iloc[1] == 4 and pd.isna(df["param_microbatches"].iloc[0])
    assert df["test_accuracy"].dtype == np.float64
    assert str(df["started_at"].dtype) == "datetime64[us, UTC]"


def test_number_defaults_to_minus_one(store: ResultStore) -> None:
    store.upsert_trial(_trial("a"))
    assert store.trials()["number"].tolist() == [-1]


def test_nan_and_inf_stored_as_null(store: ResultStore) -> None:
    store.upsert_trial(
        _trial("a", test_accuracy=float("nan"), loss=math.inf, psnr=np.float64(-np.inf), ok=1.5)
    )
    store.upsert_trial(_trial("b", param_lr=float("nan"), param_k=2))
    table = pq.read_table(store.trials_path)
    for name in ("test_accuracy", "loss", "psnr"):
        column = table.column(name)
        assert column.type == pa.float64()
        assert column.null_count == 2  # row a: non-finite; row b: absent
    assert table.column("ok").to_pylist() == [1.5, None]
    assert table.column("param_lr").null_count == 2
    # an all-null param column falls back to float64 when no type was ever known
    assert table.schema.field("param_lr").type == pa.float64()


def test_param_type_inference(store: ResultStore) -> None:
    store.upsert_trial(_trial("a", param_x=1))
    assert pq.read_table(store.trials_path).schema.field("param_x").type == pa.int64()
    store.upsert_trial(_trial("b", param_x=0.5))  # ints and floats -> float64
    table = pq.read_table(store.trials_path)
    assert table.schema.field("param_x").type == pa.float64()
    assert table.column("param_x").to_pylist() == [1.0, 0.5]
    with pytest.raises(TypeError, match="mixes value kinds"):
        store.upsert_trial(_trial("c", param_x="high"))
    # the failed upsert changed neither the store nor the file
    assert store.trial_ids() == ["a", "b"]
    assert pq.read_table(store.trials_path).num_rows == 2


def test_param_type_kept_when_column_becomes_all_null(store: ResultStore) -> None:
    store.upsert_trial(_trial("a", param_mode="x"))
    store.upsert_trial(_trial("a", param_mode=None))
    assert pq.read_table(store.trials_path).schema.field("param_mode").type == pa.string()


def test_trial_validation(store: ResultStore) -> None:
    with pytest.raises(ValueError, match="status"):
        store.upsert_trial(_trial("a", status="done"))
    with pytest.raises(ValueError, match="defense"):
        store.upsert_trial({"trial_id": "a", "status": "running"})
    with pytest.raises(ValueError, match="trial_id"):
        store.upsert_trial({"status": "running", "defense": "none"})
    with pytest.raises(TypeError, match="metric"):
        store.upsert_trial(_trial("a", notes="free text"))
    with pytest.raises(ValueError, match="naive"):
        store.upsert_trial(_trial("a", started_at=datetime(2025, 1, 1)))
    assert not store.trials_path.exists()
    assert len(store.trials()) == 0


def test_upsert_replaces_without_duplicates(store: ResultStore) -> None:
    store.upsert_trial({**_trial("a"), "status": "running", "param_k": 3})
    store.upsert_trial(_trial("b", test_accuracy=0.5))
    store.upsert_trial(_trial("a", param_k=3, test_accuracy=0.7, finished_at=T0))
    df = store.trials()
    assert df["trial_id"].tolist() == ["a", "b"]
    row = df.set_index("trial_id").loc["a"]
    assert row["status"] == "completed"
    assert row["test_accuracy"] == pytest.approx(0.7)
    on_disk = pq.read_table(store.trials_path)
    assert on_disk.num_rows == 2
    assert sorted(on_disk.column("trial_id").to_pylist()) == ["a", "b"]


def test_row_from_trials_frame_can_be_upserted_again(store: ResultStore) -> None:
    store.upsert_trial(_trial("a", number=0, param_k=2, started_at=T0, test_accuracy=0.5))
    store.upsert_trial(_trial("b", number=1, defense="noise", param_mode="x", device="cpu"))
    before = pq.read_table(store.trials_path)
    # pandas hands back pd.NA (Int64/boolean), NaT, NaN (float, str) and numpy scalars
    for _, series in store.trials().iterrows():
        store.upsert_trial({**series.to_dict(), "extra_metric": np.float64(1.0)})
    after = pq.read_table(store.trials_path)
    assert after.drop_columns(["extra_metric"]).equals(before)
    assert after.column("extra_metric").to_pylist() == [1.0, 1.0]


def test_set_pareto_and_flag_survives_upsert(store: ResultStore) -> None:
    for tid in ("a", "b", "c"):
        store.upsert_trial(_trial(tid))
    store.set_pareto({"a", "c"})
    assert store.trials()["pareto"].tolist() == [True, False, True]
    store.upsert_trial(_trial("a", test_accuracy=0.1))  # no 'pareto' key: flag kept
    store.upsert_trial(_trial("c", pareto=False))  # explicit value wins
    assert pq.read_table(store.trials_path).column("pareto").to_pylist() == [True, False, False]
    store.set_pareto(set())
    assert not store.trials()["pareto"].any()
    with pytest.raises(KeyError, match="zzz"):
        store.set_pareto({"zzz"})


# ------------------------------------------------------------------------------------ rounds


def test_rounds_round_trip(store: ResultStore) -> None:
    store.add_rounds(
        "a",
        [
            {"round": 0, "train_loss": 2.0, "test_accuracy": 0.5, "seconds": 3.0},
            {"round": 1, "train_loss": 1.0, "test_accuracy": 0.6, "test_auroc": float("nan")},
        ],
    )
    store.add_rounds("b", [{"trial_id": "b", "round": np.int64(0), "test_macro_f1": 0.4}])
    table = pq.read_table(store.rounds_path)
    assert table.schema.names == [
        "trial_id",
        "round",
        "seconds",
        "test_accuracy",
        "test_auroc",
        "test_macro_f1",
        "train_loss",
    ]
    for field in ROUNDS_FIXED_FIELDS:
        assert table.schema.field(field.name).type == field.type
        assert not table.schema.field(field.name).nullable
    for name in table.schema.names[2:]:
        assert table.schema.field(name).type == pa.float64()
    assert table.to_pylist() == [
        {
            "trial_id": "a",
            "round": 0,
            "seconds": 3.0,
            "test_accuracy": 0.5,
            "test_auroc": None,
            "test_macro_f1": None,
            "train_loss": 2.0,
        },
        {
            "trial_id": "a",
            "round": 1,
            "seconds": None,
            "test_accuracy": 0.6,
            "test_auroc": None,
            "test_macro_f1": None,
            "train_loss": 1.0,
        },
        {
            "trial_id": "b",
            "round": 0,
            "seconds": None,
            "test_accuracy": None,
            "test_auroc": None,
            "test_macro_f1": 0.4,
            "train_loss": None,
        },
    ]
    df = store.rounds()
    assert df["round"].tolist() == [0, 1, 0]
    assert df["train_loss"].dtype == np.float64


def test_rounds_replace_per_trial(store: ResultStore) -> None:
    store.add_rounds("a", [{"round": 0, "loss": 1.0}, {"round": 1, "loss": 0.5}])
    store.add_rounds("b", [{"round": 0, "loss": 3.0}])
    store.add_rounds("a", [{"round": 0, "loss": 0.9}])
    df = store.rounds()
    assert df[["trial_id", "round"]].values.tolist() == [["a", 0], ["b", 0]]
    assert df["loss"].tolist() == [0.9, 3.0]
    store.add_rounds("b", [])
    assert store.rounds()["trial_id"].tolist() == ["a"]


def test_rounds_validation(store: ResultStore) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        store.add_rounds("a", [{"round": 0}, {"round": 0}])
    with pytest.raises(ValueError, match="round"):
        store.add_rounds("a", [{"loss": 1.0}])
    with pytest.raises(ValueError, match="differs"):
        store.add_rounds("a", [{"trial_id": "b", "round": 0}])
    with pytest.raises(TypeError, match="integer"):
        store.add_rounds("a", [{"round": 1.0}])
    assert not store.rounds_path.exists()


# ------------------------------------------------------------------------------------ attacks


def test_attacks_round_trip_and_schema(store: ResultStore) -> None:
    rows = [
        _attack(),
        _attack(image_index=1, lpips=None, label_correct=None, diverged=np.bool_(True)),
        _attack(attack="dlm_plus", round=3, client=2, psnr=np.float32(9.5)),
    ]
    store.add_attacks("a", rows)
    table = pq.read_table(store.attacks_path)
    assert table.schema.equals(ATTACKS_SCHEMA, check_metadata=False)
    back = table.to_pylist()
    assert [r["trial_id"] for r in back] == ["a", "a", "a"]
    for got, sent in zip(back, rows, strict=True):
        for key, value in sent.items():
            expected = None if value is None else type(got[key])(value)
            assert got[key] == expected, key
    df = store.attacks()
    assert str(df["label_correct"].dtype) == "boolean"
    assert pd.isna(df["lpips"].iloc[1])


def test_attacks_optional_columns_and_validation(store: ResultStore) -> None:
    minimal = _attack()
    del minimal["lpips"], minimal["label_correct"], minimal["psnr_gain"]
    store.add_attacks("a", [minimal])
    assert store.attacks()["lpips"].isna().all() and store.attacks()["psnr_gain"].isna().all()
    with pytest.raises(ValueError, match="unknown columns"):
        store.add_attacks("a", [_attack(extra=1.0)])
    with pytest.raises(ValueError, match="missing"):
        bad = _attack()
        del bad["psnr"]
        store.add_attacks("a", [bad])
    with pytest.raises(ValueError, match="finite"):
        store.add_attacks("a", [_attack(psnr=float("nan"))])
    with pytest.raises(ValueError, match="duplicate"):
        store.add_attacks("a", [_attack(), _attack()])
    assert len(store.attacks()) == 1


def test_attack_record_keeps_psnr_gain(store: ResultStore) -> None:
    from attacks.scoring.metrics import score_images
    from tests._support.samples import sample_images

    truth = sample_images(16, 2).double()
    scored = score_images((truth + 0.05).clamp(0, 1), truth, lpips=False, flat=(0.4, 0.3, 0.2))
    rows = [
        results.attack_record("idlg", 0, 1, img, seconds=1.5, diverged=False)
        for img in scored["per_image"]
    ]
    store.add_attacks("a", rows)
    back = ResultStore(store.folder).attacks()
    assert back["psnr_gain"].tolist() == [img["psnr_gain"] for img in scored["per_image"]]
    assert (back["psnr"] > back["psnr_gain"]).all()  # the flat image scores above 0 dB


_VERSION_3 = ("prior_psnr", "prior_ssim", "prior_gain", "id_rank", "id_rank_lpips", "identified")


@pytest.mark.parametrize(
    ("version", "added"), [(b"1", ("psnr_gain", *_VERSION_3)), (b"2", _VERSION_3)]
)
def test_older_attacks_files_without_the_added_columns_still_load(
    tmp_path: Path, version: bytes, added: tuple[str, ...]
) -> None:
    folder = tmp_path / "study"
    folder.mkdir()
    old_schema = pa.schema(
        [f for f in ATTACKS_SCHEMA if f.name not in added],
        metadata={b"obscura.schema_version": version},
    )
    old_row = {"trial_id": "old", **{k: v for k, v in _attack().items() if k not in added}}
    pq.write_table(pa.Table.from_pylist([old_row], schema=old_schema), folder / "attacks.parquet")

    store = ResultStore(folder)
    df = store.attacks()
    assert df.columns.tolist() == ATTACKS_SCHEMA.names
    assert df["psnr"].tolist() == [18.5]
    assert all(df[name].isna().all() for name in added)
    store.add_attacks("new", [_attack()])  # the next write uses the current schema
    table = pq.read_table(store.attacks_path)
    assert table.schema.equals(ATTACKS_SCHEMA, check_metadata=False)
    assert table.schema.metadata[b"obscura.schema_version"] == b"3"
    new = store.attacks().set_index("trial_id").loc["new"]
    assert new["prior_gain"] == 1.5 and new["id_rank"] == 3 and not new["identified"]


def test_attacks_replace_per_trial(store: ResultStore) -> None:
    store.add_attacks("a", [_attack(), _attack(image_index=1)])
    store.add_attacks("b", [_attack()])
    store.add_attacks("a", [_attack(psnr=25.0)])
    df = store.attacks()
    assert df["trial_id"].tolist() == ["a", "b"]
    assert df["psnr"].tolist() == [25.0, 18.5]


# ------------------------------------------------------------------------------------ atomic


def test_write_parquet_atomic_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    write_parquet_atomic(pa.table({"a": [1, 2]}), path)
    write_parquet_atomic(pa.table({"a": [3]}), path)
    assert pq.read_table(path).column("a").to_pylist() == [3]
    assert _leftover_temps(tmp_path) == []


def test_failed_replace_keeps_previous_file(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.upsert_trial(_trial("a", test_accuracy=0.5))
    before = store.trials_path.read_bytes()
    seen: list[str] = []

    def failing_replace(src: Any, dst: Any) -> None:
        seen.append(os.path.basename(src))
        assert Path(src).exists()  # the temp file was fully written beside the target
        raise OSError("disk on fire")

    monkeypatch.setattr(results.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        store.upsert_trial(_trial("b", test_accuracy=0.9))
    assert seen == [f"trials.parquet.tmp-{os.getpid()}"]
    assert store.trials_path.read_bytes() == before
    assert _leftover_temps(store.folder) == []
    # the in-memory state did not move ahead of the file
    assert store.trial_ids() == ["a"]
    monkeypatch.undo()
    store.upsert_trial(_trial("b", test_accuracy=0.9))
    assert ResultStore(store.folder).trial_ids() == ["a", "b"]


def test_failure_mid_write_removes_temp(
    store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.add_rounds("a", [{"round": 0, "loss": 1.0}])
    before = store.rounds_path.read_bytes()

    def half_write(table: pa.Table, where: Any, **kwargs: Any) -> None:
        where.write(b"PAR1 partial garbage")
        raise KeyboardInterrupt  # even a non-Exception interrupt cleans up

    monkeypatch.setattr(results.pq, "write_table", half_write)
    with pytest.raises(KeyboardInterrupt):
        store.add_rounds("b", [{"round": 0, "loss": 2.0}])
    assert store.rounds_path.read_bytes() == before
    assert _leftover_temps(store.folder) == []
    assert store.rounds()["trial_id"].tolist() == ["a"]


# ------------------------------------------------------------------------------------ resume


def test_reopen_loads_existing_rows(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    first = ResultStore(folder)
    first.upsert_trial(_trial("a", number=0, param_k=2, started_at=T0, test_accuracy=0.5))
    first.upsert_trial(_trial("b", number=1, defense="noise", param_sigma=0.1, test_accuracy=0.4))
    first.set_pareto({"a"})
    first.add_rounds("a", [{"round": 0, "loss": 1.0}])
    first.add_attacks("a", [_attack()])

    second = ResultStore(folder)
    pd.testing.assert_frame_equal(second.trials(), first.trials())
    pd.testing.assert_frame_equal(second.rounds(), first.rounds())
    pd.testing.assert_frame_equal(second.attacks(), first.attacks())

    # continuing after resume: replace one trial, add another, no duplicates, types kept
    second.upsert_trial(_trial("a", number=0, param_k=3, test_accuracy=0.6))
    second.upsert_trial(_trial("c", number=2, status="running"))
    second.add_rounds("a", [{"round": 0, "loss": 0.8}, {"round": 1, "loss": 0.7}])
    third = ResultStore(folder)
    df = third.trials()
    assert df["trial_id"].tolist() == ["a", "b", "c"]
    assert df["pareto"].tolist() == [True, False, False]
    assert df["param_k"].tolist()[0] == 3 and str(df["param_k"].dtype) == "Int64"
    assert third.rounds()["loss"].tolist() == [0.8, 0.7]
    assert len(third.attacks()) == 1


def test_empty_store_frames_have_fixed_columns(store: ResultStore) -> None:
    assert store.trials().columns.tolist() == TRIALS_FIXED_SCHEMA.names
    assert store.rounds().columns.tolist() == ["trial_id", "round"]
    assert store.attacks().columns.tolist() == ATTACKS_SCHEMA.names
    assert store.folder.is_dir()


def test_reopen_rejects_foreign_file(tmp_path: Path) -> None:
    pq.write_table(pa.table({"x": [1]}), tmp_path / "trials.parquet")
    with pytest.raises(ValueError, match="trial_id"):
        ResultStore(tmp_path)
