"""Study results as Parquet tables with explicit schemas and atomic writes.

A study's output folder holds three tables, each rewritten in full on every change by
:func:`write_parquet_atomic` (write ``<name>.parquet.tmp-<pid>`` in the same folder, ``fsync``,
``os.replace`` onto the final name, ``fsync`` the folder). A crash or an error mid-write leaves the
previous complete file; on an error the temporary file is removed and the error re-raised (only a
hard kill can leave a ``*.tmp-<pid>`` file behind; it is never read and may be deleted).
:class:`ResultStore` keeps the rows in memory, loads existing files when a study is resumed, and
changes its in-memory state only after the new file has been written.

**Nulls.** Non-finite floats (NaN, +inf, -inf) in metric and ``param_*`` columns are stored as
null, never as NaN: a diverged or missing metric is "no value", and Parquet readers disagree on
NaN ordering and equality. :meth:`ResultStore.trials` and friends return pandas frames in which
float64 nulls read back as NaN, int64 columns use pandas' nullable ``Int64`` and bool columns the
nullable ``boolean`` dtype (so an integer parameter that is null for other defenses stays an
integer), strings pandas' default string dtype and timestamps ``datetime64[us, UTC]``.

`trials.parquet` — one row per trial (never two rows with the same `trial_id`):

| column | type | nullable | meaning |
|---|---|---|---|
| `trial_id` | string | no | unique trial key (Ray Tune trial id) |
| `number` | int64 | no | Optuna trial number; -1 when unknown |
| `status` | string | no | `completed`, `failed` or `running` |
| `error` | string | yes | error message of a failed trial |
| `defense` | string | no | defense name (`none` = the undefended control) |
| `mlflow_run_id` | string | yes | MLflow run holding the trial's artefacts |
| `pareto` | bool | no | on the study's Pareto front (set by `set_pareto`) |
| `device` | string | yes | device the trial trained on (`cpu`, `cuda:0`) |
| `started_at` | timestamp[us, UTC] | yes | when the trial started |
| `finished_at` | timestamp[us, UTC] | yes | when the trial finished or failed |
| `param_<name>` | float64, int64, string or bool | yes | a sampled hyper-parameter; type inferred per column from its non-null values; null where it does not apply (other defenses) |
| `<metric>` | float64 | yes | any other key: a trial-level metric (e.g. `test_accuracy`, `attack_psnr_max`); NaN and ±inf stored as null |

Column order: the fixed columns above, then `param_*` sorted by name, then metrics sorted by name.

`rounds.parquet` — one row per (trial, FL round):

| column | type | nullable | meaning |
|---|---|---|---|
| `trial_id` | string | no | trial the round belongs to |
| `round` | int64 | no | FL round number (unique within a trial) |
| `<metric>` | float64 | yes | per-round metric, e.g. `train_loss`, `test_accuracy`, `test_balanced_accuracy`, `test_macro_f1`, `test_auroc`, `test_loss`, `seconds`; union of the keys over all rows, sorted by name; NaN and ±inf stored as null |

`attacks.parquet` — one row per reconstructed image:

| column | type | nullable | meaning |
|---|---|---|---|
| `trial_id` | string | no | trial whose FL run was attacked |
| `attack` | string | no | attack name (`idlg`, `inverting_gradients`, ...) |
| `round` | int64 | no | FL round of the attacked client message |
| `client` | int64 | no | attacked client index |
| `image_index` | int64 | no | index of the image within the client's batch |
| `<metric>` | per metric | per metric | one column per per-image metric of `attacks.scoring.table.METRICS`, in its order (`psnr`, `psnr_gain`, `prior_psnr`, `prior_ssim`, `prior_gain`, `ssim`, `lpips`, `id_rank`, `id_rank_lpips`, `identified`, `label_correct`); its type, nullability, meaning and schema version are declared there (the documentation's metric reference is generated from it) |
| `seconds` | float64 | no | wall-clock seconds of the attack on this batch |
| `diverged` | bool | no | the attack stopped on a NaN/inf (scored anyway) |

(`attack`, `round`, `client`, `image_index`) is unique within a trial.

**Schema versions.** Tables carry ``obscura.schema_version`` in their Parquet metadata (the
metric table's ``SCHEMA_VERSION``). Each metric says which version added its column (version 2
added `attacks.psnr_gain`, version 3 the population prior and identification columns). An older
`attacks.parquet` (without them) still loads, its rows read back with those columns null, and the
next write stores it in the current schema.
"""  # noqa: E501 (Markdown tables, one row per line)

