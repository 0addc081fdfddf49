"""Warm-start chains: candidates that differ only in an ensemble's size are fitted once per fold and grown.

A grid over ``n_estimators: [100, 200, 400]`` fits 700 trees per fold when evaluated candidate by candidate; a
chain fits the 100, scores them, grows the same estimator to 200 with ``warm_start`` (scikit-learn draws the
seeds the new members would have had in a fresh fit), scores, grows to 400: 400 trees. Only classes for which
``tests/test_chains.py`` proves the chain's scores bit-identical to independent fits are chained
(:data:`CHAINABLE`); everything else, and any setting scikit-learn warns changes the result, is fitted
independently. A chained candidate's ``fit_time`` is cumulative: the time from the chain's first fit to the end
of its own growth in that fold, i.e. what it took to obtain a model of its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from airflow_grid.spec import canonical_json

#: Classes whose warm-started growth of ``n_estimators`` gives the same fitted model as a fresh fit of that size
#: (given an int ``random_state``), by module-qualified name; each is proven by tests/test_chains.py.
CHAINABLE = frozenset(
    f"sklearn.ensemble._{module}.{name}"
    for module, names in {
        "forest": ("RandomForestClassifier", "RandomForestRegressor", "ExtraTreesClassifier", "ExtraTreesRegressor"),
        "gb": ("GradientBoostingClassifier", "GradientBoostingRegressor"),
        "bagging": ("BaggingClassifier", "BaggingRegressor"),
    }.items()
    for name in names
)
SIZE = "n_estimators"


def chainable(owner: Any) -> bool:
    """Whether ``owner`` (the estimator holding ``n_estimators``) may be grown instead of refitted."""
    kind = f"{type(owner).__module__}.{type(owner).__qualname__}"
    if kind not in CHAINABLE or not hasattr(owner, "warm_start"):
        return False
    params = owner.get_params(deep=False)
    if kind.startswith("sklearn.ensemble._bagging") and params.get("oob_score"):
        return False  # scikit-learn refuses oob_score with warm_start
    # Early stopping (n_iter_no_change) may stop short of a size: not proven, so those are fitted independently.
    return params.get("n_iter_no_change") is None


def size_param(params: dict[str, Any]) -> str | None:
    """The candidate's ``n_estimators`` parameter name (``n_estimators`` or ``<path>__n_estimators``), if any."""
    names = [name for name in params if name == SIZE or name.endswith(f"__{SIZE}")]
    return names[0] if len(names) == 1 else None


def find(
    rows: Sequence[dict[str, Any]], build: Callable[[dict[str, Any]], Any]
) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Split rows (``{"index", "params", ...}``) into chains (two or more, ascending size) and the rest.

    Rows chain when their params are equal except for one ``n_estimators`` whose owner is :func:`chainable`
    (``build(params)`` builds a row's estimator; called once per group) and their sizes are distinct ints.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    rest: list[dict[str, Any]] = []
    for row in rows:
        name = size_param(row["params"])
        size = row["params"].get(name) if name else None
        if name is None or isinstance(size, bool) or not isinstance(size, int):
            rest.append(row)
            continue
        others = {k: v for k, v in row["params"].items() if k != name}
        groups.setdefault(canonical_json([name, others]), []).append(row)
    chains = []
    for members in groups.values():
        name = size_param(members[0]["params"])
        sizes = [m["params"][name] for m in members]
        if (
            len(members) < 2
            or len(set(sizes)) != len(sizes)
            or not chainable(_owner(build(members[0]["params"]), name))
        ):
            rest.extend(members)
            continue
        chains.append(sorted(members, key=lambda m: m["params"][name]))
    return chains, sorted(rest, key=lambda r: r["index"])


def _owner(estimator: Any, name: str | None) -> Any:
    path = (name or "").rpartition("__")[0]
    return estimator.get_params()[path] if path else estimator


def fit_chain(
    estimator: Any,
    name: str,
    sizes: Sequence[int],
    X: Any,
    y: Any,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    scorers: Any,
    fit_params: dict[str, Any] | None,
    return_train_score: bool,
    error_score: Any,
    n_jobs: int,
) -> list[list[dict[str, Any]]]:
    """``_fit_and_score`` outputs per size, per fold (``[size][fold]``), folds in parallel as cross_validate runs
    them. ``estimator`` has every parameter but the size set."""
    from joblib import Parallel, delayed

    per_fold = Parallel(n_jobs=n_jobs)(
        delayed(_grow)(estimator, name, sizes, X, y, train, test, scorers, fit_params, return_train_score, error_score)
        for train, test in folds
    )
    return [[fold[k] for fold in per_fold] for k in range(len(sizes))]


def _grow(
    estimator: Any,
    name: str,
    sizes: Sequence[int],
    X: Any,
    y: Any,
    train: np.ndarray,
    test: np.ndarray,
    scorers: Any,
    fit_params: dict[str, Any] | None,
    return_train_score: bool,
    error_score: Any,
) -> list[dict[str, Any]]:
    """One fold of a chain: each size fitted (grown from the previous one) and scored by sklearn's own routine."""
    from sklearn.base import clone
    from sklearn.model_selection._validation import _fit_and_score

    warm = f"{name.rpartition('__')[0]}__warm_start" if "__" in name else "warm_start"
    model = clone(estimator)
    outputs, spent = [], 0.0
    for size in sizes:
        output = _fit_and_score(
            model, X, y, scorer=scorers, train=train, test=test, verbose=0,
            parameters={name: size, warm: True}, fit_params=fit_params, score_params=None,
            return_train_score=return_train_score, return_times=True, error_score=error_score,
        )  # fmt: skip
        spent += output["fit_time"]
        output["fit_time"] = spent  # cumulative: what it took to obtain a model of this size
        if output["fit_error"] is not None:  # the model may be half-grown: the next size starts afresh
            model, spent = clone(estimator), 0.0
        outputs.append(output)
    return outputs


def as_cross_validate(
    outputs: list[dict[str, Any]], *, scoring: Any, error_score: Any, return_train_score: bool
) -> dict[str, Any]:
    """The folds' ``_fit_and_score`` outputs as ``cross_validate`` returns them (its own assembly, step for step:
    failure warning or error, error scores for a callable scorer, aggregation, normalisation)."""
    from sklearn.model_selection._validation import (
        _aggregate_score_dicts,
        _insert_error_scores,
        _normalize_score_results,
        _warn_or_raise_about_fit_failures,
    )

    _warn_or_raise_about_fit_failures(outputs, error_score)
    if callable(scoring):
        _insert_error_scores(outputs, error_score)
    results = _aggregate_score_dicts(outputs)
    scores: dict[str, Any] = {"fit_time": results["fit_time"], "score_time": results["score_time"]}
    test = _normalize_score_results(results["test_scores"])
    train = _normalize_score_results(results["train_scores"]) if return_train_score else {}
    for metric in test:
        scores[f"test_{metric}"] = test[metric]
        if return_train_score:
            scores[f"train_{metric}"] = train[metric]
    return scores
