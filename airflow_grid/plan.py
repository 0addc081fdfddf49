"""Plan a study once: validate, load and snapshot the data, compute folds, expand and key the candidates.

Everything a worker needs is written under ``plans/<plan_id>/`` in the store, so evaluating a candidate needs
only the plan URI and an index: the same files give the same scores in a local process and in a pod.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from airflow_grid import data, grid, versions
from airflow_grid.policy import Policy
from airflow_grid.spec import SearchSpec, content_hash, parse_spec
from airflow_grid.store import Store, bytes_check

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
        stored = self.document.get("policy")
        if stored:  # the policy the planner validated with: a pod's environment may not carry the deployment's
            return parse_spec(self.document["spec"], policy=Policy.from_json(stored))
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
            refit_rule=spec.refit_rule,
        )


def make_plan(spec: SearchSpec, store: Store, extra_allowed: tuple[str, ...] = ()) -> Plan:
    """Plan a study; raises :class:`~airflow_grid.spec.SpecError` before any candidate runs.

    A plan already in the store is reused only if plan.json parses and every snapshot file matches its recorded
    size and sha256; otherwise the files are rewritten (plan.json last), so a damaged snapshot heals on re-plan.
    """
    grid.check_budget(spec, grid.count_candidates(spec), grid.min_splits(spec))  # counted, before expanding
    candidates = grid.expand(spec)
    grid.check_candidates(spec, candidates)
    estimator = grid.build_estimator(spec)
    dataset = data.load(spec, estimator)
    folds = data.make_folds(spec, estimator, dataset.X, dataset.y, dataset.groups)
    n_fits = grid.check_budget(spec, len(candidates), len(folds))

    # Every prefix the spec was validated with, $AIRFLOW_GRID_ALLOWED_TARGETS included: a pod may not carry it.
    allowed = list(dict.fromkeys([*spec.allowed, *extra_allowed]))
    identity = {  # everything that can change a score; not "created", so re-planning finds the same plan
        "spec": spec.fingerprint(),
        "data": dataset.fingerprint(),
        "folds": data.folds_hash(folds),
        "versions": versions.runtime_versions(allowed),
        "result_format": versions.RESULT_FORMAT,
    }
    plan_id = content_hash(identity)[:24]
    directory = store.plan_dir(plan_id)
    store.touch_in_use(plan_id)  # first, so `airflow-grid gc` never removes a plan while it is being written
    if verify_plan(store, plan_id) is not None:
        return load_plan(store.url(directory))

    document, payloads = _document(spec, candidates, dataset, folds, directory, identity)
    document.update(plan_id=plan_id, n_fits=n_fits, extra_allowed=allowed, policy=spec.policy.to_json())
    for relative, payload in payloads:
        store.write_bytes(relative, payload)
    store.write_json(f"{directory}/{PLAN_FILE}", document)  # last: its presence means the plan is whole
    return load_plan(store.url(directory))


def _document(
    spec: SearchSpec,
    candidates: list[grid.Candidate],
    dataset: data.Dataset,
    folds: data.Folds,
    directory: str,
    identity: dict[str, Any],
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """plan.json's content (less plan_id, n_fits, extra_allowed) and its snapshot files as (path, bytes)."""
    data_fingerprint, folds_hash, library_versions = identity["data"], identity["folds"], identity["versions"]
    parts = {"X": dataset.X, "y": dataset.y, "X_holdout": dataset.X_holdout, "y_holdout": dataset.y_holdout}
    payloads = {
        name: (f"{directory}/{data.table_filename(name, part)}", data.table_bytes(part))
        for name, part in parts.items()
        if part is not None
    }
    payloads["folds"] = (f"{directory}/folds.npz", data.folds_bytes(folds))
    fit_parts = {"fit_params": dataset.fit_params, "fit_params_holdout": dataset.fit_params_holdout}
    for name, arrays in fit_parts.items():
        if arrays:  # only with fit_params: plans without them keep their files as before
            payloads[name] = (f"{directory}/{name}.npz", data.fit_params_bytes(arrays))
    document: dict[str, Any] = {
        "plan_id": None,
        "study": spec.name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),  # for gc's newest-first; not in plan_id
        "spec": spec.raw,
        "extra_allowed": None,
        "data_fingerprint": data_fingerprint,
        "folds_hash": folds_hash,
        "n_splits": len(folds),
        "n_samples": len(dataset.y),
        "n_fits": None,
        "versions": library_versions,
        "result_format": identity["result_format"],
        "sklearn_version": library_versions["scikit-learn"],  # kept for readers of the previous layout
        "resources": spec.resources.to_json(),
        "candidates": [
            {
                **candidate.to_json(),
                "key": grid.candidate_key(spec, candidate.params, folds_hash, data_fingerprint, library_versions),
            }
            for candidate in candidates
        ],
        "files": {
            name: payloads[name][0] if name in payloads else None
            for name in [*parts, "folds", *(n for n in fit_parts if n in payloads)]
        },
        "file_checks": {name: bytes_check(payload) for name, (_, payload) in payloads.items()},
    }
    return document, list(payloads.values())


def verify_plan(store: Store, plan_id: str) -> dict[str, Any] | None:
    """The stored plan document if plan.json parses and every snapshot file matches its check, else None."""
    directory = store.plan_dir(plan_id)
    try:
        document = store.read_json(f"{directory}/{PLAN_FILE}")
        files, checks = document["files"], document["file_checks"]
        if document["plan_id"] != plan_id:
            return None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    for name, relative in files.items():
        if relative is not None and store.file_check(relative) != checks.get(name):
            return None
    return dict(document)


def load_plan(uri: str) -> Plan:
    root, separator, plan_id = uri.rpartition("/plans/")
    if not separator:
        raise ValueError(f"{uri!r} is not a plan URI: expected <store root>/plans/<plan_id>.")
    store = Store(root)
    relative = f"plans/{plan_id}"
    document = store.read_json(f"{relative}/{PLAN_FILE}")
    if not isinstance(document, dict):
        raise ValueError(f"{uri}/{PLAN_FILE} holds a {type(document).__name__}, not a plan object")
    return Plan(uri=uri, document=document)
