"""One driver per study folder: an exclusive ``flock`` on ``<folder>/.obscura.lock``.

Two drivers on one folder would each take the other's live trials for interrupted ones (drop
their rows, delete their MLflow runs, fail their Optuna trials). The driver therefore holds an
exclusive, non-blocking ``fcntl.flock`` on a lock file for the whole study and writes who it is
into that file (pid, host, start time, JSON). The kernel releases a ``flock`` when its holder
dies, even by SIGKILL, so a lock file that still names a holder but can be locked is stale: on
this host it is taken over with a warning line; a holder on another host cannot be checked from
here, so that case is refused and the message says how to clear it. The file is emptied, never
deleted, on release (deleting it would let two drivers lock two different files).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from orchestrator.results import StudyIOError

LOCK_FILE = ".obscura.lock"
"""Name of the lock file inside a study folder."""


class FolderLockedError(RuntimeError):
    """Another driver holds the study folder (the message names it: pid, host, start time)."""


def _describe(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


def _read_holder(handle: IO[str]) -> dict[str, Any]:
    """The holder the lock file names ({} when it is empty or not JSON)."""
    handle.seek(0)
    text = handle.read().strip()
    if not text:
        return {}
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": f"(unreadable lock file: {text[:60]!r})"}
    return holder if isinstance(holder, dict) else {}


class StudyLock:
    """The exclusive lock on a study folder, as a context manager.

    Args:
        folder: the study's output folder (created if missing).

    Raises:
        FolderLockedError: another live driver holds it, or a holder on another host is recorded.
        StudyIOError: the lock file cannot be created or locked (the message names it).

    Example:
        >>> with StudyLock(Path("results/quickstart")):  # doctest: +SKIP
        ...     run_the_study()
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock (see the class); a stale one on this host is taken over."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise StudyIOError.about(self.path, err, "cannot create the lock file") from err
        handle = os.fdopen(fd, "r+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            handle.close()
            raise FolderLockedError(
                f"{self.folder} is in use by another study driver ({_describe(holder)}); wait "
                "for it to finish or stop it, then run again"
            ) from None
        except OSError as err:  # e.g. ENOLCK: a file system without locks
            handle.close()
            raise StudyIOError.about(
                self.path, err, "its file system cannot lock files; choose another --output"
            ) from err
        try:
            self._take_over(_read_holder(handle))
        except BaseException:
            handle.close()
            raise
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(me) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle

    def _take_over(self, holder: dict[str, Any]) -> None:
        """A holder recorded in a lock nobody holds: its driver died (here) or is elsewhere."""
        if not holder:
            return
        if holder.get("host") != socket.gethostname():
            raise FolderLockedError(
                f"{self.folder} names another study driver ({_describe(holder)}) that cannot be "
                f"checked from this host; if it has ended, delete {self.path} and run again"
            )
        print(
            f"[obscura] warning: taking over the stale lock of {self.folder} "
            f"({_describe(holder)}; that driver is no longer running)",
            file=sys.stderr,
            flush=True,
        )

    def release(self) -> None:
        """Empty the lock file and release the lock (no-op when not held)."""
        handle, self._handle = self._handle, None
        if handle is None:
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.flush()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
