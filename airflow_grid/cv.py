"""Evaluate one candidate's folds exactly as GridSearchCV fits and scores them, inside a CPU budget.

The folds are the stored index manifest and the scoring goes through sklearn's public ``cross_validate``, so each
fold's fit and score is the same call GridSearchCV makes. ``n_jobs`` comes from the CPU budget (never -1) and
BLAS/OpenMP pools are capped so that ``n_jobs x threads <= budget``: the n_jobs=-1 incident cannot happen here.
"""

from __future__ import annotations

import math
import os
import re
import time
import warnings
from typing import Any

import numpy as np

THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
_FAILED_COUNT = re.compile(r"(\d+) fits failed out of a total of (\d+)")
_ALL_FAILED = re.compile(r"All the (\d+) fits failed")
_RENAMED_PARAMETER_ERROR = re.compile(r"parameter of cross_validate must be")


def budget(cpu: float, n_folds: int) -> tuple[int, int]:
    """(n_jobs, threads per job) for a CPU budget: folds in parallel first, leftover cores as threads."""
    cores = max(1, math.floor(cpu))
    n_jobs = max(1, min(cores, n_folds))
    return n_jobs, max(1, cores // n_jobs)


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps native thread pools in this process and in any process it starts."""
    return dict.fromkeys(THREAD_ENV_VARS, str(threads))


def evaluate(
    estimator: Any,
    X: Any,
    y: Any,
    folds: list[tuple[np.ndarray, np.ndarray]],
    *,
    scoring: str | list[str] | dict[str, Any] | None,
    metric_names: list[str],
    error_score: float | str,
    return_train_score: bool,
    cpu: float,
    fit_params: dict[str, Any] | None = None,
    timeout: float | None = None,
    timeout_text: str | None = None,
    outputs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Fit and score ``estimator`` (params already set) on every fold; failures become data per error_score.

    Returns per-fold ``test_scores`` (and ``train_scores``) keyed by metric, ``fit_time``, ``score_time``,
    ``n_failed_fits`` and ``error`` (sklearn's failure summary, or None). With ``error_score="raise"`` the fit
    error propagates, as in GridSearchCV. ``fit_params`` (full-length arrays, as given to ``GridSearchCV.fit``)
    are sliced to each fold's train indices by ``cross_validate`` exactly as GridSearchCV slices them.

    With ``timeout`` (seconds, ``resources.timeout``) each fold runs in a child process that is killed when its
    fit runs longer, and the fold is recorded as a failed fit (see :mod:`airflow_grid.timeouts`); without it the
    folds run in this process and loky workers, as GridSearchCV runs them.

    ``outputs``: the folds were already fitted and scored (a warm-start chain, :func:`evaluate_chain`); they are
    assembled here exactly as ``cross_validate`` assembles its own.
    """
    from sklearn.model_selection import cross_validate
    from threadpoolctl import threadpool_limits

    from airflow_grid import chains, timeouts

    n_jobs, threads = budget(cpu, len(folds))
    os.environ.update(thread_env(threads))  # loky workers inherit it
    started = time.perf_counter()
    error: str | None = None
    with threadpool_limits(limits=threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if outputs is not None:
                scores = chains.as_cross_validate(
                    outputs, scoring=scoring, error_score=error_score, return_train_score=return_train_score
                )
            elif timeout is None:
                scores = cross_validate(
                    estimator,
                    X,
                    y,
                    cv=folds,
                    scoring=scoring,
                    n_jobs=n_jobs,
                    error_score=error_score,
                    return_train_score=return_train_score,
                    params=fit_params or None,
                )
            else:
                scores = timeouts.cross_validate_folds(
                    estimator,
                    X,
                    y,
                    folds,
                    scoring=scoring,
                    metric_names=metric_names,
                    error_score=error_score,
                    return_train_score=return_train_score,
                    params=fit_params or None,
                    n_jobs=n_jobs,
                    threads=threads,
                    timeout=timeout,
                    timeout_text=timeout_text or f"{timeout:g}s",
                )
        except ValueError as failure:
            original = _renamed_from(failure) if error_score == "raise" else None
            if original is not None:
                raise original from None
            if error_score == "raise" or not _ALL_FAILED.search(str(failure)):
                raise
            # Every fold failed: cross_validate raises where GridSearchCV records error_score and moves on.
            error = str(failure).strip()
            if isinstance(failure, timeouts.AllFoldsFailed):  # each fold's own time (a timed-out one: until killed)
                scores = failure.scores
            else:
                scores = _all_failed_scores(len(folds), metric_names, error_score, return_train_score, started)
    n_failed = len(folds) if error else 0
    for warning in caught:
        match = _FAILED_COUNT.search(str(warning.message))
        if match:
            n_failed, error = int(match.group(1)), str(warning.message).strip()
    if error and "MemoryError" in error:  # a budget problem, not a property of the candidate: never store it
        raise MemoryError(f"a fit ran out of memory: {error[-2000:]}")
    prefix = "test_score" if metric_names == ["score"] else None
    result: dict[str, Any] = {
        "test_scores": {m: _floats(scores[prefix or f"test_{m}"]) for m in metric_names},
        "fit_time": _floats(scores["fit_time"]),
        "score_time": _floats(scores["score_time"]),
        "n_failed_fits": n_failed,
        "error": error,
        "n_jobs": n_jobs,
        "threads": threads,
    }
    if return_train_score:
        result["train_scores"] = {m: _floats(scores["train_score" if prefix else f"train_{m}"]) for m in metric_names}
    return result


def evaluate_chain(
    estimator: Any,
    name: str,
    sizes: list[int],
    X: Any,
    y: Any,
    folds: list[tuple[np.ndarray, np.ndarray]],
    *,
    scoring: str | list[str] | dict[str, Any] | None,
    metric_names: list[str],
    error_score: float | str,
    return_train_score: bool,
    cpu: float,
    fit_params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """A warm-start chain (see :mod:`airflow_grid.chains`): one result per size, each as :func:`evaluate` gives it
    for that size alone; folds run in parallel within the same CPU budget."""
    from airflow_grid import chains

    def fit(scorers: Any, n_jobs: int) -> list[list[dict[str, Any]]]:
        return chains.fit_chain(
            estimator, name, sizes, X, y, folds, scorers=scorers, fit_params=fit_params or None,
            return_train_score=return_train_score, error_score=error_score, n_jobs=n_jobs,
        )  # fmt: skip

    common: dict[str, Any] = {"scoring": scoring, "metric_names": metric_names, "error_score": error_score, "cpu": cpu}
    return _shared(fit, [estimator] * len(sizes), X, y, folds, return_train_score=return_train_score, **common)


def evaluate_shared_prefix(
    estimators: list[Any],
    X: Any,
    y: Any,
    folds: list[tuple[np.ndarray, np.ndarray]],
    *,
    scoring: str | list[str] | dict[str, Any] | None,
    metric_names: list[str],
    error_score: float | str,
    return_train_score: bool,
    cpu: float,
    fit_params: dict[str, Any] | None = None,
    prefix_cache: Any = None,
) -> list[dict[str, Any]]:
    """Pipelines sharing every step but the last (see :mod:`airflow_grid.prefixes`): one result per pipeline, each
    as :func:`evaluate` gives it alone; the prefix is fitted once per fold (or read from ``prefix_cache``, see
    :mod:`airflow_grid.prefix_cache`), folds in parallel within the budget."""
    from airflow_grid import prefixes

    if fit_params:
        raise ValueError("shared prefixes take no fit params: route those candidates through evaluate().")

    def fit(scorers: Any, n_jobs: int) -> list[list[dict[str, Any]]]:
        return prefixes.fit_group(
            estimators, X, y, folds, scorers=scorers, return_train_score=return_train_score,
            error_score=error_score, n_jobs=n_jobs, cache=prefix_cache,
        )  # fmt: skip

    common: dict[str, Any] = {"scoring": scoring, "metric_names": metric_names, "error_score": error_score, "cpu": cpu}
    return _shared(fit, estimators, X, y, folds, return_train_score=return_train_score, **common)


def _shared(
    fit: Any,
    estimators: list[Any],
    X: Any,
    y: Any,
    folds: list[tuple[np.ndarray, np.ndarray]],
    *,
    scoring: Any,
    metric_names: list[str],
    error_score: float | str,
    return_train_score: bool,
    cpu: float,
) -> list[dict[str, Any]]:
    """Run ``fit(scorers, n_jobs) -> [candidate][fold] outputs`` inside the CPU budget, then assemble each
    candidate's outputs as :func:`evaluate` (and so ``cross_validate``) would."""
    from sklearn.metrics import check_scoring
    from threadpoolctl import threadpool_limits

    n_jobs, threads = budget(cpu, len(folds))
    os.environ.update(thread_env(threads))
    scorers = check_scoring(estimators[0], scoring=scoring, raise_exc=(error_score == "raise"))  # as cross_validate
    with threadpool_limits(limits=threads), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fits' own warnings; failures are reported per candidate below
        per_candidate = fit(scorers, n_jobs)
    common: dict[str, Any] = {"scoring": scoring, "metric_names": metric_names, "error_score": error_score, "cpu": cpu}
    return [
        evaluate(estimator, X, y, folds, return_train_score=return_train_score, outputs=outputs, **common)
        for estimator, outputs in zip(estimators, per_candidate, strict=True)
    ]


def _renamed_from(failure: ValueError) -> BaseException | None:
    """The estimator's own error when cross_validate re-raised it under its name.

    cross_validate turns an estimator's InvalidParameterError into "The 'gamma' parameter of cross_validate must
    be ...", naming a function the user never called; GridSearchCV raises the estimator's ("... of SVC must be").
    """
    cause = failure.__cause__
    if _RENAMED_PARAMETER_ERROR.search(str(failure)) and type(cause) is type(failure):
        return cause
    return None


def _all_failed_scores(
    n_folds: int, metric_names: list[str], error_score: float | str, return_train_score: bool, started: float
) -> dict[str, Any]:
    per_fold = (time.perf_counter() - started) / n_folds
    return error_scores(np.full(n_folds, per_fold), metric_names, error_score, return_train_score)


def error_scores(
    fit_times: np.ndarray, metric_names: list[str], error_score: float | str, return_train_score: bool
) -> dict[str, Any]:
    """``cross_validate``-shaped scores of folds whose fits failed: ``error_score`` everywhere, their fit times."""
    fill = np.full(len(fit_times), float(error_score))
    scores: dict[str, Any] = {"fit_time": fit_times, "score_time": np.zeros(len(fit_times))}
    single = metric_names == ["score"]
    for metric in metric_names:
        scores["test_score" if single else f"test_{metric}"] = fill
        if return_train_score:
            scores["train_score" if single else f"train_{metric}"] = fill
    return scores


def _floats(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=np.float64)]