from __future__ import annotations

import errno
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from attacks.scoring.table import METRICS, SCHEMA_VERSION, ImageMetric

__all__ = [
    "ATTACKS_FILE",
    "ATTACKS_SCHEMA",
    "ROUNDS_FILE",
    "ROUNDS_FIXED_FIELDS",
    "TRIALS_FILE",
    "TRIALS_FIXED_SCHEMA",
    "TRIAL_STATUSES",
    "ResultStore",
    "StudyIOError",
    "atomic_write",
    "attack_record",
    "write_parquet_atomic",
]

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.parquet"
"""File name of the per-trial table inside a study folder."""
ROUNDS_FILE = "rounds.parquet"
"""File name of the per-round table inside a study folder."""
ATTACKS_FILE = "attacks.parquet"
"""File name of the per-reconstructed-image table inside a study folder."""

TRIAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "running"})
"""Allowed values of ``trials.status``."""

PARAM_PREFIX = "param_"
"""Prefix marking a ``trials`` column as a sampled hyper-parameter."""

_TIMESTAMP = pa.timestamp("us", tz="UTC")

_TRIALS_FIXED_FIELDS: list[pa.Field[Any]] = [
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("number", pa.int64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string(), nullable=True),
    pa.field("defense", pa.string(), nullable=False),
    pa.field("mlflow_run_id", pa.string(), nullable=True),
    pa.field("pareto", pa.bool_(), nullable=False),
    pa.field("device", pa.string(), nullable=True),
    pa.field("started_at", _TIMESTAMP, nullable=True),
    pa.field("finished_at", _TIMESTAMP, nullable=True),
]
TRIALS_FIXED_SCHEMA: pa.Schema = pa.schema(_TRIALS_FIXED_FIELDS)
"""Fixed leading columns of ``trials.parquet``; ``param_*`` and metric columns follow."""

ROUNDS_FIXED_FIELDS: tuple[pa.Field[Any], ...] = (
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("round", pa.int64(), nullable=False),
)
"""Fixed leading columns of ``rounds.parquet``; nullable float64 metric columns follow."""

_ARROW_TYPES: dict[str, pa.DataType] = {
    "float64": pa.float64(),
    "int64": pa.int64(),
    "bool": pa.bool_(),
}

_ATTACKS_FIELDS: list[pa.Field[Any]] = [
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("attack", pa.string(), nullable=False),
    pa.field("round", pa.int64(), nullable=False),
    pa.field("client", pa.int64(), nullable=False),
    pa.field("image_index", pa.int64(), nullable=False),
    *(pa.field(m.name, _ARROW_TYPES[m.dtype], nullable=m.nullable) for m in METRICS),
    pa.field("seconds", pa.float64(), nullable=False),
    pa.field("diverged", pa.bool_(), nullable=False),
]
ATTACKS_SCHEMA: pa.Schema = pa.schema(_ATTACKS_FIELDS)
"""Complete schema of ``attacks.parquet`` (no dynamic columns): one column per metric of
:data:`attacks.scoring.table.METRICS`."""

_TABLE_METADATA: dict[bytes | str, bytes | str] = {
    b"obscura.schema_version": str(SCHEMA_VERSION).encode()
}


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


_WHAT_TO_DO = {
    errno.ENOSPC: "free space on its disk",
    errno.EDQUOT: "free space or raise your disk quota",
    errno.EACCES: "make its folder writable",
    errno.EPERM: "make its folder writable",
    errno.EROFS: "its file system is read-only; choose another --output",
}


class StudyIOError(OSError):
    """A study file cannot be read or written; the message is one line naming the file, the
    cause and what to do (``python -m orchestrator`` prints it and exits with status 1)."""

    @classmethod
    def about(cls, path: Path, err: BaseException, todo: str) -> StudyIOError:
        """The error for ``path`` failing with ``err``; ``todo`` is said unless the errno
        has a more precise remedy (a full disk: free space).

        Example:
            >>> str(StudyIOError.about(Path("t.parquet"), OSError(28, "No space left"), "retry"))
            't.parquet: No space left; free space on its disk'
        """
        number = getattr(err, "errno", None)
        why = getattr(err, "strerror", None) or str(err).splitlines()[0]
        remedy = _WHAT_TO_DO.get(number, todo) if isinstance(number, int) else todo
        return cls(f"{path}: {why}; {remedy}")


