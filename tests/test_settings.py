"""The ``[airflow_grid]`` configuration section: listed by Airflow, read by the Airflow side, legacy variables kept."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowFailException

from airflow_grid import SECTION, get_provider_info, settings
from airflow_grid.dag_factory import grid_search_dag
from airflow_grid.operators import plan as plan_module
from airflow_grid.operators.kubernetes import KubernetesBackend
from airflow_grid.operators.plan import PlanGridSearchOperator
from airflow_grid.operators.select import SelectWinnerOperator
from airflow_grid.plan import load_plan, make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store
from airflow_grid.worker import evaluate_candidates

OPTIONS: dict[str, dict[str, Any]] = get_provider_info()["config"][SECTION]["options"]
Doc = Callable[..., dict[str, Any]]


def airflow_env(option: str) -> str:
    return f"AIRFLOW__{SECTION.upper()}__{option.upper()}"


@pytest.fixture(autouse=True)
def no_section_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from the defaults (whatever the machine's environment sets for this section)."""
    for option in OPTIONS:
        monkeypatch.delenv(airflow_env(option), raising=False)


# --- declared options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_is_declared_as_airflow_expects(option: str) -> None:
    described = OPTIONS[option]
    assert set(described) == {"description", "version_added", "type", "example", "default"}
    assert described["version_added"] == "0.2.0" and described["description"].strip()
    default = described["default"]
    if described["type"] == "integer":
        int(default)
    elif described["type"] == "float":
        float(default)
    elif described["type"] == "boolean":
        assert default in ("True", "False")
    legacy = settings.LEGACY_ENV.get(option)
    assert legacy is None or f"Legacy: {legacy}." in described["description"]


def test_every_legacy_variable_maps_to_an_option() -> None:
    assert set(settings.LEGACY_ENV) <= set(OPTIONS)
    assert set(settings.LEGACY_ENV.values()) >= {"AIRFLOW_GRID_STORE", "AIRFLOW_GRID_ALLOWED_TARGETS"}


