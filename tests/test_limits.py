"""Pure resource pieces: the launcher's command and env, n_jobs capping on nested estimators, memory wording.

The process-level guarantees (CPU time, memory of a process tree) are measured in tests/test_resources.py.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from joblib import parallel_config
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import BaggingClassifier, RandomForestClassifier, VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.multiclass import OneVsRestClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from airflow_grid import grid, launch, limits, worker
from airflow_grid.cv import THREAD_ENV_VARS
from airflow_grid.plan import make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store

pytestmark = pytest.mark.usefixtures("thread_env")


# --------------------------------------------------------------------------------------------------
# launcher


def test_worker_command_always_carries_the_memory_budget() -> None:
    command = launch.worker_command("evaluate", "/s/plans/p", [3, 5], out="/o.json", memory_bytes=512 * 2**20)
    assert command[1:3] == ["-m", "airflow_grid.worker"]
    assert command[3:] == [
        "evaluate", "--plan", "/s/plans/p", "--candidate", "3", "--candidate", "5", "--out", "/o.json",
        "--memory-limit", str(512 * 2**20),
    ]  # fmt: skip
    refit = launch.worker_command("refit", "/p", 2, out=None, memory_bytes=10**9, python="/py", model="/m.joblib")
    assert refit == [
        "/py", "-m", "airflow_grid.worker", "refit", "--plan", "/p", "--candidate", "2", "--model", "/m.joblib",
        "--memory-limit", "1000000000",
    ]  # fmt: skip


def test_pod_arguments_leave_the_budget_to_the_env() -> None:
    """A pod's budget is MEMORY_ENV, which a retry raises together with the container limit."""
    arguments = launch.worker_arguments("evaluate", "/p", [1], out="/airflow/xcom/return.json", memory_bytes=None)
    assert "--memory-limit" not in arguments


@pytest.mark.parametrize(
    ("action", "candidates", "model"), [("refit", [1, 2], "/m"), ("refit", 1, None), ("evaluate", [], None)]
)
def test_worker_arguments_refuse_incoherent_calls(action: Any, candidates: Any, model: str | None) -> None:
    with pytest.raises(ValueError, match="worker"):
        launch.worker_arguments(action, "/p", candidates, out=None, memory_bytes=1, model=model)


def test_worker_env_caps_threads_and_drops_a_stale_budget() -> None:
    env = launch.worker_env(2.5, {"PATH": "/bin", launch.MEMORY_ENV: "1", "OMP_NUM_THREADS": "64"})
    assert env == {"PATH": "/bin", **dict.fromkeys(THREAD_ENV_VARS, "2")}


# --------------------------------------------------------------------------------------------------
# n_jobs


def test_cap_n_jobs_walks_nested_estimators() -> None:
    forest = RandomForestClassifier(n_jobs=-1)
    model = Pipeline(
        [
            ("pre", ColumnTransformer([("num", StandardScaler(), [0]), ("drop", "drop", [1])], n_jobs=8)),
            (
                "vote",
                VotingClassifier(
                    [
                        ("rf", forest),
                        ("knn", KNeighborsClassifier(n_jobs=2)),
                        ("ovr", OneVsRestClassifier(LogisticRegression(n_jobs=-2), n_jobs=None)),
                        ("bag", BaggingClassifier(estimator=KNeighborsClassifier(n_jobs=3), n_jobs=1)),
                    ],
                    n_jobs=-1,
                ),
            ),
        ]
    )
    capped = limits.cap_n_jobs(model, 2)
    assert capped == {
        "pre__n_jobs": {"asked": 8, "used": 2},
        "vote__n_jobs": {"asked": -1, "used": 2},
        "vote__rf__n_jobs": {"asked": -1, "used": 2},
        "vote__ovr__estimator__n_jobs": {"asked": -2, "used": 2},
        "vote__bag__estimator__n_jobs": {"asked": 3, "used": 2},
    }
    params = model.get_params()
    for path in capped:
        assert params[path] == 2
    assert forest.n_jobs == 2  # set on the object itself, not on a copy
    assert (params["vote__knn__n_jobs"], params["vote__ovr__n_jobs"], params["vote__bag__n_jobs"]) == (2, None, 1)
    assert limits.cap_n_jobs(model, 2) == {}  # idempotent


def test_cap_n_jobs_caps_none_only_inside_a_joblib_context() -> None:
    assert limits.cap_n_jobs(RandomForestClassifier(n_jobs=None), 1) == {}
    with parallel_config(n_jobs=-1):
        assert limits.cap_n_jobs(RandomForestClassifier(n_jobs=None), 1) == {"n_jobs": {"asked": None, "used": 1}}
    with parallel_config(n_jobs=1):
        assert limits.cap_n_jobs(RandomForestClassifier(n_jobs=None), 1) == {}


