"""The victims' private images on disk: owner-only folders and checkpoints deleted on every exit.

A trial's round checkpoints (``ray/<run>/<trial>/checkpoint_*/simulator.pt``) hold the
captured client updates and the victims' ground-truth images (the attacks are scored against
them), and Ray Tune's ``error.pkl`` of a failed trial is a pickled exception that may hold
tensors. :func:`purge_private` deletes both under a study's ``ray/`` folder: the driver calls it
when the Tune run ends, however it ends (completion, error, Ctrl-C), and a resume calls it first
for the earlier runs a killed driver left behind. The folders that may hold such files
(``ray/``, ``images/``) are created readable by their owner only (:func:`private_dir`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from orchestrator.results import StudyIOError

PRIVATE_MODE = 0o700
"""Mode of the folders that may hold private images: the owner only."""

CHECKPOINT_GLOB = "checkpoint_*"
"""Ray Tune's round-checkpoint folders inside a trial folder."""

PICKLED_ERROR = "error.pkl"
"""Ray Tune's pickled exception of a failed trial (its text stays in ``error.txt``)."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it readable by its owner only (``0o700``).

    Args:
        path: the folder.

    Raises:
        StudyIOError: it cannot be created or its mode set (the message names it).

    Example:
        >>> private_dir(Path("results/quickstart/ray"))  # doctest: +SKIP
        PosixPath('results/quickstart/ray')
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, PRIVATE_MODE)  # mkdir's mode is reduced by the umask; chmod is not
    except OSError as err:
        raise StudyIOError.about(path, err, "create it readable by you only") from err
    return path


def private_files(root: Path) -> list[Path]:
    """Every round-checkpoint folder and pickled trial error under ``root``."""
    if not root.is_dir():
        return []
    found = [p for p in root.rglob(CHECKPOINT_GLOB) if p.is_dir()]
    found += [p for p in root.rglob(PICKLED_ERROR) if p.is_file()]
    return sorted(found)


def purge_private(root: Path) -> list[Path]:
    """Delete every round checkpoint and pickled trial error under ``root`` (a study's
    ``ray/`` folder, or one trial's folder) and redact the tensors printed in Ray's
    ``error.txt`` files; return what was deleted.

    Args:
        root: the folder to clean (missing: nothing to do).

    Raises:
        StudyIOError: a file could not be deleted (the message names it).

    Example:
        >>> purge_private(Path("results/quickstart/ray"))  # doctest: +SKIP
        [PosixPath('results/quickstart/ray/quickstart-0/_trainable_1/checkpoint_000001')]
    """
    removed = private_files(root)
    redact_error_files(root)
    for path in removed:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            raise StudyIOError.about(
                path, err, "delete it by hand: it holds the victims' private images"
            ) from err
    return removed


ERROR_TEXT = "error.txt"
"""Ray Tune's text of a failed trial's exception (kept, its tensor values redacted)."""

_ARRAY_OPENERS = ("tensor(", "array(")


def redact_tensors(text: str) -> str:
    """``text`` with the values of every printed tensor or array (``tensor(...)``,
    ``array(...)``) replaced by ``<values withheld>``: an exception message that prints a
    tensor would otherwise carry pixels of the victims' images into error columns and tags.

    Example:
        >>> redact_tensors("bad input tensor([[0.1, 0.2], [0.3, 0.4]]) here")
        'bad input tensor(<values withheld>) here'
    """
    out, i = [], 0
    while True:
        starts = [(text.find(o, i), o) for o in _ARRAY_OPENERS]
        starts = [(k, o) for k, o in starts if k >= 0]
        if not starts:
            out.append(text[i:])
            return "".join(out)
        k, opener = min(starts)
        depth, j = 1, k + len(opener)
        while j < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        out.append(text[i:k] + opener + "<values withheld>)")
        i = j


def redact_error_files(root: Path) -> None:
    """Rewrite every Ray Tune ``error.txt`` under ``root`` with :func:`redact_tensors`.

    Raises:
        StudyIOError: a file could not be rewritten.
    """
    if not root.is_dir():
        return
    for path in root.rglob(ERROR_TEXT):
        try:
            text = path.read_text(errors="replace")
            clean = redact_tensors(text)
            if clean != text:
                path.write_text(clean)
        except OSError as err:
            raise StudyIOError.about(path, err, "delete it by hand") from err


def drop_trial_images(images: Path, trial_ids: Iterable[str]) -> None:
    """Delete the image folders (``images/<trial_id>``) of trials a resume drops.

    Args:
        images: the study's ``images/`` folder.
        trial_ids: the dropped trials.

    Raises:
        StudyIOError: a folder could not be deleted.

    Example:
        >>> drop_trial_images(Path("results/quickstart/images"), ["a1b2c3d4"])  # doctest: +SKIP
    """
    for trial_id in trial_ids:
        folder = images / trial_id
        if folder.parent != images:  # a trial id is a Ray Tune id; never a path
            raise ValueError(f"not a trial id: {trial_id!r}")
        if folder.is_dir():
            try:
                shutil.rmtree(folder)
            except OSError as err:
                raise StudyIOError.about(folder, err, "delete it by hand") from err
