"""Shared pipeline prefixes: candidates that differ only in a Pipeline's final step share its fitted prefix.

``StandardScaler → PCA(n_components=20) → LogisticRegression(C)`` over four ``C`` fits the scaler and the PCA
four times per fold when evaluated candidate by candidate. Here the prefix (every step but the last) is fitted
once per fold and each candidate fits only its final step, on the same arrays ``Pipeline.fit`` would give it:
``prefix.fit_transform(X_train)`` to fit, ``prefix.transform(X_test)`` (and ``prefix.transform(X_train)`` for
train scores, as ``Pipeline.score`` computes them) to score. Those are the calls a Pipeline makes, in its
order, so the scores are GridSearchCV's bit for bit (tests/test_prefixes.py). The key is what the plan already
knows (fold, prefix parameters): no array is hashed. A candidate's ``fit_time`` is the prefix's fit time plus its
own final step's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from traceback import format_exc
from typing import Any

import numpy as np

from airflow_grid.spec import canonical_json


def final_step(estimator: Any) -> str | None:
    """The name of a Pipeline's final step when the pipeline has a prefix to share, else None."""
    from sklearn.pipeline import Pipeline

    if not isinstance(estimator, Pipeline) or len(estimator.steps) < 2 or estimator.memory is not None:
        return None
    return str(estimator.steps[-1][0])


def find(rows: Sequence[dict[str, Any]], final: str | None) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """Split rows into groups (two or more) sharing every parameter outside the final step ``final``, and the rest.

    A row touching the pipeline itself (``steps``, ``memory``, ...) is never grouped.
    """
    if final is None:
        return [], list(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    rest: list[dict[str, Any]] = []
    for row in rows:
        params = row["params"]
        if any("__" not in name and name != final for name in params):  # a pipeline-level parameter
            rest.append(row)
            continue
        shared = {name: value for name, value in params.items() if name != final and not name.startswith(f"{final}__")}
        groups.setdefault(canonical_json(shared), []).append(row)
    found = [members for members in groups.values() if len(members) > 1]
    rest += [members[0] for members in groups.values() if len(members) == 1]
    return found, sorted(rest, key=lambda row: row["index"])


def fit_group(
    estimators: Sequence[Any],
    X: Any,
    y: Any,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    scorers: Any,
    return_train_score: bool,
    error_score: Any,
    n_jobs: int,
    cache: Any = None,
) -> list[list[dict[str, Any]]]:
    """``_fit_and_score``-shaped outputs per candidate, per fold (``[candidate][fold]``); folds in parallel.

    ``estimators`` are the group's pipelines (params set); they share every step but the last. ``cache``: a
    :class:`~airflow_grid.prefix_cache.PrefixCache` whose arrays replace fitting the prefix where present, and
    which keeps the arrays fitted here when that pays.
    """
    from joblib import Parallel, delayed

    per_fold = Parallel(n_jobs=n_jobs)(
        delayed(_fold)(estimators, X, y, train, test, scorers, return_train_score, error_score, (cache, k))
        for k, (train, test) in enumerate(folds)
    )
    return [[fold[k] for fold in per_fold] for k in range(len(estimators))]


def _fold(
    estimators: Sequence[Any],
    X: Any,
    y: Any,
    train: np.ndarray,
    test: np.ndarray,
    scorers: Any,
    return_train_score: bool,
    error_score: Any,
    cached: tuple[Any, int] = (None, 0),
) -> list[dict[str, Any]]:
    """One fold: the prefix fitted once (or its arrays read from ``cached`` = (cache, fold index)), then each
    candidate's final step fitted and scored as a Pipeline would."""
    from sklearn.base import clone
    from sklearn.utils.metaestimators import _safe_split

    cache, fold = cached
    X_train, y_train = _safe_split(estimators[0], X, y, train)
    X_test, y_test = _safe_split(estimators[0], X, y, test, train)
    started = time.time()
    hit = cache.get(fold) if cache is not None else None
    if hit is not None:
        fitted, to_test, to_train = hit
    else:
        prefix = clone(estimators[0][:-1])
        try:
            fitted = prefix.fit_transform(X_train, y_train)  # what Pipeline._fit hands to the final step
            to_test = prefix.transform(X_test)  # what Pipeline.predict/score computes on the test part
            to_train = prefix.transform(X_train) if return_train_score else None  # Pipeline.score on the train part
        except Exception:
            if error_score == "raise":
                raise
            failed = time.time() - started
            return [_failed(scorers, return_train_score, error_score, failed, format_exc()) for _ in estimators]
        if cache is not None:
            cache.put(fold, fitted, to_test, to_train, time.time() - started)
    shared = time.time() - started  # what this fold's prefix cost here: a fit, or reading its arrays
    return [
        _final(clone(e.steps[-1][1]), fitted, y_train, to_test, y_test, to_train, scorers, error_score, shared)
        for e in estimators
    ]


def _final(
    final: Any,
    fitted: Any,
    y_train: Any,
    to_test: Any,
    y_test: Any,
    to_train: Any,
    scorers: Any,
    error_score: Any,
    shared: float,
) -> dict[str, Any]:
    """The final step's fit and scores, as ``_fit_and_score`` computes them for the whole pipeline."""
    from sklearn.model_selection._validation import _score

    started = time.time()
    try:
        final.fit(fitted, y_train)
    except Exception:
        if error_score == "raise":
            raise
        return _failed(scorers, to_train is not None, error_score, shared + time.time() - started, format_exc())
    fit_time = shared + time.time() - started
    scored = time.time()
    output: dict[str, Any] = {"fit_error": None, "fit_time": fit_time}
    output["test_scores"] = _score(final, to_test, y_test, scorers, None, error_score)
    output["score_time"] = time.time() - scored
    if to_train is not None:
        output["train_scores"] = _score(final, to_train, y_train, scorers, None, error_score)
    return output


def _failed(scorers: Any, return_train_score: bool, error_score: Any, fit_time: float, error: str) -> dict[str, Any]:
    from sklearn.metrics._scorer import _MultimetricScorer

    scores = (
        {name: error_score for name in scorers._scorers} if isinstance(scorers, _MultimetricScorer) else error_score
    )
    output = {"fit_error": error, "fit_time": fit_time, "score_time": 0.0, "test_scores": scores}
    if return_train_score:
        output["train_scores"] = dict(scores) if isinstance(scores, dict) else scores
    return output
