"""Content-addressed storage on fsspec: candidate results, plans and data snapshots.

Layout under the root (a local directory by default, any fsspec URL in production)::

    results/<key[:2]>/<key>.json      one candidate's result; written once, atomically
    plans/<plan_id>/plan.json         the plan: spec, candidates with keys, fold and data fingerprints
    plans/<plan_id>/X.npy|X.parquet   search data snapshot (and y.npy, X_holdout.*, y_holdout.npy)
    plans/<plan_id>/folds.npz         the fold index manifest

Writes are atomic (temporary file + rename locally; a single PUT on object stores), so a reader never sees a
partial result and a retried task either finds a complete result or none.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

STORE_ENV = "AIRFLOW_GRID_STORE"


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
                os.chmod(temporary, _FILE_MODE)  # mkstemp makes 0600; pods running as another user must read it
                os.replace(temporary, path)
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
        """The stored result for a candidate key, or None if it was never computed."""
        try:
            result: dict[str, Any] = self.read_json(self.result_path(key))
        except FileNotFoundError:
            return None
        return result

    def put_result(self, key: str, result: dict[str, Any]) -> None:
        self.write_json(self.result_path(key), result)

    def local_path(self, relative: str, cache_dir: str) -> str:
        """A local file for ``relative``: the file itself on local storage, else a copy in ``cache_dir``."""
        if self.is_local:
            return self._path(relative)
        target = os.path.join(cache_dir, relative.replace("/", "__"))
        if not os.path.exists(target):
            self.fs.get_file(self._path(relative), target)
        return target