def _fsync_dir(folder: Path) -> None:
    """Flush a rename in ``folder`` to disk (POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write a file atomically: ``write`` fills ``<name>.tmp-<pid>`` beside ``path``, then rename.

    The temporary file is flushed and fsynced before ``os.replace`` puts it onto ``path``, so
    readers see either the previous complete file or the new one. On any error (including
    ``KeyboardInterrupt``) the temporary file is removed and the error re-raised; an
    ``OSError`` (a full disk, a read-only folder) as :class:`StudyIOError` naming ``path``.

    Args:
        path: the file to (re)write.
        write: fills the open binary file (what it returns is ignored).

    Raises:
        StudyIOError: the file cannot be written (the message names it and what to do).

    Example:
        >>> atomic_write(Path("out/notes.txt"), lambda fh: fh.write(b"done\\n"))  # doctest: +SKIP
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError as cleanup_error:
            logger.warning("could not remove temporary file %s: %s", tmp, cleanup_error)
        if isinstance(err, OSError) and not isinstance(err, StudyIOError):
            raise StudyIOError.about(path, err, "cannot write it") from err
        raise
    _fsync_dir(path.parent)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` as Parquet atomically (see :func:`atomic_write`)."""
    atomic_write(Path(path), lambda handle: pq.write_table(table, handle))


# --------------------------------------------------------------------------------------------
# Value normalisation
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Python scalar for a numpy scalar, None for a missing value; other values pass through.

    Missing values are None, ``pd.NA``, ``pd.NaT`` and float NaN, so a row taken from
    :meth:`ResultStore.trials` (``row.to_dict()``) can be upserted again as it is.
    """
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _is_int(value: Any) -> bool:
    """True for integers (Python or numpy), False for bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    """True for real numbers (Python or numpy), False for bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _float_or_null(value: Any, where: str) -> float | None:
    """A float metric value, with None, NaN and ±inf mapped to None (null)."""
    if value is None:
        return None
    if not _is_real(value):
        raise TypeError(
            f"{where}: expected a real number or None (metric columns are float64), "
            f"got {type(value).__name__} {value!r}"
        )
    out = float(value)
    return out if math.isfinite(out) else None


def _required_float(value: Any, where: str) -> float:
    """A finite float that must be present."""
    out = _float_or_null(value, where)
    if out is None:
        raise ValueError(f"{where}: a finite number is required, got {value!r} (null/NaN/inf)")
    return out


def _required_int(value: Any, where: str) -> int:
    """An integer that must be present (bools and floats are rejected)."""
    if not _is_int(value):
        raise TypeError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _int_or_null(value: Any, where: str) -> int | None:
    """An integer or None (bools and floats are rejected)."""
    return None if value is None else _required_int(value, where)


def _bool_or_null(value: Any, where: str, *, required: bool) -> bool | None:
    """A bool (Python or numpy), None allowed unless ``required``."""
    if value is None:
        if required:
            raise ValueError(f"{where}: a bool is required, got None")
        return None
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _str_or_null(value: Any, where: str, *, required: bool) -> str | None:
    """A string, None allowed unless ``required`` (then it must also be non-empty)."""
    if value is None:
        if required:
            raise ValueError(f"{where}: a string is required, got None")
        return None
    if not isinstance(value, str):
        raise TypeError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
    if required and not value:
        raise ValueError(f"{where}: must not be empty")
    return str(value)


def _timestamp_or_null(value: Any, where: str) -> datetime | None:
    """A UTC datetime from an aware datetime, pandas Timestamp, or POSIX seconds; None allowed."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value is pd.NaT:
            return None
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(
                f"{where}: naive datetime {value!r} is ambiguous; pass an aware datetime "
                "(e.g. datetime.now(timezone.utc)) or POSIX seconds"
            )
        moment: datetime = value.to_pydatetime() if isinstance(value, pd.Timestamp) else value
        return moment.astimezone(timezone.utc)
    if _is_real(value):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"{where}: POSIX seconds must be finite, got {value!r}")
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    raise TypeError(
        f"{where}: expected an aware datetime, POSIX seconds or None, "
        f"got {type(value).__name__} {value!r}"
    )


