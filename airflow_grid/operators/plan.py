"""Plan operator: turn the run's spec (with its overrides) into the candidate list that evaluate maps over."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from airflow.sdk import BaseOperator, Context, conf
from airflow.sdk.exceptions import AirflowFailException

from airflow_grid import lineage, overrides, settings
from airflow_grid import policy as trust
from airflow_grid.policy import DATA_PATH_VARIABLES
from airflow_grid.spec import SearchSpec, SpecError, load_spec_file, parse_spec
from airflow_grid.store import Store

DEFAULT_POOL = "grid_fits"  # [airflow_grid] default_pool, unless the deployment sets another


class PlanGridSearchOperator(BaseOperator):
    """Validate the spec, resolve the dataset version, snapshot data and folds, and return the candidates.

    Returns one item per evaluate task, ``{"plan_uri", "indices", "label", "cpu", "memory", "backend"}``: one
    candidate per task, or with the ``max_parallel`` param candidates dealt into at most that many tasks. A bad
    spec, a missing pool, or a grid over the budget fails here, without retries, before any candidate runs.
    """

    template_fields: Sequence[str] = ("spec_path", "store")
    ui_color = "#e8f4fd"

    def __init__(
        self,
        *,
        spec_path: str,
        store: str | None = None,
        grid_pool: str | None = None,
        pool_slots_per_candidate: int = 1,
        spec_dirs: Sequence[str] = (),
        data_roots: Sequence[str] | None = None,
        extra_allowed: Sequence[str] = (),
        backends: Sequence[str] = ("local",),
        max_rounds: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.backends = tuple(backends)
        self.max_rounds = max_rounds
        self.spec_path = spec_path
        self.store = store
        self.grid_pool = grid_pool or settings.default_pool()
        self.pool_slots_per_candidate = pool_slots_per_candidate
        self.spec_dirs = tuple(spec_dirs) or (str(Path(spec_path).parent),)
        self.data_roots = None if data_roots is None else tuple(data_roots)
        self.extra_allowed = tuple(extra_allowed)

    def execute(self, context: Context) -> list[dict[str, Any]]:
        self._lineage = lineage.Lineage()  # a failed try reports no input, not a previous try's (dag.test reuses us)
        params = dict(context["params"])
        try:
            if params.get("spec_path"):
                trust.check_spec_path(params["spec_path"], self.spec_dirs)
        except SpecError as error:
            raise AirflowFailException(f"invalid spec: {error}") from None
        self._check_pool()
        try:
            document, applied = overrides.spec_document(self.spec_path, params)
            extras = [event.extra for events in _asset_events(context).values() for event in events]
            version, source = overrides.dataset_version(params, extras, context.get("logical_date"))
            trust.check_dataset_version(version, source)
            self._resolve_data_path(document, context, version, untrusted=bool(params.get("spec")))
            spec = parse_spec(document, policy=settings.policy(self.extra_allowed))  # recorded in the plan
            self._check_backend(spec)
            if math.ceil(spec.resources.cpu) > self.pool_slots_per_candidate:
                raise SpecError(
                    "resources.cpu",
                    f"got {spec.resources.cpu_text}, more than the {self.pool_slots_per_candidate} pool slot(s) "
                    f"each evaluate task of this DAG takes in pool {self.grid_pool!r}.",
                    "lower resources.cpu, or build the DAG with a larger cpu so its tasks take more slots.",
                )
            # here, not at the top: every task process parses the DAG file, and only this task needs sklearn
            from airflow_grid.plan import make_plan, work_items

            plan = make_plan(spec, Store(self.store or settings.store()), self.extra_allowed)
        except SpecError as error:
            raise AirflowFailException(f"invalid spec: {error}") from error
        version = version or plan.document["data_fingerprint"][:12]
        self._lineage = lineage.plan_lineage(plan.document, version)
        self._check_rounds(plan.n_rounds, spec.strategy)
        candidates = plan.candidates
        items = work_items(plan, 0, list(range(len(candidates))), params.get("max_parallel"))
        max_map_length = conf.getint("core", "max_map_length", fallback=1024)
        if len(items) > max_map_length:
            raise AirflowFailException(
                f"the grid has {len(items)} evaluate tasks, more than [core] max_map_length={max_map_length}. "
                "Fix: set the max_parallel param (candidates are then grouped into that many tasks), shrink the "
                "grid, or raise max_map_length."
            )
        summary = {
            "plan_uri": plan.uri,
            "study": spec.name,
            "n_candidates": len(candidates),
            "n_fits": plan.document["n_fits"],
            "n_rounds": plan.n_rounds,
            "dataset_version": version,
            "dataset_version_source": source,
            "overrides": applied,
        }
        context["ti"].xcom_push(key="plan", value=summary)
        self.log.info(
            "Planned %s: %d candidates x %d folds = %d fits in %d tasks; dataset version %s (from %s); overrides %s",
            spec.name, len(candidates), plan.n_splits, plan.document["n_fits"], len(items), version, source,
            applied or "none",
        )  # fmt: skip
        unseeded = plan.document.get("unseeded") or []  # absent in plans written before the field existed
        if unseeded:
            from airflow_grid import randomness

            self.log.warning("%s", randomness.summary(unseeded, len(candidates)))
        return items

    def get_openlineage_facets_on_start(self) -> Any:
        """Empty: what the plan reads is known only once the run's conf, version and ``data.path`` are resolved."""
        return lineage.Lineage().to_operator_lineage()

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The dataset this run read (rendered ``data.path`` or the loader), with its version and fingerprint.

        Also the failure event's lineage (the provider falls back to this hook): empty if the plan failed before
        it read the data. ``None`` without the OpenLineage provider.
        """
        return getattr(self, "_lineage", lineage.Lineage()).to_operator_lineage()

    def _resolve_data_path(
        self, document: dict[str, Any], context: Context, version: str | None, *, untrusted: bool
    ) -> None:
        """Render ``data.path`` and, when conf chose it (a whole spec, or a version in a template), check its root."""
        data = document.get("data")
        if not (isinstance(data, dict) and isinstance(data.get("path"), str)):
            return
        template = data["path"]
        if version is None and "dataset_version" in template:
            # The fingerprint fallback needs the data loaded: it cannot choose the file (it would read "None").
            raise AirflowFailException(
                f"data.path {template!r} depends on dataset_version, but this run has none (no "
                "dataset_version param, no asset event with extra.dataset_version, no logical date). Fix: "
                'trigger with conf {"dataset_version": "<version>"}.'
            )
        document["data"] = {**data, "path": self._render_data_path(template, context, version)}
        roots = self._data_roots()
        if untrusted or ("{{" in template and roots):
            trust.check_data_root(document["data"]["path"], roots)

    def _data_roots(self) -> tuple[str, ...]:
        if self.data_roots is not None:
            return self.data_roots
        return tuple(trust.default_data_roots(load_spec_file(self.spec_path)))  # where the DAG's own spec reads

    def _render_data_path(self, path: str, context: Context, version: str | None) -> str:
        """Render ``data.path`` with the run's dates, params and dataset version, and nothing else.

        A whole spec may come from UI conf, so its path is untrusted: with the full task context a trigger could
        render ``{{ var.value.… }}`` or ``{{ conn.….password }}`` into a path and read the secret back from the
        error or the MLflow tags. Airflow's sandboxed Jinja environment still applies.
        """
        variables: Any = {name: context.get(name) for name in DATA_PATH_VARIABLES if name in context}
        variables["dataset_version"] = version
        try:
            return str(self.render_template(path, variables))
        except jinja2.TemplateError as error:
            raise AirflowFailException(
                f"invalid spec: data.path: cannot render {path!r} ({type(error).__name__}: {error}). Fix: use only "
                f"{', '.join('{{ ' + name + ' }}' for name in ('dataset_version', *DATA_PATH_VARIABLES))} in it."
            ) from None

    def _check_backend(self, spec: SearchSpec) -> None:
        if spec.backend not in self.backends:
            raise SpecError(
                "backend",
                f"got {spec.backend!r}; this DAG has the {', '.join(self.backends)} backend(s).",
                f"use one of {list(self.backends)}, or build the DAG with a KubernetesBackend.",
            )
        given = spec.raw.get("resources") or {}
        if spec.backend == "kubernetes" and not ("cpu" in given and "memory" in given):
            raise SpecError(
                "resources",
                f"got {given!r}; the kubernetes backend needs explicit CPU and memory limits for every pod.",
                "write resources: {cpu: 1, memory: 2Gi}.",
            )

    def _check_rounds(self, n_rounds: int, strategy: str) -> None:
        """A halving search needing more rounds than the DAG has waves would stop short: refuse it at plan."""
        if n_rounds > self.max_rounds:
            raise AirflowFailException(
                f"invalid spec: search.strategy: {strategy} needs {n_rounds} rounds, but this DAG has "
                f"{self.max_rounds} wave(s) of evaluate tasks. Fix: build the DAG with "
                f"grid_search_dag(max_rounds={n_rounds}) or more, or raise search.factor / min_resources so fewer "
                "rounds are needed."
            )

    def _check_pool(self) -> None:
        """A task in a missing pool waits forever: fail now with the command that creates it."""
        exists = pool_exists(self.grid_pool)
        if exists is False:
            raise AirflowFailException(
                f"pool {self.grid_pool!r} does not exist, so the evaluate tasks would wait forever. Fix: "
                f"airflow pools set {self.grid_pool} <CPUs you allow tuning to use> "
                "'airflow-grid candidate fits' --include-deferred"
            )
        if exists is None:
            self.log.warning("Could not check that pool %r exists (no metadata DB access here).", self.grid_pool)


def pool_exists(name: str) -> bool | None:
    """True/False when the metadata DB is reachable from this process (dag.test, in-process runs), else None."""
    try:
        from airflow.models.pool import Pool

        return Pool.get_pool(name) is not None
    except Exception:  # task processes under an executor have ORM access blocked by design
        return None


def _asset_events(context: Context) -> dict[Any, Any]:
    try:
        events = context.get("triggering_asset_events") or {}
    except Exception:  # the accessor raises outside asset-triggered runs in some versions
        return {}
    return dict(events.items()) if hasattr(events, "items") else {}
