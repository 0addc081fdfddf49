"""Assemble cv_results_ from per-candidate results, rank, and pick the winner, as GridSearchCV does.

Pure functions over plain data. The arithmetic mirrors ``BaseSearchCV._format_results`` and
``_select_best_index`` of scikit-learn 1.9 step for step (float64 reshape, ``np.average`` means, the weighted-std
formula, ``rankdata(method="min")`` with NaN means tied with the worst) so that every score, std and rank is
bit-identical; the test suite checks this against GridSearchCV itself.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any

import numpy as np


class AllFitsFailedError(ValueError):
    """Every fit of every candidate failed: there is no winner. The message summarises the errors."""


def assemble(
    candidate_params: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    n_splits: int,
    metric_names: list[str],
    return_train_score: bool,
    more_results: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """cv_results_ with sklearn's keys, key order and values (numpy arrays; params as given).

    ``more_results`` (successive halving's ``iter`` and ``n_resources``) come first, as arrays, as
    ``BaseSearchCV._format_results`` puts them.
    """
    n_candidates = len(candidate_params)
    cv_results: dict[str, Any] = {key: np.asarray(values) for key, values in (more_results or {}).items()}

    def store(key: str, rows: list[list[float]], splits: bool = False, rank: bool = False) -> None:
        array = np.array(rows, dtype=np.float64).reshape(n_candidates, n_splits)
        if splits:
            for split in range(n_splits):
                cv_results[f"split{split}_{key}"] = array[:, split]
        means = np.average(array, axis=1)
        cv_results[f"mean_{key}"] = means
        if key.startswith(("train_", "test_")) and np.any(~np.isfinite(means)):
            warnings.warn(f"One or more of the {key.split('_')[0]} scores are non-finite: {means}", stacklevel=3)
        cv_results[f"std_{key}"] = np.sqrt(np.average((array - means[:, np.newaxis]) ** 2, axis=1))
        if rank:
            if np.isnan(means).all():
                ranks = np.ones_like(means, dtype=np.int32)
            else:
                filled = np.where(np.isnan(means), np.nanmin(means) - 1, means)
                from scipy.stats import rankdata  # scipy.stats costs 0.4 s to import: only when ranking

                ranks = rankdata(-filled, method="min").astype(np.int32, copy=False)
            cv_results[f"rank_{key}"] = ranks

    store("fit_time", [r["fit_time"] for r in results])
    store("score_time", [r["score_time"] for r in results])
    cv_results.update(param_columns(candidate_params))
    cv_results["params"] = candidate_params
    for metric in metric_names:
        store(f"test_{metric}", [r["test_scores"][metric] for r in results], splits=True, rank=True)
        if return_train_score:
            store(f"train_{metric}", [r["train_scores"][metric] for r in results], splits=True)
    return cv_results


def param_columns(candidate_params: list[dict[str, Any]]) -> dict[str, np.ma.MaskedArray]:
    """``param_<name>`` masked arrays: masked where a candidate does not set the parameter."""
    names: dict[str, None] = {}
    for params in candidate_params:
        names.update(dict.fromkeys(params))
    columns = {}
    for name in names:
        column = np.ma.MaskedArray(np.empty(len(candidate_params), dtype=object), mask=True)
        for index, params in enumerate(candidate_params):
            if name in params:
                column[index] = params[name]
        columns[f"param_{name}"] = column
    return columns


def best_index(cv_results: dict[str, Any], refit_metric: str) -> int:
    """The winner: the first candidate with rank 1 on the refit metric (``argmin`` of the ranks)."""
    return int(np.asarray(cv_results[f"rank_test_{refit_metric}"]).argmin())


def one_standard_error(cv_results: dict[str, Any], metric: str, param: str, order: str = "ascending") -> int:
    """The one-standard-error rule: the simplest candidate whose mean is within one std of the best.

    Among candidates whose ``mean_test_<metric>`` is at least the best candidate's mean minus its std (the best by
    rank, as :func:`best_index` picks it), the one whose ``param`` value comes first in ``order``; ties go to the
    lower candidate index; candidates lacking the parameter (or with a null value) sort last. NaN means are never
    chosen; with no eligible candidate (every mean NaN) the best by rank is returned.
    """
    means = np.asarray(cv_results[f"mean_test_{metric}"], dtype=np.float64)
    stds = np.asarray(cv_results[f"std_test_{metric}"], dtype=np.float64)
    best = best_index(cv_results, metric)
    eligible = [int(i) for i in np.flatnonzero(means >= means[best] - stds[best])]
    params = cv_results["params"]
    valued = [i for i in eligible if params[i].get(param) is not None]
    ranked = sorted(valued, key=lambda i: params[i][param], reverse=order == "descending")  # stable: index ties
    ranked += [i for i in eligible if i not in valued]
    return ranked[0] if ranked else best


def select_best(cv_results: dict[str, Any], refit_metric: str, refit_rule: dict[str, Any] | None = None) -> int:
    """The winner: by rank on the refit metric, or by the spec's refit rule when it has one."""
    if refit_rule is None:
        return best_index(cv_results, refit_metric)
    simplest = refit_rule["simplest"]
    return one_standard_error(cv_results, refit_rule["metric"], simplest["param"], simplest.get("order", "ascending"))


