"""Content hashing, atomic writes and stage directories.

A *stage* writes its outputs into a private temporary directory next to its final
place and, once everything is written and hashed, renames that directory into
place and writes ``stage.json`` (key, options, per-file SHA-256) last. A stage is
reused only when ``stage.json`` exists, its key matches and every file hashes to
the recorded digest, so an interrupted or corrupted stage is rebuilt, never used.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from core.errors import ArtifactError, LockedError

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def stable_hash(*parts: Any) -> str:
    """SHA-256 of a JSON rendering of ``parts`` (dict keys sorted), as hex."""
    blob = json.dumps(parts, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"cannot hash object of type {type(obj).__name__}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {sha256, bytes}}`` for every regular file under ``root`` except stage.json."""
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != STAGE_FILE:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def verify_tree(root: Path, files: dict[str, dict[str, Any]]) -> str | None:
    """Return ``None`` when every recorded file is present and intact, else why not."""
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{p} has {p.stat().st_size} bytes, expected {meta['bytes']}"
        if sha256_file(p) != meta["sha256"]:
            return f"{p} does not match its recorded SHA-256"
    return None


@dataclass
class StageRecord:
    """What ``stage.json`` holds."""

    stage: str
    key: str
    options: dict[str, Any]
    files: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "key": self.key,
            "options": self.options,
            "files": self.files,
            "info": self.info,
            "seconds": self.seconds,
            "created": self.created,
        }


@dataclass
class StageOutcome:
    record: StageRecord
    path: Path
    reused: bool


def read_stage(path: Path) -> StageRecord | None:
    f = Path(path) / STAGE_FILE
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
        return StageRecord(**d)
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable %s: %s", f, exc)
        return None


def check_stage(path: Path, key: str) -> tuple[StageRecord | None, str]:
    """(record, "") when the stage at ``path`` is finished with ``key`` and intact, else (None, why)."""
    rec = read_stage(path)
    if rec is None:
        return None, "not built yet"
    if rec.key != key:
        return None, "inputs or options changed"
    problem = verify_tree(Path(path), rec.files)
    if problem:
        return None, f"corrupt: {problem}"
    return rec, ""


def run_stage(
    path: Path,
    stage: str,
    key: str,
    options: dict[str, Any],
    build: Callable[[Path], dict[str, Any] | None],
) -> StageOutcome:
    """Reuse the stage at ``path`` if finished with ``key`` and intact; else build it atomically.

    ``build(tmp_dir)`` writes every output into ``tmp_dir`` and may return an info
    dict that is stored in ``stage.json``.
    """
    path = Path(path)
    rec, why = check_stage(path, key)
    if rec is not None:
        log.info("%s: reusing finished stage (%s)", stage, path)
        return StageOutcome(rec, path, reused=True)
    log.info("%s: building (%s)", stage, why)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    t0 = time.perf_counter()
    try:
        info = build(tmp) or {}
        seconds = time.perf_counter() - t0
        rec = StageRecord(stage, key, options, hash_tree(tmp), info, round(seconds, 3), time.time())
        atomic_write_json(tmp / STAGE_FILE, rec.to_dict())
        if path.exists():
            old = path.parent / f".{path.name}.tmp-old-{os.getpid()}"
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, path)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous result at {path} is kept" if path.exists() else "nothing was written there"
            raise ArtifactError(f"{stage}: no space left on the device while writing ({exc}); {kept}. Free some space and run again.") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: done in %.1f s", stage, seconds)
    return StageOutcome(rec, path, reused=False)


def load_stage(path: Path) -> StageRecord:
    rec = read_stage(path)
    if rec is None:
        raise ArtifactError(f"stage directory {path} has no readable {STAGE_FILE}")
    return rec


@contextmanager
def file_lock(path: Path, what: str, wait: bool) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the duration.

    The lock is an ``flock`` on the file, taken atomically by the kernel and released by it when the
    holder exits for any reason (SIGKILL included), so a lock file left by a dead process is simply
    taken over. The holder writes its PID into the file, which is how a refusal names it. With
    ``wait=False`` a held lock raises :class:`LockedError`; with ``wait=True`` this waits for it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(path)
            if not wait:
                raise LockedError(f"{what} is in use by another process (PID {holder}, lock file {path}); wait for it to finish or use another directory") from None
            log.info("waiting for %s (held by PID %s)", what, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the file stays (removing it would race with a waiter)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"
