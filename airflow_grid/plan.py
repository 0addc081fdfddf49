"""Plan a study once: validate, load and snapshot the data, compute folds, expand and key the candidates.

Everything a worker needs is written under ``plans/<plan_id>/`` in the store, so evaluating a candidate needs
only the plan URI and an index: the same files give the same scores in a local process and in a pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sklearn

from airflow_grid import data, grid
from airflow_grid.spec import SearchSpec, content_hash, parse_spec
from airflow_grid.store import Store

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class Plan:
    """A planned study: where its files are and what its candidates are (a view over plan.json)."""

    uri: str
    document: dict[str, Any]

    @property
    def plan_id(self) -> str:
        return str(self.document["plan_id"])

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return list(self.document["candidates"])

    @property
    def n_splits(self) -> int:
        return int(self.document["n_splits"])

    @property
    def spec(self) -> SearchSpec:
        return parse_spec(self.document["spec"], self.document.get("extra_allowed", ()))

    @property
    def store_root(self) -> str:
        return self.uri.rsplit("/plans/", 1)[0]

    def file(self, name: str) -> str | None:
        relative = self.document["files"].get(name)
        return None if relative is None else str(relative)

    def reduce(self, ordered_results: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """cv_results_ and the best_* fields, from the candidates' results in candidate order."""
        from airflow_grid import results  # numpy/scipy reduction: not needed by the worker, which imports Plan

        spec = self.spec
        return results.reduce(
            [c["params"] for c in self.candidates],
            ordered_results,
            n_splits=self.n_splits,
            metric_names=spec.metric_names,
            return_train_score=spec.return_train_score,
            refit_metric=spec.refit_metric,
        )


def make_plan(spec: SearchSpec, store: Store, extra_allowed: tuple[str, ...] = ()) -> Plan:
    """Plan a study; raises :class:`~airflow_grid.spec.SpecError` before any candidate runs."""
    candidates = grid.expand(spec)
    grid.check_candidates(spec, candidates)
    estimator = grid.build_estimator(spec)
    dataset = data.load(spec, estimator)
    folds = data.make_folds(spec, estimator, dataset.X, dataset.y)
    n_fits = grid.check_budget(spec, len(candidates), len(folds))

    data_fingerprint = dataset.fingerprint()
    folds_hash = data.folds_hash(folds)
    sklearn_version = sklearn.__version__
    plan_id = content_hash({"spec": spec.fingerprint(), "data": data_fingerprint, "folds": folds_hash})[:24]
    directory = store.plan_dir(plan_id)

    files: dict[str, str | None] = {"folds": f"{directory}/folds.npz"}
    parts = {"X": dataset.X, "y": dataset.y, "X_holdout": dataset.X_holdout, "y_holdout": dataset.y_holdout}
    document: dict[str, Any] = {
        "plan_id": plan_id,
        "study": spec.name,
        "spec": spec.raw,
        # Every prefix the spec was validated with, $AIRFLOW_GRID_ALLOWED_TARGETS included: a pod may not carry it.
        "extra_allowed": list(dict.fromkeys([*spec.allowed, *extra_allowed])),
        "data_fingerprint": data_fingerprint,
        "folds_hash": folds_hash,
        "n_splits": len(folds),
        "n_samples": len(dataset.y),
        "n_fits": n_fits,
        "sklearn_version": sklearn_version,
        "resources": spec.resources.to_json(),
        "candidates": [
            {
                **candidate.to_json(),
                "key": grid.candidate_key(spec, candidate.params, folds_hash, data_fingerprint, sklearn_version),
            }
            for candidate in candidates
        ],
        "files": files,
    }
    if not store.exists(f"{directory}/{PLAN_FILE}"):
        for name, part in parts.items():
            if part is None:
                files[name] = None
                continue
            relative = f"{directory}/{data.table_filename(name, part)}"
            files[name] = relative
            store.write_bytes(relative, data.table_bytes(part))
        store.write_bytes(f"{directory}/folds.npz", data.folds_bytes(folds))
        store.write_json(f"{directory}/{PLAN_FILE}", document)  # last: its presence means the plan is whole
    return load_plan(store.url(directory))


def load_plan(uri: str) -> Plan:
    root, separator, plan_id = uri.rpartition("/plans/")
    if not separator:
        raise ValueError(f"{uri!r} is not a plan URI: expected <store root>/plans/<plan_id>.")
    store = Store(root)
    relative = f"plans/{plan_id}"
    return Plan(uri=uri, document=store.read_json(f"{relative}/{PLAN_FILE}"))
