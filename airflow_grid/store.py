"""Content-addressed storage on fsspec: candidate results, plans and data snapshots.

Layout under the root (a local directory by default, any fsspec URL in production)::

    results/<key[:2]>/<key>.json      one candidate's result; written once, atomically
    plans/<plan_id>/plan.json         the plan: spec, candidates with keys, fold and data fingerprints
    plans/<plan_id>/X.npy|X.parquet   search data snapshot (and y.npy, X_holdout.*, y_holdout.npy)
    plans/<plan_id>/folds.npz         the fold index manifest
    plans/<plan_id>/fit_params.npz    the spec's fit_params over the search data (and fit_params_holdout.npz)

Writes are atomic (temporary file, fsync, rename locally; a single PUT on object stores), so a reader never sees a
partial result and a retried task either finds a complete result or none. Reads verify anyway: a result that does
not parse or names another key (a disk fault, a hand edit) is moved to ``quarantine/`` and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

STORE_ENV = "AIRFLOW_GRID_STORE"
QUARANTINE_DIR = "quarantine"
IN_USE_FILE = "in_use"

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def default_root() -> str:
    """``$AIRFLOW_GRID_STORE``, else ``$AIRFLOW_HOME/airflow_grid`` (``~/airflow`` as Airflow defaults)."""
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    airflow_home = os.environ.get("AIRFLOW_HOME") or str(Path.home() / "airflow")
    return str(Path(airflow_home) / "airflow_grid")


class Store:
    """A directory of immutable, content-addressed files."""

    def __init__(self, root: str | None = None) -> None:
        self.root = (root or default_root()).rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def url(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _path(self, relative: str) -> str:
        return f"{self._root_path}/{relative}"

    def result_path(self, key: str) -> str:
        return f"results/{key[:2]}/{key}.json"

    def plan_dir(self, plan_id: str) -> str:
        return f"plans/{plan_id}"

    def exists(self, relative: str) -> bool:
        return bool(self.fs.exists(self._path(relative)))

    def write_bytes(self, relative: str, payload: bytes) -> None:
        path = self._path(relative)
        if self.is_local:
            directory = os.path.dirname(path)
            os.makedirs(directory, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{uuid.uuid4().hex}.")
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(payload)
                    out.flush()
                    os.fsync(out.fileno())  # on disk before the rename: a crash cannot leave a named, empty file
                os.chmod(temporary, _FILE_MODE)  # mkstemp makes 0600; pods running as another user must read it
                os.replace(temporary, path)
                _fsync_directory(directory)
            except BaseException:
                if os.path.exists(temporary):
                    os.unlink(temporary)
                raise
        else:
            self.fs.pipe_file(path, payload)

    def read_bytes(self, relative: str) -> bytes:
        return bytes(self.fs.cat_file(self._path(relative)))

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, json.dumps(value, allow_nan=True, sort_keys=False).encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def get_result(self, key: str) -> dict[str, Any] | None:
        """The stored result for a candidate key, or None if it was never computed or is damaged.

        A damaged result (not JSON, not an object, another key) is moved aside and reported once, so the candidate
        is recomputed instead of a bad score being served or a decode error failing the run.
        """
        relative = self.result_path(key)
        try:
            payload = self.read_bytes(relative)
        except FileNotFoundError:
            return None
        try:
            result = json.loads(payload)
        except ValueError as error:  # UnicodeDecodeError and JSONDecodeError both
            problem = f"it is not valid JSON ({error})"
        else:
            if not isinstance(result, dict):
                problem = f"it holds a {type(result).__name__}, not a result object"
            elif result.get("key") != key:
                problem = f"it carries the key {result.get('key')!r}, not its own"
            else:
                return result
        self._quarantine(relative, problem)
        return None

    def _quarantine(self, relative: str, why: str) -> None:
        """Move a damaged file to quarantine/ and warn once (a concurrent reader that lost the race stays quiet)."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = f"{QUARANTINE_DIR}/{relative.rsplit('/', 1)[-1]}.{stamp}.{uuid.uuid4().hex[:6]}"
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(self._path(target)), exist_ok=True)
                os.replace(self._path(relative), self._path(target))
            else:
                self.fs.mv(self._path(relative), self._path(target))
        except FileNotFoundError:
            return
        log.warning(
            "airflow-grid store: %s is damaged: %s; moved to %s, it will be recomputed.",
            self.url(relative),
            why,
            self.url(target),
        )

    def put_result(self, key: str, result: dict[str, Any]) -> None:
        self.write_json(self.result_path(key), result)

    def file_check(self, relative: str) -> dict[str, Any] | None:
        """``{"size", "sha256"}`` of a stored file, or None if it is missing."""
        try:
            with self.fs.open(self._path(relative), "rb") as handle:
                return _digest(handle)
        except FileNotFoundError:
            return None

    def files_match(self, document: dict[str, Any]) -> bool:
        """Whether every file a plan document names still matches the size and sha256 it recorded."""
        checks = document.get("file_checks") or {}
        files = document["files"]
        return all(path is None or self.file_check(path) == checks.get(name) for name, path in files.items())

    def modified(self, relative: str) -> float:
        """When a file was last written, as a POSIX timestamp (0 if the filesystem cannot say)."""
        try:
            value = self.fs.modified(self._path(relative))
        except (NotImplementedError, AttributeError, KeyError):
            return 0.0
        if isinstance(value, datetime):
            return value.timestamp()
        return float(value)

    def touch_in_use(self, plan_id: str) -> None:
        """Mark a plan as in use now: ``airflow-grid gc`` keeps plans touched within its in-use window."""
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        self.write_bytes(f"{self.plan_dir(plan_id)}/{IN_USE_FILE}", f"{stamp}\n".encode())

    def list_files(self, prefix: str) -> dict[str, int]:
        """Every file under ``prefix`` (relative to the root) with its size in bytes; empty if there is none."""
        base = self._path(prefix)
        if not self.fs.exists(base):
            return {}
        found = self.fs.find(base, withdirs=False, detail=True)
        start = len(self._root_path.rstrip("/")) + 1
        return {path[start:]: int(info.get("size") or 0) for path, info in sorted(found.items())}

    def delete(self, relative: str, recursive: bool = False) -> None:
        """Remove a file (or a directory tree); one already gone is not an error (another gc got there first)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(relative), recursive=recursive)

    def local_path(self, relative: str, cache_dir: str) -> str:
        """A local file for ``relative``: the file itself on local storage, else a copy in ``cache_dir``."""
        if self.is_local:
            return self._path(relative)
        target = os.path.join(cache_dir, relative.replace("/", "__"))
        if not os.path.exists(target):
            self.fs.get_file(self._path(relative), target)
        return target


def file_check(path: str) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a local file, the form plan.json records for its snapshot files."""
    with open(path, "rb") as handle:
        return _digest(handle)


def bytes_check(payload: bytes) -> dict[str, Any]:
    return {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def _digest(handle: Any) -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def _fsync_directory(directory: str) -> None:
    """Persist the rename itself (POSIX); skipped where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
