"""Plan a study once: validate, load and snapshot the data, compute folds, expand and key the candidates.

Everything a worker needs is written under ``plans/<plan_id>/`` in the store, so evaluating a candidate needs
only the plan URI and an index: the same files give the same scores in a local process and in a pod.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from airflow_grid import chains, costs, data, grid, halving, prefixes, randomness, versions
from airflow_grid.policy import Policy
from airflow_grid.spec import SearchSpec, content_hash, parse_spec
from airflow_grid.store import Store, bytes_check

PLAN_FILE = "plan.json"
#: Tasks a Kubernetes round keeps at least when it batches quick units (pods run beside each other).
KUBERNETES_MIN_ITEMS = 16


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

    @cached_property
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

    @property
    def n_rounds(self) -> int:
        """How many rounds (waves of evaluate tasks) the search needs: 1, or successive halving's n_iterations."""
        halving_schedule = self.document.get("halving")
        return int(halving_schedule["n_iterations"]) if halving_schedule else 1

    def row(self, iteration: int, index: int) -> dict[str, Any]:
        """One cv_results_ row to evaluate: candidate ``index`` in round ``iteration``, with its key and folds.

        A grid or random search has one round and its rows are the candidates. A halving round sets the resource
        (an estimator parameter into the params; ``n_samples`` through the round's sub-sampled folds), so its key
        is computed here from the same parts as at plan time.
        """
        candidate = self.document["candidates"][index]
        schedule = self.document.get("halving")
        if not schedule:
            if iteration != 0:
                raise ValueError(f"plan {self.plan_id} has one round; got round {iteration}.")
            return {**candidate, "iter": 0, "folds": "folds"}
        round_ = schedule["rounds"][iteration]
        params = halving.round_params(candidate["params"], schedule["resource"], round_["n_resources"])
        document = self.document
        key = grid.candidate_key(
            self.spec,
            params,
            round_["folds_hash"],
            document["data_fingerprint"],
            document["versions"],
            document["result_format"],
        )
        label = f"{candidate['label']} [round {iteration}, {schedule['resource']}={round_['n_resources']}]"
        return {
            "index": index,
            "iter": iteration,
            "params": params,
            "label": label,
            "key": key,
            "folds": round_["folds"],
            "n_resources": round_["n_resources"],
        }

    def remember_costs(self, rounds: list[list[int]], ordered_results: list[dict[str, Any]]) -> None:
        """Record what each unit of work took, so the next plan of this study orders and batches by it."""
        rows = [self.row(itr, index) for itr, indices in enumerate(rounds) for index in indices]
        costs.remember(Store(self.store_root), self.spec, rows, ordered_results)

    def rounds(self, lookup: halving.Lookup) -> list[list[int]]:
        """Each round's candidate indices in cv_results_ order, as far as ``lookup(iter, index)`` has results."""
        if not self.document.get("halving"):
            return [list(range(len(self.document["candidates"])))]
        return halving.replay(self.document, self.n_splits, lookup)

    def reduce(
        self, ordered_results: list[dict[str, Any]], rounds: list[list[int]] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """cv_results_ and the best_* fields from the rows' results in cv_results_ order (``rounds`` for halving)."""
        from airflow_grid import results  # numpy/scipy reduction: not needed by the worker, which imports Plan

        spec = self.spec
        common: dict[str, Any] = {
            "n_splits": self.n_splits,
            "metric_names": spec.metric_names,
            "return_train_score": spec.return_train_score,
            "refit_metric": spec.refit_metric,
        }
        if not self.document.get("halving"):
            params = [c["params"] for c in self.candidates]
            return results.reduce(params, ordered_results, refit_rule=spec.refit_rule, **common)
        if rounds is None or len(rounds) != self.n_rounds:
            raise ValueError(f"a halving study reduces after its {self.n_rounds} rounds, got {len(rounds or [])}.")
        rows = [self.row(itr, index) for itr, indices in enumerate(rounds) for index in indices]
        more = {"iter": [r["iter"] for r in rows], "n_resources": [r["n_resources"] for r in rows]}
        cv_results, best = results.reduce(
            [r["params"] for r in rows], ordered_results, more_results=more, best_of=halving.best_row, **common
        )
        last = len(ordered_results) - len(rounds[-1])
        winner = rows[best["best_index"]]
        best.update(
            best_candidate=winner["index"],
            best_iter=winner["iter"],
            halving={
                **self.document["halving"],
                "n_candidates_": [len(indices) for indices in rounds],
                "n_remaining_candidates_": halving.remaining(
                    self.document, rounds[-1], ordered_results[last:], self.n_splits
                ),
            },
        )
        return cv_results, best


def make_plan(spec: SearchSpec, store: Store, extra_allowed: tuple[str, ...] = ()) -> Plan:
    """Plan a study; raises :class:`~airflow_grid.spec.SpecError` before any candidate runs.

    A plan already in the store is reused only if plan.json parses and every snapshot file matches its recorded
    size and sha256; otherwise the files are rewritten (plan.json last), so a damaged snapshot heals on re-plan.
    """
    counted = grid.count_candidates(spec)  # None: decided by the data (halving_random, n_candidates: exhaust)
    if counted is not None:
        grid.check_budget(spec, counted, grid.min_splits(spec))  # counted, before expanding
        candidates = grid.expand(spec)
        grid.check_candidates(spec, candidates)
    estimator = grid.build_estimator(spec)
    dataset = data.load(spec, estimator)
    folds = data.make_folds(spec, estimator, dataset.X, dataset.y, dataset.groups)
    schedule = None
    if halving.is_halving(spec):
        halving.check_resource(spec, estimator, [])  # before scikit-learn's own check, which names no field
        bounds = halving.resource_bounds(spec, estimator, dataset.X, dataset.y, dataset.groups)
        if counted is None:
            counted = halving.first_round_size(spec, *bounds) or 0
            grid.check_budget(spec, counted, len(folds))
            candidates = grid.expand(spec, n_sampled=counted)
            grid.check_candidates(spec, candidates)
        halving.check_resource(spec, estimator, [c.params for c in candidates])
        schedule = halving.schedule(spec, len(candidates), *bounds)
    rows = sum(schedule.n_candidates_per_round) if schedule else len(candidates)
    n_fits = grid.check_budget(spec, rows, len(folds), rounds=schedule.n_iterations if schedule else 1)

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
    stored = verify_plan(store, plan_id)
    if stored is not None:  # the document just verified, not plan.json read and parsed a second time
        return Plan(uri=store.url(directory), document=stored)

    document, payloads = _document(spec, candidates, dataset, folds, directory, identity)
    if schedule is not None:
        _add_rounds(document, payloads, spec, schedule, dataset, folds, directory)
    document.update(plan_id=plan_id, n_fits=n_fits, extra_allowed=allowed, policy=spec.policy.to_json())
    for relative, payload in payloads.values():
        store.write_bytes(relative, payload)
    store.write_json(f"{directory}/{PLAN_FILE}", document)  # last: its presence means the plan is whole
    return load_plan(store.url(directory))


@grid.collector_paused()
def _document(
    spec: SearchSpec,
    candidates: list[grid.Candidate],
    dataset: data.Dataset,
    folds: data.Folds,
    directory: str,
    identity: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    """plan.json's content (less plan_id, n_fits, extra_allowed) and its snapshot files as (path, bytes)."""
    data_fingerprint, folds_hash, library_versions = identity["data"], identity["folds"], identity["versions"]
    key = grid.key_maker(spec, folds_hash, data_fingerprint, library_versions)
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
        "unseeded": randomness.unseeded(spec, candidates),  # what a fresh run may score differently; not in plan_id
        "candidates": [{**candidate.to_json(), "key": key(candidate.params)} for candidate in candidates],
        "files": {
            name: payloads[name][0] if name in payloads else None
            for name in [*parts, "folds", *(n for n in fit_parts if n in payloads)]
        },
        "file_checks": {name: bytes_check(payload) for name, (_, payload) in payloads.items()},
    }
    return document, payloads


def _add_rounds(
    document: dict[str, Any],
    payloads: dict[str, tuple[str, bytes]],
    spec: SearchSpec,
    schedule: halving.Schedule,
    dataset: data.Dataset,
    folds: data.Folds,
    directory: str,
) -> None:
    """Successive halving's schedule and each round's folds (sub-sampled with ``resource: n_samples``)."""
    rounds = []
    for itr, n_resources in enumerate(schedule.n_resources):
        name, folds_hash = "folds", document["folds_hash"]
        if schedule.resource == halving.N_SAMPLES:
            subsampled = halving.round_folds(folds, len(dataset.y), n_resources, spec.search["random_state"])
            name, folds_hash = f"folds_round{itr}", data.folds_hash(subsampled)
            payloads[name] = (f"{directory}/{name}.npz", data.folds_bytes(subsampled))
            document["files"][name] = payloads[name][0]
            document["file_checks"][name] = bytes_check(payloads[name][1])
        rounds.append({"iter": itr, "n_resources": n_resources, "folds": name, "folds_hash": folds_hash})
    document["halving"] = {**schedule.to_json(), "rounds": rounds}
    fingerprint, library_versions = document["data_fingerprint"], document["versions"]
    for candidate in document["candidates"]:  # a candidate's key is its first round's
        first = halving.round_params(candidate["params"], schedule.resource, rounds[0]["n_resources"])
        candidate["key"] = grid.candidate_key(spec, first, rounds[0]["folds_hash"], fingerprint, library_versions)


@grid.collector_paused()  # parsing plan.json allocates a dict per candidate
def verify_plan(store: Store, plan_id: str) -> dict[str, Any] | None:
    """The stored plan document if plan.json parses and every snapshot file matches its check, else None."""
    directory = store.plan_dir(plan_id)
    try:
        document = store.read_json(f"{directory}/{PLAN_FILE}")
        if document["plan_id"] != plan_id or not store.files_match(document):
            return None
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return dict(document)


@grid.collector_paused()  # parsing plan.json allocates a dict per candidate
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


def work_items(
    plan: Plan, iteration: int, indices: list[int], max_parallel: int | None = None, min_items: int | None = None
) -> list[dict[str, Any]]:
    """The mapped evaluate items of one round: ``{"plan_uri", "indices", "label", "cpu", "memory", "backend"}``
    (and ``"round"`` after the first; ``"timeout"`` and ``"n_folds"`` with a ``resources.timeout``), one per task of
    :func:`scheduled_units`: costliest first, quick units batched, at most ``max_parallel`` items."""
    spec = plan.spec
    items = []
    for group in scheduled_units(plan, iteration, indices, max_parallel, min_items):
        item: dict[str, Any] = {
            "plan_uri": plan.uri,
            "indices": group,
            "label": " | ".join(plan.row(iteration, index)["label"] for index in group),
            **spec.resources.to_json(),
            "backend": spec.backend,
        }
        if iteration:
            item["round"] = iteration
        if spec.resources.timeout is not None:  # with "timeout": the task's deadline (timeouts.task_deadline)
            item["n_folds"] = plan.n_splits
        items.append(item)
    return items


def units(plan: Plan, iteration: int, indices: list[int]) -> list[list[int]]:
    """A round's units of work (see :func:`share`), as candidate indices."""
    rows = [plan.row(iteration, index) for index in indices]
    return [[row["index"] for row in group] for _, group in share(plan.spec, rows)]


def scheduled_units(
    plan: Plan,
    iteration: int,
    indices: list[int],
    max_items: int | None = None,
    min_items: int | None = None,
    batch: bool = True,
) -> list[list[int]]:
    """A round's units of work grouped into tasks by predicted cost (:mod:`airflow_grid.costs`): the costliest
    first, quick units batched (with ``batch``, and not with ``units: candidate``, which keeps one candidate per
    task), never fewer tasks than ``min_items`` (default: the slots this machine's pool can give them) nor more
    than ``max_items``."""
    spec = plan.spec
    rows = [plan.row(iteration, index) for index in indices]
    groups = [group for _, group in share(spec, rows)]
    history = costs.load(Store(plan.store_root), spec.name)
    cost, in_seconds = costs.predict([[costs.signature(spec, row) for row in group] for group in groups], history)
    batch = batch and in_seconds and spec.units != "candidate"
    return costs.schedule(
        [[row["index"] for row in group] for group in groups],
        cost,
        quick_seconds=costs.QUICK_SECONDS[spec.backend] if batch else None,
        min_items=min_items or default_min_items(spec),
        max_items=max_items,
    )


def default_min_items(spec: SearchSpec) -> int:
    """How many tasks keep the slots busy: this machine's CPUs over each task's CPUs (the embedded default's pool
    has one slot per CPU), or :data:`KUBERNETES_MIN_ITEMS` pods."""
    if spec.backend == "kubernetes":
        return KUBERNETES_MIN_ITEMS
    return max(1, (os.cpu_count() or 1) // max(1, math.ceil(spec.resources.cpu)))


def share(spec: SearchSpec, rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows grouped into units of work whose shared work gives the same scores, in the rows' order:

    ``("chain", rows)``: a warm-start chain in ascending size (:mod:`airflow_grid.chains`); ``("prefix", rows)``:
    pipelines sharing every step but the last (:mod:`airflow_grid.prefixes`; not with fit params);
    ``("alone", [row])``: everything else. With ``units: candidate`` in the spec, or a ``resources.timeout``,
    every row is alone.
    """
    if spec.units == "candidate" or spec.resources.timeout is not None:
        return [("alone", [row]) for row in rows]
    chained, rest = chains.find(rows, lambda params: grid.build_estimator(spec, params))
    final = None if spec.fit_params else prefixes.final_step(grid.build_estimator(spec))
    shared, rest = prefixes.find(rest, final)
    groups = [("chain", c) for c in chained] + [("prefix", g) for g in shared] + [("alone", [r]) for r in rest]
    order = {row["index"]: position for position, row in enumerate(rows)}
    return sorted(groups, key=lambda group: min(order[row["index"]] for row in group[1]))