def check_failures(results: list[dict[str, Any]], n_splits: int) -> int:
    """Raise :class:`AllFitsFailedError` if every fit failed; else return how many candidates had failures."""
    errors = [r["error"] for r in results if r.get("error")]
    n_fits = len(results) * n_splits
    n_failed_fits = sum(int(r.get("n_failed_fits", 0)) for r in results)
    if results and n_failed_fits == n_fits:
        summary = "\n".join(
            f"{'-' * 80}\n{count} candidates failed with the following error:\n{error}"
            for error, count in Counter(errors).most_common()
        )
        raise AllFitsFailedError(
            f"All the {n_fits} fits failed.\nIt is very likely that your model is misconfigured.\n"
            "You can try to debug the error by setting error_score='raise'.\n\n"
            f"Below are more details about the failures:\n{summary}"
        )
    return sum(1 for r in results if int(r.get("n_failed_fits", 0)) > 0)


def to_json(cv_results: dict[str, Any]) -> dict[str, list[Any]]:
    """JSON-ready cv_results: lists in candidate order, NaN kept as NaN, masked params as null."""
    out: dict[str, list[Any]] = {}
    for key, column in cv_results.items():
        if key == "params":
            out[key] = list(column)
        elif isinstance(column, np.ma.MaskedArray):
            mask = np.ma.getmaskarray(column)
            out[key] = [None if masked else value for value, masked in zip(column.data, mask, strict=True)]
        else:
            out[key] = [_plain(value) for value in np.asarray(column).tolist()]
    return out


def _plain(value: Any) -> Any:
    return float("nan") if isinstance(value, float) and math.isnan(value) else value


def reduce(
    candidate_params: list[dict[str, Any]],
    results: list[dict[str, Any]],
    *,
    n_splits: int,
    metric_names: list[str],
    return_train_score: bool,
    refit_metric: str,
    refit_rule: dict[str, Any] | None = None,
    more_results: dict[str, list[Any]] | None = None,
    best_of: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole reduce step: (cv_results_, best) where best is the ``best.json`` contract's fields.

    With a refit rule, best is the rule's choice (as GridSearchCV with the equivalent ``refit`` callable), its
    ``best_score`` that candidate's mean, and ``refit_rule`` records the rule. Raises :class:`AllFitsFailedError`
    when every fit failed, as GridSearchCV does. ``best_of(cv_results) -> index`` replaces the choice of winner
    (successive halving: the best of the last round).
    """
    n_failed = check_failures(results, n_splits)
    cv_results = assemble(
        candidate_params,
        results,
        n_splits=n_splits,
        metric_names=metric_names,
        return_train_score=return_train_score,
        more_results=more_results,
    )
    winner = best_of(cv_results) if best_of is not None else select_best(cv_results, refit_metric, refit_rule)
    best = {
        "best_index": winner,
        "best_score": float(cv_results[f"mean_test_{refit_metric}"][winner]),
        "best_params": candidate_params[winner],
        "refit_metric": refit_metric,
        "n_candidates": len(candidate_params),
        "n_failed": n_failed,
    }
    if refit_rule is not None:
        best["refit_rule"] = refit_rule
    return cv_results, best