def test_cap_n_jobs_leaves_values_it_cannot_read() -> None:
    """0 and non-numbers are sklearn's to refuse at fit time; the cap does not hide the user's mistake."""
    assert limits.cap_n_jobs(RandomForestClassifier(n_jobs=0), 1) == {}
    assert limits.cap_n_jobs(RandomForestClassifier(n_jobs="many"), 1) == {}  # type: ignore[arg-type]


def forest_spec(**fields: Any) -> dict[str, Any]:
    return {
        "name": "capped",
        "data": {"_target_": "sklearn.datasets.load_iris", "return_X_y": True},
        "estimator": {
            "_target_": "sklearn.pipeline.Pipeline",
            "steps": [["clf", {"_target_": "sklearn.ensemble.RandomForestClassifier", "n_estimators": 15}]],
        },
        "param_grid": {"clf__n_jobs": [-1, 4, 1], "clf__random_state": [0]},
        "cv": 3,
        "resources": {"cpu": 1, "memory": "2Gi"},
        **fields,
    }


def test_cap_n_jobs_on_grid_set_values() -> None:
    spec = parse_spec(forest_spec())
    estimator = grid.build_estimator(spec, {"clf__n_jobs": -1})
    assert limits.cap_n_jobs(estimator, 1) == {"clf__n_jobs": {"asked": -1, "used": 1}}
    assert estimator.get_params()["clf__n_jobs"] == 1


def test_capped_cv_results_equal_gridsearchcv(store_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    """n_jobs never changes a score: capped candidates score bit-identically, and params keep the user's -1."""
    plan = make_plan(parse_spec(forest_spec()), Store(store_root))
    results = worker.evaluate_candidates(plan.uri, list(range(len(plan.candidates))))["results"]
    assert [r["n_jobs_capped"] for r in results] == [
        {"clf__n_jobs": {"asked": -1, "used": 1}},
        {"clf__n_jobs": {"asked": 4, "used": 1}},
        {},
    ]
    err = capsys.readouterr().err
    assert "airflow-grid worker: candidate 0: capped clf__n_jobs=-1 to 1 (resources.cpu=1)" in err
    cv_results, _ = plan.reduce(results)

    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    param_grid = {"clf__n_jobs": [-1, 4, 1], "clf__random_state": [0]}
    reference = GridSearchCV(Pipeline([("clf", RandomForestClassifier(n_estimators=15))]), param_grid, cv=3)
    reference.fit(X, y)
    expected = reference.cv_results_
    assert cv_results["params"] == list(expected["params"])
    assert [p["clf__n_jobs"] for p in cv_results["params"]] == [-1, 4, 1]
    for key in ("split0_test_score", "split1_test_score", "split2_test_score", "mean_test_score", "rank_test_score"):
        assert list(cv_results[key]) == list(expected[key]), key


def test_refit_records_the_cap(store_root: str, tmp_path: Any) -> None:
    plan = make_plan(parse_spec(forest_spec(resources={"cpu": 2, "memory": "2Gi"})), Store(store_root))
    outcome = worker.refit_candidate(plan.uri, 0, str(tmp_path / "model.joblib"))
    assert outcome["n_jobs_capped"] == {"clf__n_jobs": {"asked": -1, "used": 2}}  # refit: floor(cpu) for the fit


# --------------------------------------------------------------------------------------------------
# memory wording


@pytest.mark.parametrize(
    ("n_bytes", "text"), [(512 * 2**20, "512Mi"), (2 * 2**30, "2Gi"), (3 * 2**10, "3Ki"), (10**9, "1000000000")]
)
def test_memory_text(n_bytes: int, text: str) -> None:
    assert limits.memory_text(n_bytes) == text


def test_startup_problem_names_the_budget_the_need_and_the_fix() -> None:
    rss = 180 * 2**20
    assert limits.startup_problem(1 * 2**30, rss) is None
    message = limits.startup_problem(64 * 2**20, rss)
    assert message == (
        "memory budget 64Mi (67108864 bytes) is below what the worker needs to start (≈ 180 MiB after imports). "
        "Fix: resources.memory: 512Mi or more."
    )
    assert limits.startup_problem(math.ceil(rss / 0.95), rss) is not None  # < 10% left: refused too


def test_joblib_leftovers_of_a_stopped_candidate_are_removed(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watchdog kills loky's resource tracker too, so it removes the memmapping folders itself (only its own)."""
    monkeypatch.setenv("JOBLIB_TEMP_FOLDER", str(tmp_path))
    own = tmp_path / "joblib_memmapping_folder_4242_abc_def"
    other = tmp_path / "joblib_memmapping_folder_42420_abc_def"
    for folder in (own, other):
        folder.mkdir()
        (folder / "X.pkl").write_bytes(b"0")
    limits.remove_joblib_leftovers(4242)
    assert not own.exists() and other.exists()
