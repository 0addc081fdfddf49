"""Plots of a study for its MLflow parent run: score per parameter value per estimator family, candidates by rank."""

from __future__ import annotations

import io
import math
from typing import Any

from airflow_grid.spec import is_object_spec
from airflow_grid.tracking.runs import param_text

#: Candidates the ranked bar chart shows (cv_results.json and the child runs hold them all).
TOP_RANKED = 50


def plots(cv_results: dict[str, list[Any]], refit_metric: str) -> dict[str, bytes]:
    """PNG plots: mean test score per parameter value (std bars) per estimator family, and a ranked bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean_key, std_key = f"mean_test_{refit_metric}", f"std_test_{refit_metric}"
    means, stds, params = cv_results[mean_key], cv_results[std_key], cv_results["params"]
    families = [_family(p) for p in params]
    panels: list[tuple[str, str, list[tuple[str, float, float]]]] = []
    for family in dict.fromkeys(families):
        members = [i for i, f in enumerate(families) if f == family]
        names = sorted({n for i in members for n, v in params[i].items() if not is_object_spec(v)})
        for name in names:
            best_per_value: dict[str, tuple[float, float]] = {}
            for i in members:
                if name not in params[i] or not math.isfinite(means[i]):
                    continue
                value = param_text(params[i][name])
                if value not in best_per_value or means[i] > best_per_value[value][0]:
                    best_per_value[value] = (means[i], stds[i])
            if best_per_value:
                panels.append((family, name, [(v, m, s) for v, (m, s) in best_per_value.items()]))
    images: dict[str, bytes] = {}
    if panels:
        columns = min(3, len(panels))
        rows = math.ceil(len(panels) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
        for axis, (family, name, points) in zip(axes.flat, panels, strict=False):
            axis.errorbar(
                range(len(points)), [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=4
            )
            axis.set_xticks(range(len(points)), [p[0] for p in points], rotation=30, ha="right")
            axis.set_title(f"{family}: {name.rsplit('__', 1)[-1]}", fontsize=10)
            axis.set_ylabel(f"mean {refit_metric} (best per value)", fontsize=8)
            axis.grid(alpha=0.3)
        for axis in list(axes.flat)[len(panels) :]:
            axis.set_visible(False)
        figure.suptitle("Mean CV score per parameter value (error bars: std over folds)")
        figure.tight_layout()
        images["score_by_param.png"] = _png(figure, plt)
    ranked = sorted(range(len(params)), key=lambda i: (cv_results[f"rank_test_{refit_metric}"][i], i))
    order = ranked[:TOP_RANKED]  # a bar per candidate of a 10,000-candidate grid took minutes and megapixels
    figure, axis = plt.subplots(figsize=(8, max(2.5, 0.28 * len(order) + 1)))
    labels = [f"#{cv_results[f'rank_test_{refit_metric}'][i]} {_label(params[i])}" for i in order]
    values = [means[i] if math.isfinite(means[i]) else 0.0 for i in order]
    axis.barh(range(len(order)), values, xerr=[stds[i] if math.isfinite(stds[i]) else 0.0 for i in order], capsize=2)
    axis.set_yticks(range(len(order)), labels, fontsize=7)
    axis.invert_yaxis()
    finite = [v for v in values if v]
    if finite:
        axis.set_xlim(max(0.0, min(finite) - 0.05 * abs(min(finite))), max(finite) * 1.01 if max(finite) > 0 else 0)
    axis.set_xlabel(f"mean test {refit_metric}")
    shown = "" if len(order) == len(ranked) else f" (the top {len(order)} of {len(ranked)})"
    axis.set_title(f"Candidates by rank{shown}")
    figure.tight_layout()
    images["ranked_candidates.png"] = _png(figure, plt)
    return images


def _family(params: dict[str, Any]) -> str:
    swaps = [param_text(v).split("(", 1)[0] for _, v in sorted(params.items()) if is_object_spec(v)]
    return "/".join(swaps) or "estimator"


def _label(params: dict[str, Any]) -> str:
    parts = [f"{n.rsplit('__', 1)[-1]}={param_text(v).split('(', 1)[0]}" for n, v in sorted(params.items())]
    return " ".join(parts)[:70]


def _png(figure: Any, plt: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
