"""DAG integrity, fast and without a metadata DB: what the dag-processor and the trigger form would see.

Every file in dags/ imports cleanly with connection and variable look-ups made to fail (a negative control proves
the guard catches a DAG that reads either at parse time); the grid-search DAGs map ``evaluate`` into the pool with
a candidate label; the Params reject bad conf exactly where Airflow validates a trigger; and the plan operator,
driven directly, resolves the dataset version in the documented order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
import yaml
from airflow.dag_processing.dagbag import DagBag
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Asset
from airflow.sdk.definitions.mappedoperator import MappedOperator
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError
from airflow.serialization.serialized_objects import DagSerialization

from airflow_grid import overrides
from airflow_grid.dag_factory import DEFAULT_REFIT_DAG_ID, grid_search_dag
from airflow_grid.operators import plan as plan_module
from airflow_grid.operators.evaluate import MAP_INDEX_TEMPLATE, LocalEvaluateOperator
from airflow_grid.operators.kubernetes import KubernetesEvaluateOperator
from airflow_grid.operators.plan import DEFAULT_POOL, PlanGridSearchOperator
from airflow_grid.operators.refit import RefitWinnerOperator
from airflow_grid.operators.select import SelectWinnerOperator
from airflow_grid.plan import load_plan

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
DAG_FILES = sorted(DAGS_DIR.glob("*.py"))
GRID_SEARCH_DAG_IDS = {"grid_search_nightly", "grid_search_on_dataset", "grid_search_halving"}


class ParseTimeLookup(RuntimeError):
    """Raised by the guard when a DAG file reads a connection or a variable while it is parsed."""


def _install_lookup_guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every connection/variable look-up path raise, and record each attempt (a swallowed one too).

    The Task SDK's ``BaseHook.get_connection``/``Connection.get``/``Variable.get`` all resolve through
    ``airflow.sdk.execution_time.context._get_connection``/``_get_variable`` (imported at call time), and the core
    models are the legacy paths a DAG file might still use.
    """
    import airflow.sdk.execution_time.context as sdk_context
    from airflow.models.connection import Connection as CoreConnection
    from airflow.models.variable import Variable as CoreVariable

    attempts: list[str] = []

    def deny(what: str) -> Callable[..., Any]:
        def guard(*args: Any, **kwargs: Any) -> Any:
            names = [a for a in args if isinstance(a, str)] + [str(v) for v in kwargs.values()]
            attempts.append(f"{what}:{names}")
            raise ParseTimeLookup(f"{what} {names} read while the DAG file is parsed")

        return guard

    monkeypatch.setattr(sdk_context, "_get_connection", deny("connection"))
    monkeypatch.setattr(sdk_context, "_get_variable", deny("variable"))
    monkeypatch.setattr(CoreConnection, "get_connection_from_secrets", classmethod(deny("connection")))
    monkeypatch.setattr(CoreVariable, "get", classmethod(deny("variable")))
    return attempts


