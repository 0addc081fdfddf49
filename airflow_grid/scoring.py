"""Score a batch with a study's champion model: the work of the ``score_with_champion`` example DAG (no Airflow).

The batch is the study's own data, read through its spec (and so through the spec policy): the holdout rows when
the spec has a holdout (rows the model never saw), else all rows. Predictions go to the result store at
``predictions/<study>/<run_id>.csv``, one row per batch row (``row``, ``prediction``).
"""

from __future__ import annotations

import os
from typing import Any

from airflow_grid import data, grid
from airflow_grid.spec import load_spec_file, parse_spec
from airflow_grid.store import Store


def score_batch(
    spec_path: str | os.PathLike[str],
    *,
    run_id: str,
    announced: dict[str, Any] | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Predict the spec's batch with ``models:/<study>@champion``; ``announced`` is the triggering event's extra."""
    import pandas as pd

    from airflow_grid import tracking

    spec = parse_spec(load_spec_file(spec_path))
    dataset = data.load(spec, grid.build_estimator(spec))  # the same holdout split the refit scored
    X = dataset.X if dataset.X_holdout is None else dataset.X_holdout
    model, version = tracking.load_champion(spec.name)
    frame = pd.DataFrame({"row": range(len(X)), "prediction": model.predict(X)})
    store = store or Store()
    relative = f"predictions/{spec.name}/{run_id}.csv".replace(":", "_").replace("+", "_")
    store.write_bytes(relative, frame.to_csv(index=False).encode())
    return {
        "study": spec.name,
        "model_uri": f"models:/{spec.name}/{version}",
        "version": version,
        "announced_version": (announced or {}).get("version"),
        "rows": len(frame),
        "predictions": store.url(relative),
    }