def _param_value(value: Any, where: str) -> Any:
    """A parameter value: bool, int, float (non-finite -> None), str or None."""
    value = _plain(value)
    if value is None or isinstance(value, (bool, str)) or _is_int(value):
        return value
    if _is_real(value):
        out = float(value)
        return out if math.isfinite(out) else None
    raise TypeError(
        f"{where}: parameter values must be bool, int, float, str or None, "
        f"got {type(value).__name__} {value!r}"
    )


def _param_type(name: str, values: Iterable[Any], previous: pa.DataType | None) -> pa.DataType:
    """Arrow type of a ``param_*`` column from its non-null values.

    All bools -> bool; all ints -> int64; ints and floats -> float64; all strings -> string. A
    column with no non-null value keeps its previously known type (float64 if none). Mixing
    strings or bools with other kinds raises ``TypeError`` (no silent lossy conversion).
    """
    kinds = set()
    for value in values:
        if value is None:
            continue
        if isinstance(value, bool):
            kinds.add("bool")
        elif isinstance(value, int):
            kinds.add("int")
        elif isinstance(value, float):
            kinds.add("float")
        else:
            kinds.add("str")
    if not kinds:
        return previous if previous is not None else pa.float64()
    if kinds == {"bool"}:
        return pa.bool_()
    if kinds == {"int"}:
        return pa.int64()
    if kinds <= {"int", "float"}:
        return pa.float64()
    if kinds == {"str"}:
        return pa.string()
    raise TypeError(
        f"column {name!r} mixes value kinds {sorted(kinds)}; a parameter column must hold only "
        "bools, only numbers or only strings"
    )


# --------------------------------------------------------------------------------------------
# Row normalisation per table
# --------------------------------------------------------------------------------------------

_TRIAL_FIXED_NAMES = tuple(TRIALS_FIXED_SCHEMA.names)
_ROUNDS_FIXED_NAMES = tuple(f.name for f in ROUNDS_FIXED_FIELDS)
_ATTACK_NAMES = tuple(ATTACKS_SCHEMA.names)
_ATTACK_ADDED = frozenset(m.name for m in METRICS if m.schema_version > 1)
"""``attacks.parquet`` columns added after schema version 1: older files lack them (read: null)."""
_ATTACK_OPTIONAL = frozenset(m.name for m in METRICS if m.nullable) | _ATTACK_ADDED


def _metric_value(metric: ImageMetric, value: Any, where: str) -> Any:
    """One image's value of ``metric`` in its stored type (None allowed where nullable)."""
    if metric.dtype == "float64":
        if metric.nullable:
            return _float_or_null(value, where)
        return _required_float(value, where)
    if metric.dtype == "int64":
        return _int_or_null(value, where) if metric.nullable else _required_int(value, where)
    return _bool_or_null(value, where, required=not metric.nullable)