def test_airflow_config_list_shows_the_section(tmp_path: Path) -> None:
    """Airflow itself loads the section from the provider info, with defaults and an AIRFLOW__ override."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_GRID_", f"AIRFLOW__{SECTION.upper()}"))}
    env.update({"AIRFLOW_HOME": str(home), airflow_env("default_pool"): "tuning"})
    airflow = Path(sys.executable).with_name("airflow")
    completed = subprocess.run(
        [str(airflow), "config", "list", "--section", SECTION, "--show-values", "--color", "off"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    listed = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition("=") for line in completed.stdout.splitlines())
        if _ and not key.lstrip().startswith("#")
    )
    assert f"[{SECTION}]" in completed.stdout
    expected = {option: str(d["default"]) for option, d in OPTIONS.items()}
    expected.update(store=f"{home}/airflow_grid", default_pool="tuning")
    assert listed == expected
    # Airflow wrote airflow.cfg with every default spelt out: a legacy variable must still win over those.
    assert f"store = {home}/airflow_grid" in (home / "airflow.cfg").read_text()
    script = "from airflow_grid import settings; print(settings.store(), settings.default_pool())"
    env.update(AIRFLOW_GRID_STORE="/legacy/store")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert completed.stdout.split() == ["/legacy/store", "tuning"], completed.stderr[-2000:]


# --- precedence ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("airflow", "legacy", "expected"),
    [
        pytest.param(None, None, "{home}/airflow_grid", id="default"),
        pytest.param(None, "/legacy", "/legacy", id="legacy-variable"),
        pytest.param("/configured", "/legacy", "/configured", id="airflow-wins"),
        pytest.param("/configured", None, "/configured", id="airflow"),
    ],
)
def test_store_precedence(
    monkeypatch: pytest.MonkeyPatch, airflow: str | None, legacy: str | None, expected: str
) -> None:
    monkeypatch.delenv("AIRFLOW_GRID_STORE", raising=False)
    if airflow:
        monkeypatch.setenv(airflow_env("store"), airflow)
    if legacy:
        monkeypatch.setenv("AIRFLOW_GRID_STORE", legacy)
    assert settings.store() == expected.format(home=os.environ["AIRFLOW_HOME"])


def test_unknown_option_and_bad_values_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match=r"\[airflow_grid\] has no option 'stor'; the options are \['allow_file"):
        settings.get("stor")
    monkeypatch.setenv(airflow_env("max_child_runs"), "many")
    with pytest.raises(ValueError, match=r"max_child_runs: got 'many'; expected a number \(int\).*MAX_CHILD_RUNS"):
        settings.max_child_runs()
    monkeypatch.setenv(airflow_env("allow_file_params"), "perhaps")
    with pytest.raises(ValueError, match=r"allow_file_params: got 'perhaps'; expected True or False.*ALLOW_FILE"):
        settings.policy()


@pytest.mark.parametrize(
    ("configured", "tracking", "expected"),
    [
        pytest.param("https://mlflow.example.com/", None, "https://mlflow.example.com", id="configured"),
        pytest.param(None, "http://mlflow:5000/", "http://mlflow:5000", id="tracking-server"),
        pytest.param(None, None, "http://127.0.0.1:5000", id="sqlite-store-mlflow-ui"),
    ],
)
def test_mlflow_ui_url(
    monkeypatch: pytest.MonkeyPatch, configured: str | None, tracking: str | None, expected: str
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    if configured:
        monkeypatch.setenv(airflow_env("mlflow_ui_url"), configured)
    if tracking:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    assert settings.mlflow_ui_url() == expected


# --- each option takes effect where it is used ----------------------------------------------------------------------


def plan_context(params: dict[str, Any] | None = None) -> dict[str, Any]:
    ti = SimpleNamespace(pushed={})
    ti.xcom_push = lambda key, value: ti.pushed.__setitem__(key, value)
    return {"params": params or {}, "triggering_asset_events": {}, "logical_date": None, "ti": ti}


@pytest.fixture
def plan_operator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_doc: Doc) -> Callable[..., Any]:
    """Build a plan operator over a spec document and run it, as the plan task would."""
    monkeypatch.setattr(plan_module, "pool_exists", lambda name: True)

    def run(document: dict[str, Any]) -> list[dict[str, Any]]:
        spec_path = tmp_path / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(document))
        operator = PlanGridSearchOperator(task_id="plan", spec_path=str(spec_path))
        return operator.execute(plan_context())  # type: ignore[arg-type]

    return run


def test_store_option_places_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan_operator: Callable[..., Any], iris_doc: Doc
) -> None:
    configured = tmp_path / "configured-store"
    monkeypatch.setenv(airflow_env("store"), str(configured))  # conftest also sets the legacy AIRFLOW_GRID_STORE
    items = plan_operator(iris_doc())
    assert items[0]["plan_uri"].startswith(f"{configured}/plans/")
    assert (configured / "plans" / load_plan(items[0]["plan_uri"]).plan_id / "plan.json").is_file()


def test_allowed_targets_option_reaches_the_plan_and_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan_operator: Callable[..., Any], iris_doc: Doc, thread_env: None
) -> None:
    module = f"airflow_grid_settings_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("from sklearn.svm import SVC as Model\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(airflow_env("store"), str(tmp_path / "store"))
    estimator = {"_target_": "sklearn.pipeline.Pipeline", "steps": [["clf", {"_target_": f"{module}.Model"}]]}
    document = iris_doc(estimator=estimator)
    with pytest.raises(AirflowFailException, match=r"not under an allowed prefix.*\[airflow_grid\] allowed_targets"):
        plan_operator(document)
    monkeypatch.setenv(airflow_env("allowed_targets"), f"{module}.")
    items = plan_operator(document)
    assert f"{module}." in load_plan(items[0]["plan_uri"]).document["policy"]["prefixes"]
    monkeypatch.delenv(airflow_env("allowed_targets"))  # a pod has neither the setting nor Airflow
    try:
        assert evaluate_candidates(items[0]["plan_uri"], [0])["results"][0]["n_failed_fits"] == 0
    finally:
        sys.modules.pop(module, None)


def test_default_pool_option_sets_the_dag_pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, iris_doc: Doc) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(iris_doc()))
    monkeypatch.setenv(airflow_env("default_pool"), "tuning")
    dag = grid_search_dag("configured_pool", spec_path, refit_dag_id=None)
    assert dag.get_task("evaluate").pool == dag.get_task("plan").grid_pool == "tuning"  # type: ignore[attr-defined]
    explicit = grid_search_dag("explicit_pool", spec_path, pool="mine", refit_dag_id=None)
    assert explicit.get_task("evaluate").pool == "mine"


def test_max_child_runs_option_caps_child_runs_and_select_logs_the_leaderboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_doc: Doc, thread_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real select task and MLflow (a sqlite store in tmp): 3 candidates, the option caps at 2."""
    from airflow_grid import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(airflow_env("max_child_runs"), "2")
    plan = make_plan(parse_spec(iris_doc(name="settings-select")), Store(str(tmp_path / "store")))
    summary = {"plan_uri": plan.uri, "dataset_version": "v1", "dataset_version_source": "test", "overrides": []}
    with DAG("settings_select", schedule=None):
        evaluated = [[evaluate_candidates(plan.uri, [0, 1, 2])]]
        operator = SelectWinnerOperator(task_id="select", evaluated=evaluated, plan_summary=summary)
    ti = SimpleNamespace(dag_id="d", run_id="r", xcom_push=lambda key, value: None)
    conf = operator.execute({"dag_run": ti, "ti": ti})  # type: ignore[arg-type]
    assert len(tracking.candidate_runs(conf["parent_run_id"])["candidate_runs"]) == 2
    task_log = capsys.readouterr().out
    assert "top 3 of 3 candidates by mean_test_score (mean ± std over 3 folds)" in task_log


def test_kubernetes_options_configure_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_GRID_K8S_IMAGE", "legacy/worker:1")
    monkeypatch.setenv("AIRFLOW_GRID_K8S_NAMESPACE", "legacy-ns")
    monkeypatch.setenv(airflow_env("kubernetes_image"), "registry.example.com/worker:2")
    monkeypatch.setenv(airflow_env("kubernetes_deferrable"), "True")
    monkeypatch.setenv(airflow_env("kubernetes_store_path"), "/mnt/grid")
    monkeypatch.setenv(airflow_env("kubernetes_store_claim"), "grid-store")
    backend = KubernetesBackend.from_env()
    assert (backend.image, backend.namespace, backend.deferrable) == (
        "registry.example.com/worker:2",
        "legacy-ns",
        True,
    )
    assert backend.store_volume is not None and backend.store_volume.claim_name == "grid-store"
