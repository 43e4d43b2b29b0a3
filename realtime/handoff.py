"""Sessions handed from a server that shuts down to the next one, through a private folder.

On SIGTERM a server started with ``--resume-dir`` drains, then writes each session (its streams,
their recurrent and post-processing state, the frames a resume may need) to one file named by a
hash of its resume token; the next server process given the same folder takes a file when its
client resumes with that token (within ``resume_seconds`` of the hand-off). The files are
pickles of the server's own objects, so the folder must be the server's alone: it is created
0700 and refused when another user could write to it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realtime import errors
from realtime.models.repository import ModelRepository
from realtime.models.spec import Model
from realtime.session import Session

SUFFIX = ".session"


@dataclass(slots=True)
class HandedOff:
    """One session as a server leaves it: what a resume on the next server needs."""

    session: Session
    key: str | None  # the API key it was admitted with
    expires_at: float  # Unix seconds
    written: int  # frames written (or queued) on it since it began
    first: int  # index of its first frame after the welcome
    kept: list[tuple[bytes, bool, int]]  # the last frames, oldest first, to send again


def check_dir(folder: Path) -> None:
    """Create the folder (0700) or check that only this user can write to it."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise errors.ConfigError(
            f"--resume-dir {folder} must belong to this user and not be writable by others"
        )


def _path(folder: Path, token: str) -> Path:
    return folder / (hashlib.sha256(token.encode()).hexdigest()[:40] + SUFFIX)


class _Pickler(pickle.Pickler):
    """Models and the repository are named, not written: the next server has its own."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Model):
            return ("model", obj.name, obj.version)
        if isinstance(obj, ModelRepository):
            return ("repository",)
        return None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, repository: ModelRepository) -> None:
        super().__init__(file)
        self._repository = repository

    def persistent_load(self, pid: Any) -> Any:
        if pid == ("repository",):
            return self._repository
        kind, name, version = pid
        model = self._repository.get(name, version)
        if kind != "model" or model is None:
            raise errors.ResumeUnknown(f"model {name}@{version} is not served here")
        return model


def dump(entry: HandedOff) -> bytes:
    """One session as bytes (call on the event loop: the session is the loop's)."""
    out = io.BytesIO()
    _Pickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(entry)
    return out.getvalue()


def write(folder: Path, token: str, data: bytes) -> None:
    """Write one session's file (0600), whole or not at all."""
    path = _path(folder, token)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def take(folder: Path, token: str) -> bytes | None:
    """Claim a session's file (only one server can) and return its bytes; None if absent."""
    path = _path(folder, token)
    claimed = path.with_suffix(f".taken-{os.getpid()}")
    try:
        path.rename(claimed)
    except FileNotFoundError:
        return None
    try:
        return claimed.read_bytes()
    finally:
        claimed.unlink(missing_ok=True)


def load(data: bytes, repository: ModelRepository, now: float | None = None) -> HandedOff:
    """A handed-off session, bound to this server's models; raises if it expired or one of
    its models is not served here."""
    entry = _Unpickler(io.BytesIO(data), repository).load()
    if not isinstance(entry, HandedOff):
        raise errors.ResumeUnknown("not a handed-off session")
    if (time.time() if now is None else now) > entry.expires_at:
        raise errors.ResumeExpired("the session expired before it was resumed")
    return entry


def sweep(folder: Path, max_age: float) -> int:
    """Delete session files older than ``max_age`` seconds (left by a client that never came
    back); returns how many."""
    gone = 0
    cutoff = time.time() - max_age
    for path in folder.glob("*" + SUFFIX):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                gone += 1
        except FileNotFoundError:
            continue
    return gone
