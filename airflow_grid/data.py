"""Load the data once, split off the holdout, snapshot it with a fingerprint, and compute the folds once.

Snapshots are plain files a worker can read without the spec's data source: arrays as ``.npy`` (memory-mapped on
load), DataFrames as parquet (column names and dtypes kept, so a ColumnTransformer selecting columns by name
works). Folds are computed with sklearn's ``check_cv`` on the search data exactly as GridSearchCV does, and stored
as an index manifest whose hash is part of every candidate key.
"""

from __future__ import annotations

import hashlib
import inspect
import io
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import pandas as pd
from sklearn.base import is_classifier
from sklearn.model_selection import GroupShuffleSplit, check_cv, train_test_split

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
    groups: np.ndarray | None = None  # data.groups: given to the splitter, never to a fit
    groups_holdout: np.ndarray | None = None
    fit_params: dict[str, np.ndarray] = field(default_factory=dict)  # fit_params: sliced per fold by sklearn
    fit_params_holdout: dict[str, np.ndarray] = field(default_factory=dict)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (self.X, self.y, self.X_holdout, self.y_holdout):
            digest.update(_fingerprint_part(part).encode())
        if self.groups is not None:  # only when given, so the fingerprint of data without them is unchanged
            digest.update(f"groups{_fingerprint_part(self.groups)}{_fingerprint_part(self.groups_holdout)}".encode())
        for name in sorted(self.fit_params):
            holdout = self.fit_params_holdout.get(name)
            digest.update(f"fit:{name}{_fingerprint_part(self.fit_params[name])}{_fingerprint_part(holdout)}".encode())
        return digest.hexdigest()


def load(spec: SearchSpec, estimator: Any) -> Dataset:
    """Load X, y from the spec's data source and split off the holdout if the spec asks for one."""
    X, y, columns = _load_source(spec)
    groups = columns.get(spec.data["groups"]) if spec.data.get("groups") else None
    fit_params = {name: columns[column] for name, column in spec.fit_params.items()}
    check_fit_params(spec, estimator)
    if spec.holdout is None:
        return Dataset(X=X, y=y, groups=groups, fit_params=fit_params)
    if groups is not None:  # no group on both sides; stratify is not applied (refused at parse when asked for)
        splitter = GroupShuffleSplit(
            n_splits=1, test_size=spec.holdout.test_size, random_state=spec.holdout.random_state
        )
        try:
            train, test = next(splitter.split(X, y, groups))
        except ValueError as error:
            raise SpecError("holdout", f"the group split failed: {error}", "change test_size.") from error
        return Dataset(
            X=_take(X, train),
            y=y[train],
            X_holdout=_take(X, test),
            y_holdout=y[test],
            groups=groups[train],
            groups_holdout=groups[test],
            fit_params={name: values[train] for name, values in fit_params.items()},
            fit_params_holdout={name: values[test] for name, values in fit_params.items()},
        )
    stratify = spec.holdout.stratify if spec.holdout.stratify is not None else is_classifier(estimator)
    names = list(fit_params)
    try:
        X_train, X_test, y_train, y_test, *extra = train_test_split(
            X,
            y,
            *(fit_params[name] for name in names),
            test_size=spec.holdout.test_size,
            random_state=spec.holdout.random_state,
            stratify=y if stratify else None,
        )
    except ValueError as error:
        raise SpecError("holdout", f"the split failed: {error}", "change test_size, or set stratify: false.") from error
    return Dataset(
        X=X_train,
        y=y_train,
        X_holdout=X_test,
        y_holdout=y_test,
        fit_params={name: extra[2 * k] for k, name in enumerate(names)},
        fit_params_holdout={name: extra[2 * k + 1] for k, name in enumerate(names)},
    )


def _take(X: Table, indices: np.ndarray) -> Table:
    return X.iloc[indices] if isinstance(X, pd.DataFrame) else X[indices]


def check_fit_params(spec: SearchSpec, estimator: Any) -> None:
    """Refuse a fit parameter the estimator's ``fit`` cannot take, where its signature says so (else fits fail)."""
    swapped = {key for mapping in [*spec.param_grid, *spec.param_distributions] for key in mapping}
    for name in spec.fit_params:
        steps = name.split("__")[:-1]
        if any("__".join(steps[: k + 1]) in swapped for k in range(len(steps))):
            continue  # the grid replaces that step: each candidate's own fit decides
        problem = _fit_param_problem(estimator, name)
        if problem is not None:
            raise SpecError(f"fit_params.{name}", problem[0], problem[1])