def _normalise_trial(row: Mapping[str, Any], previous: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a trial row and convert its values to the stored Python types.

    A missing ``number`` becomes -1; a missing ``pareto`` keeps the previous row's flag (False
    for a new trial), so a status update does not drop the flag set by ``set_pareto``.
    """
    for key in row:
        if not isinstance(key, str):
            raise TypeError(f"trial column names must be strings, got {key!r}")
    row = {key: _plain(value) for key, value in row.items()}
    trial_id = _str_or_null(row.get("trial_id"), "trials.trial_id", required=True)
    where = f"trial {trial_id!r}"
    status = _str_or_null(row.get("status"), f"{where}: status", required=True)
    if status not in TRIAL_STATUSES:
        raise ValueError(f"{where}: status must be one of {sorted(TRIAL_STATUSES)}, got {status!r}")
    number = row.get("number")
    pareto = row.get("pareto", previous["pareto"] if previous is not None else False)
    out: dict[str, Any] = {
        "trial_id": trial_id,
        "number": -1 if number is None else _required_int(number, f"{where}: number"),
        "status": status,
        "error": _str_or_null(row.get("error"), f"{where}: error", required=False),
        "defense": _str_or_null(row.get("defense"), f"{where}: defense", required=True),
        "mlflow_run_id": _str_or_null(
            row.get("mlflow_run_id"), f"{where}: mlflow_run_id", required=False
        ),
        "pareto": _bool_or_null(pareto, f"{where}: pareto", required=True),
        "device": _str_or_null(row.get("device"), f"{where}: device", required=False),
        "started_at": _timestamp_or_null(row.get("started_at"), f"{where}: started_at"),
        "finished_at": _timestamp_or_null(row.get("finished_at"), f"{where}: finished_at"),
    }
    for key, value in row.items():
        if key in out:
            continue
        if key.startswith(PARAM_PREFIX):
            out[key] = _param_value(value, f"{where}: {key}")
        else:
            out[key] = _float_or_null(value, f"{where}: {key}")
    return out


def _normalise_round(trial_id: str, row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Validate one ``rounds`` row of ``trial_id``; every other key is a float64 metric."""
    where = f"rounds of trial {trial_id!r}, row {index}"
    for key in row:
        if not isinstance(key, str):
            raise TypeError(f"{where}: column names must be strings, got {key!r}")
    row = {key: _plain(value) for key, value in row.items()}
    if "trial_id" in row and row["trial_id"] != trial_id:
        raise ValueError(f"{where}: trial_id {row['trial_id']!r} differs from {trial_id!r}")
    if "round" not in row:
        raise ValueError(f"{where}: 'round' is required")
    out: dict[str, Any] = {
        "trial_id": trial_id,
        "round": _required_int(row["round"], f"{where}: round"),
    }
    for key, value in row.items():
        if key not in out:
            out[key] = _float_or_null(value, f"{where}: {key}")
    return out


def _normalise_attack(trial_id: str, row: Mapping[str, Any], index: int) -> dict[str, Any]:
    """Validate one ``attacks`` row of ``trial_id`` against :data:`ATTACKS_SCHEMA`."""
    where = f"attacks of trial {trial_id!r}, row {index}"
    row = {key: _plain(value) for key, value in row.items()}
    if "trial_id" in row and row["trial_id"] != trial_id:
        raise ValueError(f"{where}: trial_id {row['trial_id']!r} differs from {trial_id!r}")
    unknown = set(row) - set(_ATTACK_NAMES)
    if unknown:
        raise ValueError(
            f"{where}: unknown columns {sorted(map(str, unknown))}; attacks.parquet has the fixed "
            f"columns {list(_ATTACK_NAMES)}"
        )
    missing = [n for n in _ATTACK_NAMES[1:] if n not in row and n not in _ATTACK_OPTIONAL]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}")
    get = row.get
    return {
        "trial_id": trial_id,
        "attack": _str_or_null(get("attack"), f"{where}: attack", required=True),
        "round": _required_int(get("round"), f"{where}: round"),
        "client": _required_int(get("client"), f"{where}: client"),
        "image_index": _required_int(get("image_index"), f"{where}: image_index"),
        **{m.name: _metric_value(m, get(m.name), f"{where}: {m.name}") for m in METRICS},
        "seconds": _required_float(get("seconds"), f"{where}: seconds"),
        "diverged": _bool_or_null(get("diverged"), f"{where}: diverged", required=True),
    }


def attack_record(
    attack: str,
    round_index: int,
    client: int,
    image: Mapping[str, Any],
    *,
    seconds: float,
    diverged: bool,
) -> dict[str, Any]:
    """One ``attacks.parquet`` row without its ``trial_id``, in the columns of
    :data:`ATTACKS_SCHEMA`, from one scored image (an entry of
    :func:`attacks.scoring.metrics.score`'s ``per_image``)."""
    values: dict[str, Any] = {
        "attack": attack,
        "round": round_index,
        "client": client,
        "image_index": int(image["index"]),
        **{m.name: _record_value(m, image.get(m.name)) for m in METRICS},
        "seconds": seconds,
        "diverged": bool(diverged),
    }
    return {name: values[name] for name in _ATTACK_NAMES[1:]}


def _record_value(metric: ImageMetric, value: Any) -> Any:
    """A scored image's value of ``metric`` as its Python type (None stays None)."""
    if value is None:
        return None
    return {"float64": float, "int64": int, "bool": bool}[metric.dtype](value)


