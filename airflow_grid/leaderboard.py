"""The top candidates of a study as a fixed-width table, for the end of `airflow-grid run` and the select task's log.

Pure: reads a cv_results_ mapping (numpy columns, or the JSON lists of ``cv_results.json`` with NaN as ``NaN`` or
``null``) and returns text. Order is sklearn's ``rank_test_<refit metric>`` (failed fits, NaN means, rank last, as
sklearn ranks them), ties by candidate index, so the table agrees with ``cv_results_`` and ``best.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from airflow_grid.grid import candidate_label

DEFAULT_TOP = 10


def render(
    cv_results: Mapping[str, Any],
    refit_metric: str | None = None,
    *,
    top: int = DEFAULT_TOP,
    best_index: int | None = None,
) -> str:
    """The ``top`` best candidates: rank, mean ± std per test metric (refit metric first), mean fit time, params.

    ``best_index`` marks the winner with ``*`` (a refit rule such as one-standard-error may pick one below rank 1).
    Successive-halving results get a round column: the round and its resource (rows or an estimator parameter).
    """
    metrics = _metrics(cv_results, refit_metric)
    ranks = _numbers(cv_results[f"rank_test_{metrics[0]}"])
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))[: max(0, top)]
    rounds = "iter" in cv_results  # successive halving: which round, on how much resource
    header = ["rank", *metrics, "fit time", *(["round (resource)"] if rounds else []), "params"]
    rows = [
        [
            f"{'*' if i == best_index else ''}{int(ranks[i])}",
            *(_mean_std(cv_results, metric, i) for metric in metrics),
            _seconds(_numbers(cv_results["mean_fit_time"])[i]),
            *([f"{int(cv_results['iter'][i])} ({int(cv_results['n_resources'][i])})"] if rounds else []),
            candidate_label(dict(cv_results["params"][i])),
        ]
        for i in order
    ]
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.rjust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in [header, *rows]
    ]
    folds = sum(1 for key in cv_results if key.startswith("split") and key.endswith(f"_test_{metrics[0]}"))
    title = f"top {len(order)} of {len(ranks)} candidates by mean_test_{metrics[0]} (mean ± std over {folds} folds)"
    footer = ["* = winner"] if best_index in order and ranks[best_index] != 1 else []
    return "\n".join([title, *lines, *footer])


def _metrics(cv_results: Mapping[str, Any], refit_metric: str | None) -> list[str]:
    """Test metric names in cv_results_ order, the refit metric moved first."""
    names = [key.removeprefix("mean_test_") for key in cv_results if key.startswith("mean_test_")]
    if not names:
        raise ValueError(f"cv_results has no mean_test_<metric> column (keys: {sorted(cv_results)[:8]}...).")
    refit = refit_metric or names[0]
    if refit not in names:
        raise ValueError(f"refit_metric {refit!r} is not a test metric of these cv_results; use one of {names}.")
    return [refit, *(name for name in names if name != refit)]


def _numbers(column: Any) -> list[float]:
    """A column as floats; ``None`` (NaN written as JSON null) becomes NaN."""
    values: Sequence[Any] = column.tolist() if hasattr(column, "tolist") else column
    return [math.nan if value is None else float(value) for value in values]


def _mean_std(cv_results: Mapping[str, Any], metric: str, index: int) -> str:
    mean = _numbers(cv_results[f"mean_test_{metric}"])[index]
    std = _numbers(cv_results[f"std_test_{metric}"])[index]
    return "nan" if math.isnan(mean) else f"{mean:.4f} ± {std:.4f}"


def _seconds(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3f}s" if value < 10 else f"{value:.1f}s"
