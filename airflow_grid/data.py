"""Load the data once, split off the holdout, snapshot it with a fingerprint, and compute the folds once.

Snapshots are plain files a worker can read without the spec's data source: arrays as ``.npy`` (memory-mapped on
load), DataFrames as parquet (column names and dtypes kept, so a ColumnTransformer selecting columns by name
works). Folds are computed with sklearn's ``check_cv`` on the search data exactly as GridSearchCV does, and stored
as an index manifest whose hash is part of every candidate key.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from sklearn.base import is_classifier
from sklearn.model_selection import check_cv, train_test_split

from airflow_grid.spec import SearchSpec, SpecError, build

Table: TypeAlias = np.ndarray | pd.DataFrame
Target: TypeAlias = np.ndarray


@dataclass
class Dataset:
    """The search data (train part) and, with a holdout, the held-out part."""

    X: Table
    y: Target
    X_holdout: Table | None = None
    y_holdout: Target | None = None

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.X, self.y, self.X_holdout, self.y_holdout):
            digest.update(_fingerprint_part(part).encode())
        return digest.hexdigest()


def load(spec: SearchSpec, estimator: Any) -> Dataset:
    """Load X, y from the spec's data source and split off the holdout if the spec asks for one."""
    X, y = _load_source(spec)
    if spec.holdout is None:
        return Dataset(X=X, y=y)
    stratify = spec.holdout.stratify if spec.holdout.stratify is not None else is_classifier(estimator)
    try:
        X_train, X_test, y_train, y_test = train_test_split(
            X,
            y,
            test_size=spec.holdout.test_size,
            random_state=spec.holdout.random_state,
            stratify=y if stratify else None,
        )
    except ValueError as error:
        raise SpecError("holdout", f"the split failed: {error}", "change test_size, or set stratify: false.") from error
    return Dataset(X=X_train, y=y_train, X_holdout=X_test, y_holdout=y_test)


def _load_source(spec: SearchSpec) -> tuple[Table, Target]:
    source = spec.data
    if "path" not in source:
        loaded = build(source, "data", spec.policy, role="data")
        if isinstance(loaded, tuple) and len(loaded) == 2:
            X, y = loaded
        elif hasattr(loaded, "data") and hasattr(loaded, "target"):
            X, y = loaded.data, loaded.target
        else:
            raise SpecError(
                "data",
                f"{source['_target_']} returned {type(loaded).__name__}, not (X, y).",
                "pass return_X_y: true.",
            )
        return _as_table(X), _as_target(y)
    return _read_path(source)


def _read_path(source: dict[str, Any]) -> tuple[Table, Target]:
    import fsspec

    path, fmt = source["path"], source["format"]
    try:
        with fsspec.open(path, "rb") as handle:
            payload = handle.read()
    except (OSError, ValueError) as error:
        raise SpecError("data.path", f"cannot read {path!r}: {error}", "check the path and its credentials.") from error
    if not payload:
        raise SpecError("data.path", f"{path!r} is empty.", f"point data.path at a non-empty {fmt} file.")
    try:
        if fmt == "npz":
            return _read_npz(payload, path)
        frame = pd.read_csv(io.BytesIO(payload)) if fmt == "csv" else pd.read_parquet(io.BytesIO(payload))
    except SpecError:
        raise
    except Exception as error:  # whatever the reader raises on a damaged or mislabelled file (never its content)
        raise SpecError(
            "data.path",
            f"cannot read {path!r} as {fmt}: {type(error).__name__}.",
            f"check that the file is a valid {fmt} file, or set data.format.",
        ) from None
    if frame.empty:
        raise SpecError("data.path", f"{path!r} holds no rows.", "point data.path at a file with data.")
    target = source["target"]
    if target not in frame.columns:
        raise SpecError(
            "data.target", f"column {target!r} is not in {list(frame.columns)}.", "name an existing column."
        )
    columns = source.get("columns") or [c for c in frame.columns if c != target]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpecError("data.columns", f"columns {missing} are not in the file.", "list existing columns.")
    return frame[columns].reset_index(drop=True), _as_target(frame[target])