def _check_unique(rows: Sequence[Mapping[str, Any]], key: Sequence[str], where: str) -> None:
    """Raise ``ValueError`` if two rows share the same values of the ``key`` columns."""
    seen: set[tuple[Any, ...]] = set()
    for row in rows:
        k = tuple(row[c] for c in key)
        if k in seen:
            raise ValueError(f"{where}: duplicate row for {dict(zip(key, k, strict=True))}")
        seen.add(k)


# --------------------------------------------------------------------------------------------
# Table building
# --------------------------------------------------------------------------------------------


def _build_table(
    rows: Sequence[Mapping[str, Any]],
    fields: Sequence[pa.Field[Any]],
    types: Mapping[str, pa.DataType],
) -> pa.Table:
    """An Arrow table with ``fields`` followed by the dynamic columns in ``types`` (in order)."""
    schema = pa.schema(
        [*fields, *(pa.field(name, t, nullable=True) for name, t in types.items())],
        metadata=_TABLE_METADATA,
    )
    arrays = [pa.array([row.get(field.name) for row in rows], type=field.type) for field in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def _trials_table(rows: Sequence[Mapping[str, Any]], known: Mapping[str, pa.DataType]) -> pa.Table:
    """``trials.parquet`` table for normalised rows; ``known`` holds previously written types."""
    names = {k for row in rows for k in row} - set(_TRIAL_FIXED_NAMES)
    params = sorted(n for n in names if n.startswith(PARAM_PREFIX))
    metrics = sorted(n for n in names if not n.startswith(PARAM_PREFIX))
    types: dict[str, pa.DataType] = {
        p: _param_type(p, (row.get(p) for row in rows), known.get(p)) for p in params
    }
    types.update({m: pa.float64() for m in metrics})
    return _build_table(rows, list(TRIALS_FIXED_SCHEMA), types)


def _rounds_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """``rounds.parquet`` table for normalised rows (metric columns: union of keys, sorted)."""
    metrics = sorted({k for row in rows for k in row} - set(_ROUNDS_FIXED_NAMES))
    return _build_table(rows, ROUNDS_FIXED_FIELDS, {m: pa.float64() for m in metrics})


def _attacks_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """``attacks.parquet`` table for normalised rows."""
    return _build_table(rows, list(ATTACKS_SCHEMA), {})


def _check_fixed(table: pa.Table, fields: Sequence[pa.Field[Any]], path: Path) -> None:
    """Raise ``ValueError`` if a loaded table lacks a fixed column or has it with another type."""
    for field in fields:
        if field.name not in table.column_names:
            raise ValueError(f"{path}: missing column {field.name!r}; not an Obscura results table")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise ValueError(
                f"{path}: column {field.name!r} has type {actual}, expected {field.type}"
            )


def _with_added_columns(table: pa.Table, schema: pa.Schema, added: frozenset[str]) -> pa.Table:
    """``table`` in ``schema``'s column order, each column of ``added`` it lacks filled with
    nulls (a file written before those columns existed); other columns are left to
    :func:`_check_fixed`."""
    missing = [f for f in schema if f.name in added and f.name not in table.column_names]
    if not missing:
        return table
    for field in missing:
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    order = [n for n in schema.names if n in table.column_names]
    return table.select(order + [n for n in table.column_names if n not in order])


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Table as a DataFrame: int64 -> ``Int64``, bool -> ``boolean``, float64 nulls -> NaN."""

    def mapper(arrow_type: pa.DataType) -> Any:
        if pa.types.is_int64(arrow_type):
            return pd.Int64Dtype()
        if pa.types.is_boolean(arrow_type):
            return pd.BooleanDtype()
        return None

    return table.to_pandas(types_mapper=mapper)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


class ResultStore:
    """The three result tables of one study folder, kept in memory and rewritten atomically.

    Every mutating call validates its rows, builds the new table, writes it atomically and only
    then updates the in-memory state, so a failed write leaves both the file and the store as
    they were. Opening a folder with existing files loads them (resume). Methods are guarded by a
    lock so callbacks on several threads can share one store; one process should own a folder.
    """

    def __init__(self, folder: Path, *, read_only: bool = False) -> None:
        """Create ``folder`` if needed and load any existing ``trials``/``rounds``/``attacks``.

        ``read_only`` (the report): the folder is not created and every write raises
        ``PermissionError``. A file that cannot be read (truncated, corrupt, not Parquet)
        raises :class:`StudyIOError` naming it."""
        self.folder = Path(folder)
        self.read_only = read_only
        if not read_only:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._trials: dict[str, dict[str, Any]] = {}
        self._rounds: dict[str, list[dict[str, Any]]] = {}
        self._attacks: dict[str, list[dict[str, Any]]] = {}
        self._param_types: dict[str, pa.DataType] = {}
        self._trials_table = _trials_table([], {})
        self._rounds_table = _rounds_table([])
        self._attacks_table = _attacks_table([])
        self._load()

    @property
    def trials_path(self) -> Path:
        """Path of ``trials.parquet``."""
        return self.folder / TRIALS_FILE

    @property
    def rounds_path(self) -> Path:
        """Path of ``rounds.parquet``."""
        return self.folder / ROUNDS_FILE

    @property
    def attacks_path(self) -> Path:
        """Path of ``attacks.parquet``."""
        return self.folder / ATTACKS_FILE

    def _read(self, path: Path) -> pa.Table:
        """A stored table; an unreadable file is one :class:`StudyIOError` naming it."""
        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise StudyIOError.about(
                path,
                err,
                "the file is truncated or corrupt: restore it from a backup, or move the "
                "study folder away and start the study again",
            ) from err

    def _writable(self) -> None:
        if self.read_only:
            raise PermissionError(f"{self.folder}: this ResultStore was opened read-only")

    def _load(self) -> None:
        """Read existing tables (resume); values come back as the Python types stored."""
        if self.trials_path.exists():
            table = self._read(self.trials_path)
            _check_fixed(table, list(TRIALS_FIXED_SCHEMA), self.trials_path)
            rows = table.to_pylist()
            _check_unique(rows, ["trial_id"], str(self.trials_path))
            self._trials = {row["trial_id"]: row for row in rows}
            self._param_types = {
                f.name: f.type for f in table.schema if f.name.startswith(PARAM_PREFIX)
            }
            self._trials_table = table
        if self.rounds_path.exists():
            table = self._read(self.rounds_path)
            _check_fixed(table, ROUNDS_FIXED_FIELDS, self.rounds_path)
            self._rounds = _group(table.to_pylist())
            self._rounds_table = table
        if self.attacks_path.exists():
            table = self._read(self.attacks_path)
            table = _with_added_columns(table, ATTACKS_SCHEMA, _ATTACK_ADDED)
            _check_fixed(table, list(ATTACKS_SCHEMA), self.attacks_path)
            self._attacks = _group(table.to_pylist())
            self._attacks_table = table

    def upsert_trial(self, row: Mapping[str, Any]) -> None:
        """Insert a trial row or replace the row with the same ``trial_id``; rewrite the file.

        The row replaces the previous one entirely (keys it omits become null), except that a
        missing ``pareto`` keeps the previous flag. Required keys: ``trial_id``, ``status``,
        ``defense``; see the module docstring for every column.
        """
        with self._lock:
            trial_id = row.get("trial_id")
            previous = self._trials.get(trial_id) if isinstance(trial_id, str) else None
            new = _normalise_trial(row, previous)
            trials = dict(self._trials)
            trials[new["trial_id"]] = new
            self._write_trials(trials)

    def set_pareto(self, trial_ids: set[str]) -> None:
        """Flag exactly ``trial_ids`` as on the Pareto front (all others False); rewrite.

        Raises ``KeyError`` naming any id that is not a known trial.
        """
        with self._lock:
            unknown = set(trial_ids) - set(self._trials)
            if unknown:
                raise KeyError(f"set_pareto: unknown trial ids {sorted(unknown)}")
            trials = {tid: {**row, "pareto": tid in trial_ids} for tid, row in self._trials.items()}
            self._write_trials(trials)

    def set_derived(self, accuracy_drop: Mapping[str, float], pareto: set[str]) -> None:
        """In one write: ``accuracy_drop`` of the trials named (others keep theirs) and the
        Pareto flags (exactly ``pareto`` True, all others False).

        Raises ``KeyError`` naming any id that is not a known trial.
        """
        with self._lock:
            unknown = (set(accuracy_drop) | set(pareto)) - set(self._trials)
            if unknown:
                raise KeyError(f"set_derived: unknown trial ids {sorted(unknown)}")
            trials = {}
            for tid, row in self._trials.items():
                changes: dict[str, Any] = {"pareto": tid in pareto}
                if tid in accuracy_drop:
                    changes["accuracy_drop"] = float(accuracy_drop[tid])
                trials[tid] = _normalise_trial({**row, **changes}, row)
            self._write_trials(trials)

    def _write_trials(self, trials: dict[str, dict[str, Any]]) -> None:
        """Write ``trials`` and, once written, make it the in-memory state."""
        self._writable()
        table = _trials_table(list(trials.values()), self._param_types)
        write_parquet_atomic(table, self.trials_path)
        self._trials = trials
        self._trials_table = table
        self._param_types = {
            f.name: f.type for f in table.schema if f.name.startswith(PARAM_PREFIX)
        }

    def add_rounds(self, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replace all ``rounds`` rows of ``trial_id`` with ``rows`` and rewrite the file.

        Each row needs ``round`` (int, unique within the trial); every other key is a float64
        metric (NaN/inf -> null). A ``trial_id`` key, if present, must equal ``trial_id``. An
        empty ``rows`` removes the trial's rounds.
        """
        with self._lock:
            self._writable()
            _str_or_null(trial_id, "add_rounds: trial_id", required=True)
            new = [_normalise_round(trial_id, r, i) for i, r in enumerate(rows)]
            _check_unique(new, ["round"], f"rounds of trial {trial_id!r}")
            grouped = _replace(self._rounds, trial_id, new)
            table = _rounds_table(_flatten(grouped))
            write_parquet_atomic(table, self.rounds_path)
            self._rounds = grouped
            self._rounds_table = table

    def add_attacks(self, trial_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replace all ``attacks`` rows of ``trial_id`` with ``rows`` and rewrite the file.

        Rows must have exactly the columns of :data:`ATTACKS_SCHEMA` (``lpips``,
        ``label_correct`` and ``psnr_gain`` may be omitted: null); (``attack``, ``round``,
        ``client``, ``image_index``) must be unique. An empty ``rows`` removes the trial's
        attacks.
        """
        with self._lock:
            self._writable()
            _str_or_null(trial_id, "add_attacks: trial_id", required=True)
            new = [_normalise_attack(trial_id, r, i) for i, r in enumerate(rows)]
            _check_unique(
                new, ["attack", "round", "client", "image_index"], f"attacks of trial {trial_id!r}"
            )
            grouped = _replace(self._attacks, trial_id, new)
            table = _attacks_table(_flatten(grouped))
            write_parquet_atomic(table, self.attacks_path)
            self._attacks = grouped
            self._attacks_table = table

    def remove_trials(self, trial_ids: Sequence[str]) -> None:
        """Drop the rows of ``trial_ids`` from all three tables (a resumed study re-runs the
        trials a killed driver left ``running``); rewrite what changed."""
        with self._lock:
            ids = [t for t in trial_ids if t in self._trials]
            if not ids:
                return
            for tid in ids:
                self.add_rounds(tid, [])
                self.add_attacks(tid, [])
            self._write_trials({k: v for k, v in self._trials.items() if k not in ids})

    def trials(self) -> pd.DataFrame:
        """All trials, one row each, in first-insertion order (dtypes: see module docstring)."""
        with self._lock:
            return _to_pandas(self._trials_table)

    def rounds(self) -> pd.DataFrame:
        """All per-round rows, grouped by trial in first-insertion order."""
        with self._lock:
            return _to_pandas(self._rounds_table)

    def attacks(self) -> pd.DataFrame:
        """All per-image attack rows, grouped by trial in first-insertion order."""
        with self._lock:
            return _to_pandas(self._attacks_table)

    def trial_ids(self) -> list[str]:
        """Ids of all stored trials in first-insertion order."""
        with self._lock:
            return list(self._trials)


def _group(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by ``trial_id`` (order of first appearance kept)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["trial_id"], []).append(row)
    return out


def _replace(
    grouped: Mapping[str, list[dict[str, Any]]], trial_id: str, rows: list[dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """A copy of ``grouped`` with ``trial_id``'s rows replaced (dropped when ``rows`` is empty)."""
    out = dict(grouped)
    if rows:
        out[trial_id] = rows
    else:
        out.pop(trial_id, None)
    return out


def _flatten(grouped: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """All rows of a grouped table in group order."""
    return [row for rows in grouped.values() for row in rows]