def _parse(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[DagBag, list[str]]:
    attempts = _install_lookup_guard(monkeypatch)
    bag = DagBag(dag_folder=str(path))
    return bag, attempts


@pytest.fixture(scope="module")
def dagbag() -> Iterator[DagBag]:
    """The whole dags/ folder, parsed once with the look-up guard installed."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        bag, attempts = _parse(DAGS_DIR, monkeypatch)
    assert not bag.import_errors, bag.import_errors
    assert not attempts, attempts
    yield bag


def serialized(dag: DAG) -> Any:
    """The DAG as the scheduler and API server hold it (what ``create_dagrun`` validates conf against)."""
    return DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))


# --- every file parses, offline -----------------------------------------------------------------------------------


def test_dags_folder_is_not_empty() -> None:
    assert {p.name for p in DAG_FILES} >= {"grid_search_nightly.py", "grid_search_on_dataset.py", "grid_refit.py"}


@pytest.mark.parametrize("path", DAG_FILES, ids=[p.name for p in DAG_FILES])
def test_dag_file_imports_without_errors_or_lookups(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bag, attempts = _parse(path, monkeypatch)
    assert not bag.import_errors, bag.import_errors
    assert attempts == [], f"{path.name} read {attempts} at parse time"
    # At least one DAG came from this very file (a file skipped by safe mode would silently yield none).
    assert bag.dags and all(Path(d.fileloc).resolve() == path.resolve() for d in bag.dags.values())
    for dag in bag.dags.values():
        serialized(dag)  # what the dag-processor stores must serialize


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("from airflow.sdk import BaseHook\nBaseHook.get_connection('warehouse')\n", "connection"),
        ("from airflow.sdk import Variable\nVariable.get('threshold')\n", "variable"),
        ("from airflow.models import Variable\nVariable.get('threshold')\n", "variable"),
    ],
    ids=["sdk-connection", "sdk-variable", "core-variable"],
)
def test_guard_catches_a_dag_that_reads_at_parse_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, match: str
) -> None:
    """Negative control: the integrity test above can fail."""
    path = tmp_path / "bad_dag.py"
    path.write_text(f"{body}from airflow.sdk import DAG\n\nwith DAG('reads_at_parse', schedule=None):\n    pass\n")
    bag, attempts = _parse(path, monkeypatch)
    assert attempts and attempts[0].startswith(match)
    assert any("ParseTimeLookup" in error for error in bag.import_errors.values()), bag.import_errors


def test_guard_records_a_swallowed_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sneaky_dag.py"
    path.write_text(
        "from airflow.sdk import DAG, BaseHook\n"
        "try:\n    BaseHook.get_connection('warehouse')\nexcept Exception:\n    pass\n"
        "with DAG('sneaky', schedule=None):\n    pass\n"
    )
    bag, attempts = _parse(path, monkeypatch)
    assert not bag.import_errors
    assert attempts == ["connection:['warehouse']"]


# --- the DAGs and their shape --------------------------------------------------------------------------------------


def test_expected_dags_exist(dagbag: DagBag) -> None:
    assert set(dagbag.dags) == GRID_SEARCH_DAG_IDS | {DEFAULT_REFIT_DAG_ID, "grid_store_gc", "score_with_champion"}
    grid_dags = {dag_id for dag_id, dag in dagbag.dags.items() if "evaluate" in dag.task_dict}
    assert grid_dags == GRID_SEARCH_DAG_IDS


EVALUATE_TASKS = {"evaluate": LocalEvaluateOperator, "evaluate_kubernetes": KubernetesEvaluateOperator}


@pytest.mark.parametrize("task_id", sorted(EVALUATE_TASKS))
@pytest.mark.parametrize("dag_id", sorted(GRID_SEARCH_DAG_IDS))
def test_evaluate_is_mapped_pooled_and_labelled(dagbag: DagBag, dag_id: str, task_id: str) -> None:
    dag = dagbag.dags[dag_id]
    evaluate = dag.get_task(task_id)
    assert isinstance(evaluate, MappedOperator)
    assert evaluate.operator_class is EVALUATE_TASKS[task_id]
    assert evaluate.pool == DEFAULT_POOL == "grid_fits"
    assert evaluate.pool_slots >= 1
    assert evaluate.map_index_template == MAP_INDEX_TEMPLATE
    assert "candidate" in evaluate.map_index_template
    # The plan checks the same pool and slot count the evaluate tasks will use.
    plan = dag.get_task("plan")
    assert isinstance(plan, PlanGridSearchOperator)
    assert (plan.grid_pool, plan.pool_slots_per_candidate) == (evaluate.pool, evaluate.pool_slots)
    assert plan.retries == 0  # a bad spec is not retried
    # The scheduler sees the same after serialization.
    stored = serialized(dag).get_task(task_id)
    assert (stored.pool, stored.pool_slots) == (evaluate.pool, evaluate.pool_slots)
    assert stored.partial_kwargs["map_index_template"] == MAP_INDEX_TEMPLATE


@pytest.mark.parametrize("dag_id", sorted(GRID_SEARCH_DAG_IDS))
def test_task_graph_plan_evaluate_select_trigger(dagbag: DagBag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    upstream = {task.task_id: task.upstream_task_ids for task in dag.tasks}
    waves = {"evaluate", "evaluate_kubernetes"}
    expected = {
        "plan": set(),
        "local_candidates": {"plan"},
        "evaluate": {"local_candidates"},
        "kubernetes_candidates": {"plan"},
        "evaluate_kubernetes": {"kubernetes_candidates"},
    }
    for r in range(1, 4 if dag_id == "grid_search_halving" else 1):  # a wave per successive-halving round
        expected |= {
            f"round_{r}": {"plan", *waves},  # survivors from every earlier round's results
            f"local_candidates_round_{r}": {f"round_{r}"},
            f"evaluate_round_{r}": {f"local_candidates_round_{r}"},
            f"kubernetes_candidates_round_{r}": {f"round_{r}"},
            f"evaluate_kubernetes_round_{r}": {f"kubernetes_candidates_round_{r}"},
        }
        waves |= {f"evaluate_round_{r}", f"evaluate_kubernetes_round_{r}"}
        assert dag.get_task(f"round_{r}").trigger_rule == "none_failed"  # the unused backend's wave is skipped
    assert upstream == {**expected, "select": {"plan", *waves}, "trigger_refit": {"select"}}
    select = dag.get_task("select")
    assert isinstance(select, SelectWinnerOperator)
    assert select.trigger_rule == "none_failed_min_one_success"  # the unused backend's evaluate is skipped
    trigger = dag.get_task("trigger_refit")
    assert isinstance(trigger, TriggerDagRunOperator)
    assert trigger.trigger_dag_id == DEFAULT_REFIT_DAG_ID
    assert trigger.trigger_dag_id in dagbag.dags
    assert trigger.skip_when_already_exists  # a rerun of the study does not trigger a second refit
    assert dag.max_active_runs == 1


def test_local_only_dag_has_one_evaluate_task() -> None:
    dag = grid_search_dag("grid_local_only", DAGS_DIR / "specs" / "iris_random_forest.yaml")
    assert set(dag.task_ids) == {"plan", "evaluate", "select", "trigger_refit"}
    assert dag.get_task("evaluate").upstream_task_ids == {"plan"}


def test_schedules(dagbag: DagBag) -> None:
    nightly = dagbag.dags["grid_search_nightly"]
    assert nightly.schedule == "0 2 * * *"
    assert nightly.timetable.expression == "0 2 * * *"
    assert not nightly.catchup
    on_dataset = dagbag.dags["grid_search_on_dataset"]
    assets = on_dataset.timetable.asset_condition.objects
    assert [a.name for a in assets if isinstance(a, Asset)] == ["digits_dataset"]
    assert dagbag.dags[DEFAULT_REFIT_DAG_ID].schedule is None  # triggered only


def test_store_gc_dag_runs_weekly_one_task(dagbag: DagBag) -> None:
    gc_dag = dagbag.dags["grid_store_gc"]
    assert gc_dag.schedule == "@weekly" and not gc_dag.catchup
    assert list(gc_dag.task_dict) == ["gc"]


def test_refit_dag(dagbag: DagBag) -> None:
    refit_dag = dagbag.dags[DEFAULT_REFIT_DAG_ID]
    assert refit_dag.task_ids == ["refit"]
    assert isinstance(refit_dag.get_task("refit"), RefitWinnerOperator)
    assert "params.parent_run_id" in refit_dag.get_task("refit").parent_run_id


def test_map_index_template_renders_the_candidate_label() -> None:
    label = "clf=SVC C=10 kernel=rbf"
    rendered = (
        jinja2.Environment().from_string(MAP_INDEX_TEMPLATE).render(task=SimpleNamespace(candidate={"label": label}))
    )
    assert rendered == label


@pytest.mark.parametrize(("cpu", "slots"), [(1, 1), (0.5, 1), (2, 2), (2.5, 3)])
def test_factory_pool_slots_follow_cpu(cpu: float, slots: int) -> None:
    dag = grid_search_dag("grid_cpu_test", DAGS_DIR / "specs" / "iris_random_forest.yaml", pool="tuning", cpu=cpu)
    evaluate = dag.get_task("evaluate")
    assert (evaluate.pool, evaluate.pool_slots) == ("tuning", slots)
    assert dag.get_task("plan").grid_pool == "tuning"


# --- Params: validated where a trigger (UI, REST, CLI, dag.test) validates them ------------------------------------

BAD_CONF = [
    pytest.param({"cv": 1}, r"param cv: 1 is less than the minimum of 2", id="cv-1"),
    pytest.param({"cv": "five"}, r"param cv", id="cv-string"),
    pytest.param({"resources": {"cpu": "lots"}}, r"param resources: 'lots' does not match", id="cpu-lots"),
    pytest.param({"resources": {"cpu": 0}}, r"param resources", id="cpu-0"),
    pytest.param({"resources": {"cpu": 1, "gpu": 1}}, r"param resources: .*gpu", id="resources-unknown-key"),
    pytest.param({"resources": {"memory": "lots"}}, r"param resources", id="memory-lots"),
    pytest.param({"max_parallel": 0}, r"param max_parallel: 0 is less than the minimum of 1", id="max-parallel-0"),
    pytest.param({"max_parallel": 5000}, r"param max_parallel", id="max-parallel-huge"),
    pytest.param({"backend": "spark"}, r"param backend: 'spark' is not one of", id="backend-spark"),
    pytest.param({"dataset_version": "v 1; rm -rf"}, r"param dataset_version", id="dataset-version-spaces"),
    pytest.param({"param_grid": "C=1"}, r"param param_grid", id="grid-string"),
    pytest.param({"search": {"strategy": "bayes"}}, r"param search: 'bayes' is not one of", id="search-strategy"),
    pytest.param({"search": {"strategy": "random", "n_iter": 0}}, r"param search: 0 is less", id="search-n-iter-0"),
    pytest.param({"search": {"strategy": "random", "seed": 1}}, r"param search: .*seed", id="search-unknown-key"),
    pytest.param({"param_distributions": "C=1"}, r"param param_distributions", id="distributions-string"),
    pytest.param({"scoring": 3}, r"param scoring", id="scoring-number"),
    pytest.param({"spec": ["not", "a", "mapping"]}, r"param spec", id="spec-list"),
]

GOOD_CONF = [
    pytest.param({}, id="empty"),
    pytest.param({"cv": 3}, id="cv-3"),
    pytest.param({"cv": {"_target_": "sklearn.model_selection.KFold", "n_splits": 3}}, id="cv-splitter"),
    pytest.param({"resources": {"cpu": "500m", "memory": "1Gi"}}, id="resources-quantities"),
    pytest.param({"resources": {"cpu": 2}}, id="resources-number"),
    pytest.param({"max_parallel": 4}, id="max-parallel"),
    pytest.param({"backend": "local"}, id="backend-local"),
    pytest.param({"backend": "kubernetes"}, id="backend-kubernetes"),
    pytest.param({"dataset_version": "2026-11-24"}, id="dataset-version"),
    pytest.param({"param_grid": [{"clf__C": [1, 10]}]}, id="grid-list"),
    pytest.param(
        {
            "search": {"strategy": "random", "n_iter": 4, "random_state": 0},
            "param_distributions": {"clf__C": {"_target_": "scipy.stats.loguniform", "a": 0.01, "b": 100}},
        },
        id="random-search",
    ),
    pytest.param({"scoring": ["accuracy", "f1_macro"]}, id="scoring-list"),
    pytest.param({"spec": {"name": "x"}}, id="whole-spec"),  # the spec itself is validated at plan
]


@pytest.mark.parametrize("dag_id", sorted(GRID_SEARCH_DAG_IDS))
@pytest.mark.parametrize(("conf", "match"), BAD_CONF)
def test_params_reject_bad_conf(dagbag: DagBag, dag_id: str, conf: dict[str, Any], match: str) -> None:
    params = serialized(dagbag.dags[dag_id]).params
    with pytest.raises(ParamValidationError, match=match):
        params.deep_merge(conf).validate()


@pytest.mark.parametrize("dag_id", sorted(GRID_SEARCH_DAG_IDS))
@pytest.mark.parametrize("conf", GOOD_CONF)
def test_params_accept_valid_overrides(dagbag: DagBag, dag_id: str, conf: dict[str, Any]) -> None:
    resolved = serialized(dagbag.dags[dag_id]).params.deep_merge(copy.deepcopy(conf)).validate()
    assert {k: resolved[k] for k in conf} == conf
    assert all(resolved[k] is None for k in resolved if k not in conf)  # defaults: the DAG's spec file


def test_sdk_params_validate_the_same(dagbag: DagBag) -> None:
    """The authoring-side ParamsDict (what the trigger form is built from) agrees with the serialized one."""
    params = copy.deepcopy(dagbag.dags["grid_search_nightly"].params)
    with pytest.raises(ParamValidationError, match="param cv"):
        params.update({"cv": 1})
        params.validate()


@pytest.mark.parametrize(
    ("conf", "ok"),
    [({"parent_run_id": "0123456789abcdef0123456789abcdef"}, True), ({"parent_run_id": "not-a-run"}, False)],
    ids=["hex-run-id", "bad-run-id"],
)
def test_refit_params(dagbag: DagBag, conf: dict[str, Any], ok: bool) -> None:
    params = serialized(dagbag.dags[DEFAULT_REFIT_DAG_ID]).params.deep_merge(conf)
    if ok:
        assert params.validate()["parent_run_id"] == conf["parent_run_id"]
    else:
        with pytest.raises(ParamValidationError, match="param parent_run_id"):
            params.validate()


# --- dataset version: conf > asset event extra > logical date > data fingerprint -----------------------------------

DATE = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("params", "extras", "logical_date", "expected"),
    [
        ({"dataset_version": "conf-v"}, [{"dataset_version": "asset-v"}], DATE, ("conf-v", "conf")),
        ({}, [{"dataset_version": "asset-v"}], DATE, ("asset-v", "asset_event")),
        (
            {"dataset_version": None},
            [{}, {"other": 1}, {"dataset_version": "asset-v"}],
            DATE,
            ("asset-v", "asset_event"),
        ),
        ({}, [{"other": 1}], DATE, ("2026-11-24", "logical_date")),
        ({}, [], DATE, ("2026-11-24", "logical_date")),
        ({}, [], None, (None, "fingerprint")),
        ({"dataset_version": ""}, [{"dataset_version": ""}], None, (None, "fingerprint")),
    ],
    ids=["conf-wins", "asset-over-date", "first-asset-with-version", "date", "date-no-events", "none", "empty-strings"],
)
def test_dataset_version_precedence(
    params: dict[str, Any], extras: list[dict[str, Any]], logical_date: datetime | None, expected: tuple[Any, str]
) -> None:
    assert overrides.dataset_version(params, extras, logical_date) == expected


class _FakeTI:
    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


@pytest.fixture
def plan_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_doc: Callable[..., dict[str, Any]]
) -> PlanGridSearchOperator:
    monkeypatch.setenv("AIRFLOW_GRID_STORE", str(tmp_path / "store"))
    monkeypatch.setattr(plan_module, "pool_exists", lambda name: True)  # the pool check has its own DB test
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(iris_doc(param_grid={"clf__C": [0.1, 10]})))
    return PlanGridSearchOperator(task_id="plan", spec_path=str(spec_path))


def _plan_context(params: dict[str, Any], events: dict[Any, Any], logical_date: datetime | None) -> dict[str, Any]:
    full = {name: None for name in ("spec", "spec_path", "param_grid", "cv", "scoring", "resources", "backend")}
    return {
        "params": {**full, "dataset_version": None, "max_parallel": None, **params},
        "triggering_asset_events": events,
        "logical_date": logical_date,
        "ti": _FakeTI(),
    }


@pytest.mark.parametrize(
    ("params", "extra", "logical_date", "version", "source"),
    [
        ({"dataset_version": "conf-v"}, {"dataset_version": "asset-v"}, DATE, "conf-v", "conf"),
        ({}, {"dataset_version": "asset-v"}, DATE, "asset-v", "asset_event"),
        ({}, {"unrelated": True}, DATE, "2026-11-24", "logical_date"),
        ({}, None, None, None, "fingerprint"),
    ],
    ids=["conf", "asset-event", "logical-date", "fingerprint"],
)
def test_plan_operator_records_dataset_version(
    plan_operator: PlanGridSearchOperator,
    params: dict[str, Any],
    extra: dict[str, Any] | None,
    logical_date: datetime | None,
    version: str | None,
    source: str,
) -> None:
    asset = Asset(name="digits_dataset", uri="file:///datasets/digits")
    events = {} if extra is None else {asset: [SimpleNamespace(extra=extra)]}
    context = _plan_context(params, events, logical_date)
    candidates = plan_operator.execute(context)  # type: ignore[arg-type]
    summary = context["ti"].pushed["plan"]
    assert summary["dataset_version_source"] == source
    if version is None:  # the data fingerprint, shortened
        fingerprint = load_plan(candidates[0]["plan_uri"]).document["data_fingerprint"]
        assert summary["dataset_version"] == fingerprint[:12]
    else:
        assert summary["dataset_version"] == version
    assert [c["label"] for c in candidates] == ["C=0.1", "C=10"]
    assert [c["indices"] for c in candidates] == [[0], [1]]
    assert summary["n_candidates"] == 2 and summary["n_fits"] == 6


def test_plan_operator_deals_candidates_into_max_parallel_tasks(plan_operator: PlanGridSearchOperator) -> None:
    context = _plan_context({"param_grid": {"clf__C": [0.1, 1, 10, 100, 1000]}, "max_parallel": 2}, {}, None)
    items = plan_operator.execute(context)  # type: ignore[arg-type]
    assert [item["indices"] for item in items] == [[0, 2, 4], [1, 3]]
    assert math.isclose(float(items[0]["cpu"]), 1.0)
    assert context["ti"].pushed["plan"]["overrides"] == ["param_grid"]


def test_plan_operator_plans_a_random_search_from_conf(plan_operator: PlanGridSearchOperator) -> None:
    """Trigger conf switches the file's grid to a random search: its param_grid is replaced, not a conflict."""
    conf = {
        "search": {"strategy": "random", "n_iter": 4, "random_state": 0},
        "param_distributions": {"clf__C": {"_target_": "scipy.stats.loguniform", "a": 0.01, "b": 100}},
        "max_parallel": 1,
    }
    context = _plan_context(conf, {}, None)
    items = plan_operator.execute(context)  # type: ignore[arg-type]
    assert [item["indices"] for item in items] == [[0, 1, 2, 3]]
    assert context["ti"].pushed["plan"]["overrides"] == ["search", "param_distributions"]


def test_asset_dataset_version_selects_the_data_file(
    plan_operator: PlanGridSearchOperator, tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    """``data.path`` is rendered with the resolved version: the asset event's version picks the file that is read."""
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame
    frame.to_csv(tmp_path / "iris-v2.csv", index=False)  # only v2 exists: another version cannot plan
    spec_path = Path(plan_operator.spec_path)
    document = iris_doc(param_grid={"clf__C": [1]})
    document["data"] = {"path": str(tmp_path / "iris-{{ dataset_version }}.csv"), "target": "target"}
    spec_path.write_text(yaml.safe_dump(document))
    asset = Asset(name="digits_dataset", uri="file:///datasets/digits")
    context = _plan_context({}, {asset: [SimpleNamespace(extra={"dataset_version": "v2"})]}, DATE)
    items = plan_operator.execute(context)  # type: ignore[arg-type]
    plan = load_plan(items[0]["plan_uri"])
    assert plan.document["spec"]["data"]["path"] == str(tmp_path / "iris-v2.csv")
    assert plan.document["n_samples"] == 150
    assert context["ti"].pushed["plan"]["dataset_version"] == "v2"


@pytest.mark.parametrize("version", ["../../etc/passwd#", "..", "v1/../../x", "a b"])
@pytest.mark.parametrize("source", ["conf", "asset_event"])
def test_a_dataset_version_cannot_climb_out_of_the_data_directory(
    plan_operator: PlanGridSearchOperator,
    tmp_path: Path,
    iris_doc: Callable[..., dict[str, Any]],
    version: str,
    source: str,
) -> None:
    """Asset extras are not validated by Airflow: a version is checked as a name before it is rendered into a path."""
    document = iris_doc()
    document["data"] = {"path": str(tmp_path / "data" / "{{ dataset_version }}" / "iris.csv"), "target": "target"}
    Path(plan_operator.spec_path).write_text(yaml.safe_dump(document))
    asset = Asset(name="digits_dataset", uri="file:///datasets/digits")
    params, events = ({"dataset_version": version}, {}) if source == "conf" else ({}, {asset: [
        SimpleNamespace(extra={"dataset_version": version})]})  # fmt: skip
    with pytest.raises(AirflowFailException, match=rf"spec\.dataset_version: got .*\(from {source}\).*Fix: "):
        plan_operator.execute(_plan_context(params, events, DATE))  # type: ignore[arg-type]


def test_templated_data_path_without_a_version_fails_at_plan(
    plan_operator: PlanGridSearchOperator, tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    """A manual run with no version cannot pick a file by version: say so, instead of reading ``iris-None.csv``."""
    document = iris_doc()
    document["data"] = {"path": str(tmp_path / "iris-{{ dataset_version }}.csv"), "target": "target"}
    Path(plan_operator.spec_path).write_text(yaml.safe_dump(document))
    with pytest.raises(AirflowFailException, match=r"depends on dataset_version, but this run has none.*conf"):
        plan_operator.execute(_plan_context({}, {}, None))  # type: ignore[arg-type]


class _Secrets:
    """What ``var`` and ``conn`` give a task's templates: here every name resolves to the secret."""

    def __getattr__(self, name: str) -> Any:
        return self

    def __str__(self) -> str:
        return "s3cr3t-token"


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{{ var.value.api_key }}", "'var' is undefined"),
        ("{{ conn.aws_default.password }}", "'conn' is undefined"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
    ],
    ids=["variable", "connection", "sandbox-escape"],
)
def test_data_path_from_ui_conf_cannot_render_secrets(
    plan_operator: PlanGridSearchOperator,
    tmp_path: Path,
    iris_doc: Callable[..., dict[str, Any]],
    template: str,
    why: str,
) -> None:
    """A whole spec in UI conf is untrusted: its data.path sees the run's dates, params and version, no secrets."""
    document = iris_doc()
    document["data"] = {"path": f"{tmp_path}/{template}.csv", "target": "target"}
    context = _plan_context({"spec": document, "dataset_version": "v1"}, {}, DATE)
    context.update(var=_Secrets(), conn=_Secrets(), macros=_Secrets())
    with pytest.raises(AirflowFailException, match=r"invalid spec: data\.path: cannot render") as raised:
        plan_operator.execute(context)  # type: ignore[arg-type]
    assert why in str(raised.value)
    assert "{{ dataset_version }}" in str(raised.value)  # the fix names what may be used
    assert "s3cr3t-token" not in str(raised.value)


def test_data_path_renders_the_documented_variables(
    plan_operator: PlanGridSearchOperator, tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    """README: ``{{ ds }}``, ``{{ params.dataset_version }}`` and ``{{ dataset_version }}`` work in data.path."""
    from sklearn.datasets import load_iris

    load_iris(as_frame=True).frame.to_csv(tmp_path / "iris-2026-11-24-v3-v3.csv", index=False)
    document = iris_doc(param_grid={"clf__C": [1]})
    path = "iris-{{ ds }}-{{ params.dataset_version }}-{{ dataset_version }}.csv"
    document["data"] = {"path": f"{tmp_path}/{path}", "target": "target"}
    context = _plan_context({"spec": document, "dataset_version": "v3"}, {}, DATE)
    context["ds"] = DATE.date().isoformat()
    plan_operator.data_roots = (str(tmp_path),)
    items = plan_operator.execute(context)  # type: ignore[arg-type]
    assert load_plan(items[0]["plan_uri"]).document["spec"]["data"]["path"] == f"{tmp_path}/iris-2026-11-24-v3-v3.csv"


@pytest.mark.parametrize(
    ("path", "roots", "inside"),
    [
        ("/data/iris/v1.csv", ["/data/iris/"], True),
        ("file:///data/iris/v1.csv", ["/data/iris/"], True),
        ("/data/iris/../../etc/passwd", ["/data/iris/"], False),
        ("/data/iris-other/v1.csv", ["/data/iris"], False),
        ("/data/iris/v1.csv", [], False),
        ("s3://bucket/churn/v=1/train.parquet", ["s3://bucket/churn/"], True),
        ("S3://bucket/churn/v=1/train.parquet", ["s3://bucket/churn/"], True),
        ("s3://bucket/churn/../payroll/x.parquet", ["s3://bucket/churn/"], False),
        ("s3://other/churn/x.parquet", ["s3://bucket/churn/"], False),
        ("gs://bucket/churn/x.parquet", ["s3://bucket/churn/"], False),
        ("/bucket/churn/x.parquet", ["s3://bucket/churn/"], False),
    ],
)
def test_path_within_data_roots(path: str, roots: list[str], inside: bool) -> None:
    assert overrides.path_within(path, roots) is inside


def test_path_within_follows_symlinks(tmp_path: Path) -> None:
    root, outside = tmp_path / "data", tmp_path / "secrets"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    assert overrides.path_within(str(root / "iris.csv"), [str(root)])
    assert not overrides.path_within(str(root / "link" / "key.csv"), [str(root)])


@pytest.mark.parametrize(
    ("data", "roots"),
    [
        ({"path": "s3://bucket/churn/v={{ dataset_version }}/train.parquet"}, ["s3://bucket/churn/"]),
        ({"path": "/data/iris-{{ dataset_version }}.csv"}, ["/data/"]),
        ({"path": "/data/iris/{{ ds }}/"}, ["/data/iris/"]),
        ({"path": "/data/iris.csv"}, ["/data/"]),
        ({"path": "{{ params.where }}"}, []),
        ({"path": "/{{ ds }}/iris.csv"}, []),
        ({"_target_": "sklearn.datasets.load_iris"}, []),
    ],
)
def test_default_data_roots_are_where_the_dag_spec_reads(data: dict[str, Any], roots: list[str]) -> None:
    assert overrides.default_data_roots({"data": data}) == roots


def _csv_spec(iris_doc: Callable[..., dict[str, Any]], path: Path) -> dict[str, Any]:
    from sklearn.datasets import load_iris

    path.parent.mkdir(parents=True, exist_ok=True)
    load_iris(as_frame=True).frame.to_csv(path, index=False)
    document = iris_doc(param_grid={"clf__C": [1]})
    document["data"] = {"path": str(path), "target": "target"}
    return document


def test_conf_spec_reads_only_under_the_dag_data_roots(
    plan_operator: PlanGridSearchOperator, tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    """UI conf is untrusted: its spec may read where the DAG's own spec reads, not any file the worker can."""
    dag_spec = _csv_spec(iris_doc, tmp_path / "datasets" / "iris.csv")
    Path(plan_operator.spec_path).write_text(yaml.safe_dump(dag_spec))
    inside = _csv_spec(iris_doc, tmp_path / "datasets" / "iris-v2.csv")
    items = plan_operator.execute(_plan_context({"spec": inside}, {}, DATE))  # type: ignore[arg-type]
    assert load_plan(items[0]["plan_uri"]).document["n_samples"] == 150

    outside = _csv_spec(iris_doc, tmp_path / "elsewhere" / "iris.csv")
    with pytest.raises(AirflowFailException, match=r"spec\.data\.path: got .*elsewhere/iris\.csv.*data roots.*Fix:"):
        plan_operator.execute(_plan_context({"spec": outside}, {}, DATE))  # type: ignore[arg-type]
    climbing = {**inside, "data": {"path": f"{tmp_path}/datasets/../elsewhere/iris.csv", "target": "target"}}
    with pytest.raises(AirflowFailException, match=r"data roots"):
        plan_operator.execute(_plan_context({"spec": climbing}, {}, DATE))  # type: ignore[arg-type]

    plan_operator.data_roots = (str(tmp_path / "elsewhere"),)  # grid_search_dag(data_roots=[...])
    items = plan_operator.execute(_plan_context({"spec": outside}, {}, DATE))  # type: ignore[arg-type]
    assert load_plan(items[0]["plan_uri"]).document["n_samples"] == 150


def test_conf_spec_reads_no_file_when_the_dag_spec_reads_none(
    plan_operator: PlanGridSearchOperator, tmp_path: Path, iris_doc: Callable[..., dict[str, Any]]
) -> None:
    """The shipped DAGs load sklearn datasets: a conf spec naming a file is refused, with the ways out."""
    document = _csv_spec(iris_doc, tmp_path / "iris.csv")
    with pytest.raises(AirflowFailException, match=r"nowhere: this DAG has no data roots.*data_roots=\[\.\.\.\]"):
        plan_operator.execute(_plan_context({"spec": document}, {}, DATE))  # type: ignore[arg-type]
    # the same file from the DAG's own spec (written by the DAG's authors) is read as before
    Path(plan_operator.spec_path).write_text(yaml.safe_dump(document))
    items = plan_operator.execute(_plan_context({}, {}, DATE))  # type: ignore[arg-type]
    assert load_plan(items[0]["plan_uri"]).document["n_samples"] == 150


# --- successive halving: waves of rounds --------------------------------------------------------------------------

HALVING_CONF = {"search": {"strategy": "halving_grid", "factor": 2, "random_state": 0}}


def test_only_dags_with_round_waves_offer_halving_in_the_form(dagbag: DagBag) -> None:
    halving = serialized(dagbag.dags["grid_search_halving"]).params
    resolved = halving.deep_merge(copy.deepcopy(HALVING_CONF)).validate()
    assert resolved["search"] == HALVING_CONF["search"]
    sampled = {"strategy": "halving_random", "n_candidates": "exhaust", "min_resources": 20, "random_state": 1}
    assert halving.deep_merge({"search": sampled}).validate()["search"] == sampled
    with pytest.raises(ParamValidationError, match="param search"):
        halving.deep_merge({"search": {"strategy": "halving_grid", "factor": 1}}).validate()
    nightly = serialized(dagbag.dags["grid_search_nightly"]).params
    with pytest.raises(ParamValidationError, match="param search: 'halving_grid' is not one of"):
        nightly.deep_merge({"search": {"strategy": "halving_grid"}}).validate()
    with pytest.raises(ParamValidationError, match=r"param search: .*'factor' was unexpected"):
        nightly.deep_merge(copy.deepcopy(HALVING_CONF)).validate()


def test_plan_refuses_more_rounds_than_the_dag_has_waves(plan_operator: PlanGridSearchOperator) -> None:
    """iris, 8 candidates, factor 2: 4 rounds (8, 4, 2, 1); a one-wave DAG says so before any candidate runs."""
    context = _plan_context({**HALVING_CONF, "param_grid": {"clf__C": [0.01, 0.1, 1, 10, 100, 3, 30, 300]}}, {}, None)
    with pytest.raises(AirflowFailException, match=r"needs 4 rounds, but this DAG has 1 wave.*max_rounds=4"):
        plan_operator.execute(context)  # type: ignore[arg-type]
    plan_operator.max_rounds = 4
    items = plan_operator.execute(context)  # type: ignore[arg-type]
    assert len(items) == 8 and "round 0" in items[0]["label"] and "round" not in items[0]
    assert context["ti"].pushed["plan"]["n_rounds"] == 4