def _read_npz(payload: bytes, path: str) -> tuple[Table, Target]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        if "X" not in arrays or "y" not in arrays:
            raise SpecError("data.path", f"{path!r} holds {sorted(arrays)[:20]}.", "save the arrays as X and y.")
        X, y = arrays["X"], arrays["y"]
    if len(X) == 0 or len(X) != len(y):
        raise SpecError("data.path", f"{path!r} holds X of {len(X)} rows and y of {len(y)}.", "save matching rows.")
    return _as_table(X), _as_target(y)


def _as_table(X: Any) -> Table:
    return X.reset_index(drop=True) if isinstance(X, pd.DataFrame) else np.asarray(X)


def _as_target(y: Any) -> Target:
    return np.asarray(y)


def _fingerprint_part(part: Table | None) -> str:
    if part is None:
        return "none"
    digest = hashlib.sha256()
    if isinstance(part, pd.DataFrame):
        digest.update(repr([(str(c), str(t)) for c, t in part.dtypes.items()]).encode())
        digest.update(pd.util.hash_pandas_object(part, index=False).to_numpy().tobytes())
    else:
        array = np.ascontiguousarray(part)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes() if array.dtype != object else repr(array.tolist()).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Snapshot files


def table_filename(name: str, table: Table) -> str:
    return f"{name}.parquet" if isinstance(table, pd.DataFrame) else f"{name}.npy"


def table_bytes(table: Table) -> bytes:
    buffer = io.BytesIO()
    if isinstance(table, pd.DataFrame):
        table.to_parquet(buffer, index=False)
    else:
        np.save(buffer, _saveable(table), allow_pickle=False)
    return buffer.getvalue()


def _saveable(array: np.ndarray) -> np.ndarray:
    """Object arrays of strings become fixed-width unicode so they load without pickle."""
    return array.astype(str) if array.dtype == object else array


def read_table(path: str, mmap: bool = True) -> Table:
    """Read a snapshot part: npy memory-mapped (read-only) when asked, parquet into a DataFrame."""
    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# --------------------------------------------------------------------------------------------------
# Folds


Folds: TypeAlias = list[tuple[np.ndarray, np.ndarray]]


def make_folds(spec: SearchSpec, estimator: Any, X: Table, y: Target) -> Folds:
    """The (train, test) indices GridSearchCV would use: ``check_cv(cv, y, classifier=is_classifier(est))``."""
    cv_value = spec.cv if isinstance(spec.cv, int) else build(spec.cv, "cv", spec.policy)
    try:
        splitter = check_cv(cv_value, y, classifier=is_classifier(estimator))
        folds = [(np.asarray(train), np.asarray(test)) for train, test in splitter.split(X, y)]
    except Exception as error:  # a splitter refusing this data (too few rows per class, missing groups, ...)
        raise SpecError(
            "cv", f"splitting the search data failed: {type(error).__name__}: {error}", "lower the number of folds."
        ) from None
    return folds


def folds_bytes(folds: Folds) -> bytes:
    buffer = io.BytesIO()
    arrays = {}
    for k, (train, test) in enumerate(folds):
        arrays[f"train_{k}"] = train.astype(np.int64)
        arrays[f"test_{k}"] = test.astype(np.int64)
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def read_folds(path: str) -> Folds:
    with np.load(path, allow_pickle=False) as arrays:
        n_splits = len(arrays.files) // 2
        return [(arrays[f"train_{k}"], arrays[f"test_{k}"]) for k in range(n_splits)]


def folds_hash(folds: Folds) -> str:
    """Hash of the index manifest: the same indices in the same order give the same hash."""
    digest = hashlib.sha256()
    for train, test in folds:
        for part in (train, test):
            array = np.ascontiguousarray(part, dtype=np.int64)
            digest.update(f"{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()