def _fit_param_problem(estimator: Any, name: str) -> tuple[str, str] | None:
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        step, separator, rest = name.partition("__")
        steps = dict(estimator.steps)
        if not separator or step not in steps:
            return (
                f"a Pipeline takes fit parameters as <step>__<parameter>; its steps are {list(steps)}.",
                f"write e.g. {list(steps)[-1]}__sample_weight.",
            )
        inner = steps[step]
        return None if inner is None or isinstance(inner, str) else _fit_param_problem(inner, rest)
    try:
        parameters = inspect.signature(estimator.fit).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    if name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    accepted = [p for p in parameters if p not in ("X", "y", "self")]
    return (
        f"{type(estimator).__name__}.fit does not take {name!r} (it takes {accepted or 'only X and y'}).",
        "remove it, or use an estimator whose fit takes it.",
    )


def _load_source(spec: SearchSpec) -> tuple[Table, Target, dict[str, np.ndarray]]:
    """X, y and the named columns (arrays) that data.groups and fit_params take out of the file."""
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
        return _as_table(X), _as_target(y), {}
    names = list(dict.fromkeys([*([source["groups"]] if source.get("groups") else []), *spec.fit_params.values()]))
    return _read_path(source, names)


def _read_path(source: dict[str, Any], names: list[str]) -> tuple[Table, Target, dict[str, np.ndarray]]:
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
            return _read_npz(payload, path, names, source)
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
    absent = [n for n in names if n not in frame.columns]
    if absent:
        raise SpecError(
            _column_field(source, absent[0]),
            f"column {absent[0]!r} is not in {list(frame.columns)}.",
            "name an existing column.",
        )
    columns = source.get("columns") or [c for c in frame.columns if c != target and c not in names]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise SpecError("data.columns", f"columns {missing} are not in the file.", "list existing columns.")
    taken = [c for c in columns if c in names]
    if taken:
        raise SpecError(
            "data.columns", f"lists {taken}, used by data.groups or fit_params.", "remove them from data.columns."
        )
    extras = {name: frame[name].to_numpy() for name in names}
    return frame[columns].reset_index(drop=True), _as_target(frame[target]), extras


def _column_field(source: dict[str, Any], column: str) -> str:
    if source.get("groups") == column:
        return "data.groups"
    return "fit_params"


def _read_npz(
    payload: bytes, path: str, names: list[str], source: dict[str, Any]
) -> tuple[Table, Target, dict[str, np.ndarray]]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        if "X" not in arrays or "y" not in arrays:
            raise SpecError("data.path", f"{path!r} holds {sorted(arrays)[:20]}.", "save the arrays as X and y.")
        absent = [n for n in names if n not in arrays]
        if absent:
            raise SpecError(
                _column_field(source, absent[0]),
                f"array {absent[0]!r} is not in {path!r}, which holds {sorted(arrays)[:20]}.",
                "name an array saved in the npz file.",
            )
        X, y = arrays["X"], arrays["y"]
        extras = {name: np.asarray(arrays[name]) for name in names}
    if len(X) == 0 or len(X) != len(y):
        raise SpecError("data.path", f"{path!r} holds X of {len(X)} rows and y of {len(y)}.", "save matching rows.")
    wrong = [name for name, values in extras.items() if len(values) != len(y)]
    if wrong:
        raise SpecError("data.path", f"{path!r}: array {wrong[0]!r} has not {len(y)} rows.", "save matching rows.")
    return _as_table(X), _as_target(y), extras


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


def checked_cv(spec: SearchSpec, estimator: Any, y: Target) -> Any:
    """The splitter GridSearchCV splits with: ``check_cv(cv, y, classifier=is_classifier(estimator))``."""
    cv_value = spec.cv if isinstance(spec.cv, int) else build(spec.cv, "cv", spec.policy)
    return check_cv(cv_value, y, classifier=is_classifier(estimator))


def make_folds(spec: SearchSpec, estimator: Any, X: Table, y: Target, groups: np.ndarray | None = None) -> Folds:
    """The (train, test) indices GridSearchCV would use: ``check_cv(cv, y, classifier=is_classifier(est))``,
    split as ``GridSearchCV.fit(X, y, groups=groups)`` splits (``splitter.split(X, y, groups)``)."""
    try:
        splitter = checked_cv(spec, estimator, y)
        folds = [(np.asarray(train), np.asarray(test)) for train, test in splitter.split(X, y, groups)]
    except Exception as error:  # a splitter refusing this data (too few rows per class, missing groups, ...)
        fix = "lower the number of folds."
        if groups is None and "groups" in str(error):
            fix = "set data.groups to the column (npz: array) holding the groups."
        raise SpecError("cv", f"splitting the search data failed: {type(error).__name__}: {error}", fix) from None
    return folds


def fit_params_bytes(fit_params: dict[str, np.ndarray]) -> bytes:
    """The fit parameters' snapshot: one npz array per parameter, named as GridSearchCV.fit takes it."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: _saveable(np.asarray(values)) for name, values in fit_params.items()})  # type: ignore[arg-type]
    return buffer.getvalue()


def read_fit_params(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


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
