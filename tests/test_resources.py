"""A candidate stays inside its CPU and memory budget in every path that fits, measured on real processes.

* CPU: a RandomForestClassifier(n_jobs=-1) candidate with ``resources.cpu: 1``, run as a worker process, is
  sampled with psutil every 50 ms: no child processes, and its process tree's CPU time / wall time stays <= ~1.
* Memory: a candidate that allocates beyond ``resources.memory`` is stopped with exit code 3 and nothing stored,
  through the local evaluate operator, ``airflow-grid run`` and the refit worker; memory held by joblib child
  processes counts; a budget below what the worker needs to start is bad input (exit 2), not a retryable failure.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from airflow_grid import launch
from airflow_grid.plan import Plan, make_plan
from airflow_grid.spec import parse_spec
from airflow_grid.store import Store

pytestmark = pytest.mark.slow

MI = 2**20


def digits_spec(name: str, steps: list[Any], param_grid: dict[str, Any], cpu: Any, memory: str, **more: Any) -> Any:
    return {
        "name": name,
        "data": {"_target_": "sklearn.datasets.load_digits", "return_X_y": True},
        "estimator": {"_target_": "sklearn.pipeline.Pipeline", "steps": steps},
        "param_grid": param_grid,
        "resources": {"cpu": cpu, "memory": memory},
        **more,
    }


def hog_spec(n_components: int, *, cpu: Any = 1, memory: str = "400Mi", name: str = "hog", **more: Any) -> Any:
    """RBFSampler(n_components) turns each fold's ~900 digits rows into n_components floats: ~7 kB per component."""
    steps = [
        ["features", {"_target_": "sklearn.kernel_approximation.RBFSampler", "random_state": 0}],
        ["clf", {"_target_": "sklearn.dummy.DummyClassifier"}],
    ]
    return digits_spec(name, steps, {"features__n_components": [n_components]}, cpu, memory, cv=2, **more)


def plan_for(document: dict[str, Any], root: str) -> Plan:
    return make_plan(parse_spec(document), Store(root))


@dataclass
class TreeSamples:
    """What a process tree did, sampled every ``interval`` seconds until its root exited."""

    returncode: int
    wall_s: float
    cpu_s: float
    max_processes: int
    max_threads: int
    max_rss: int
    max_rss_per_process: int
    pids: set[int] = field(default_factory=set)
    thread_cpu: dict[tuple[int, int], float] = field(default_factory=dict)  # (pid, thread id) -> CPU seconds
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (wall, CPU seconds of the tree so far)
    stderr: str = ""

    @property
    def cpu_per_wall(self) -> float:
        return self.cpu_s / self.wall_s

    @property
    def busy_threads(self) -> int:
        """Threads that each did real work (> 0.25 CPU-s) over the run: 1 means every fit ran on one thread."""
        return sum(1 for seconds in self.thread_cpu.values() if seconds > 0.25)

    def peak_cpu_per_wall(self, window: float = 2.0) -> float:
        """The highest CPU/wall ratio over any ``window`` seconds (the fit, without the start-up's imports)."""
        best = 0.0
        for i, (t0, c0) in enumerate(self.timeline):
            later = [(t, c) for t, c in self.timeline[i:] if t - t0 >= window]
            if later:
                t1, c1 = later[0]
                best = max(best, (c1 - c0) / (t1 - t0))
        return best


def sample_tree(command: list[str], env: dict[str, str], interval: float = 0.05, timeout: float = 300) -> TreeSamples:
    """Run ``command`` and sample its process tree (processes, threads per process, RSS, CPU time) until it exits."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(process.pid)
    cpu: dict[int, float] = {}
    samples = TreeSamples(0, 0.0, 0.0, 0, 0, 0, 0)
    while process.poll() is None and time.perf_counter() - started < timeout:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        rss = 0
        for member in tree:
            try:
                with member.oneshot():
                    times, threads, member_rss = member.cpu_times(), member.threads(), member.memory_info().rss
            except psutil.Error:
                continue
            cpu[member.pid] = times.user + times.system
            for thread in threads:
                samples.thread_cpu[(member.pid, thread.id)] = thread.user_time + thread.system_time
            samples.pids.add(member.pid)
            samples.max_threads = max(samples.max_threads, len(threads))
            samples.max_rss_per_process = max(samples.max_rss_per_process, member_rss)
            rss += member_rss
        samples.max_processes = max(samples.max_processes, len(tree))
        samples.max_rss = max(samples.max_rss, rss)
        samples.timeline.append((time.perf_counter() - started, sum(cpu.values())))
        time.sleep(interval)
    _, stderr = process.communicate(timeout=timeout)
    samples.wall_s = time.perf_counter() - started
    samples.returncode = process.returncode
    samples.cpu_s = sum(cpu.values())
    samples.stderr = stderr.decode(errors="replace")
    return samples


# --------------------------------------------------------------------------------------------------
# CPU


def test_n_jobs_minus_one_runs_inside_one_core(store_root: str, tmp_path: Path) -> None:
    """The incident: n_jobs=-1 in a candidate. With resources.cpu=1 the whole worker uses one core at most."""
    steps = [["clf", {"_target_": "sklearn.ensemble.RandomForestClassifier", "n_estimators": 600, "n_jobs": -1}]]
    document = digits_spec("rf-all-cores", steps, {"clf__random_state": [0]}, 1, "2Gi", cv=3)
    plan = plan_for(document, store_root)
    out = tmp_path / "result.json"
    command = launch.worker_command("evaluate", plan.uri, [0], out=str(out), memory_bytes=2 * 2**30)
    samples = sample_tree(command, launch.worker_env(1.0))
    print(
        f"\nRF(n_jobs=-1), resources.cpu=1: max processes {samples.max_processes}, max threads/process "
        f"{samples.max_threads}, busy threads {samples.busy_threads}, CPU {samples.cpu_s:.1f}s / wall "
        f"{samples.wall_s:.1f}s = {samples.cpu_per_wall:.2f} (peak over 2 s: {samples.peak_cpu_per_wall():.2f}), "
        f"peak tree RSS {samples.max_rss / MI:.0f} MiB, load average {psutil.getloadavg()[0]:.1f}"
    )
    assert samples.returncode == 0, samples.stderr
    assert samples.max_processes == 1  # no joblib/loky worker processes
    assert samples.busy_threads == 1  # one thread did the work; holds on a loaded machine too
    assert samples.cpu_per_wall <= 1.15
    assert samples.peak_cpu_per_wall() <= 1.15
    assert "capped clf__n_jobs=-1 to 1 (resources.cpu=1)" in samples.stderr


# --------------------------------------------------------------------------------------------------
# Memory: the three paths that fit, and what counts


def assert_nothing_stored(plan: Plan) -> None:
    store = Store(plan.store_root)
    assert [store.get_result(c["key"]) for c in plan.candidates] == [None] * len(plan.candidates)


def test_local_evaluate_operator_stops_an_over_budget_candidate(store_root: str) -> None:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from airflow_grid.operators.evaluate import LocalEvaluateOperator

    plan = plan_for(hog_spec(100_000), store_root)  # ~700 MB per fold against 400Mi
    item = {"plan_uri": plan.uri, "indices": [0], "label": "hog", "cpu": "1", "memory": "400Mi"}
    operator = LocalEvaluateOperator(task_id="evaluate", candidate=item)
    with pytest.raises(AirflowException) as raised:
        operator.execute({})  # type: ignore[arg-type]
    assert not isinstance(raised.value, AirflowFailException)  # retryable (a retry may get more memory)
    message = str(raised.value)
    assert message.startswith("worker exited with 3: airflow-grid worker: out of memory: the candidate's")
    assert "over resources.memory=400Mi (419430400 bytes); nothing was stored" in message
    assert_nothing_stored(plan)


def test_airflow_grid_run_stops_an_over_budget_candidate(
    store_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from airflow_grid import cli

    spec_path = tmp_path / "hog.yaml"
    spec_path.write_text(yaml.safe_dump(hog_spec(100_000, name="hog-run")))
    code = cli.main(["--store", store_root, "run", str(spec_path), "--out", str(tmp_path / "out"), "--no-refit"])
    err = capsys.readouterr().err
    assert code == 1
    assert "1 of 1 candidates failed" in err
    assert "out of memory" in err and "over resources.memory=400Mi (419430400 bytes)" in err
    assert_nothing_stored(plan_for(hog_spec(100_000, name="hog-run"), store_root))


def test_airflow_grid_run_refits_inside_the_budget_too(
    store_root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Folds of ~900 rows fit in 600Mi; the refit on all ~1800 rows does not, and is stopped, not left to swap."""
    document = hog_spec(40_000, memory="600Mi", name="hog-refit")
    spec_path = tmp_path / "hog.yaml"
    spec_path.write_text(yaml.safe_dump(document))
    out = tmp_path / "out"
    code = cli_main(["--store", store_root, "run", str(spec_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "worker refit failed (3)" in err and "over resources.memory=600Mi (629145600 bytes)" in err
    assert (out / "cv_results.json").exists() and not (out / "model.joblib").exists()


def cli_main(argv: list[str]) -> int:
    from airflow_grid import cli

    return cli.main(argv)


def test_refit_worker_stops_an_over_budget_fit(store_root: str, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowException

    from airflow_grid.operators.refit import RefitWinnerOperator

    plan = plan_for(hog_spec(60_000), store_root)  # refit: ~1800 rows x 60000 floats = ~860 MB against 400Mi
    model = tmp_path / "model.joblib"
    operator = RefitWinnerOperator(task_id="refit", parent_run_id="unused")
    with pytest.raises(AirflowException, match=r"refit worker exited with 3: .*over resources.memory=400Mi"):
        operator._run_refit(plan.uri, plan.row(0, 0), model, 1.0, plan.spec.resources.memory_bytes)
    assert not model.exists()


def test_memory_held_by_child_processes_counts(store_root: str, tmp_path: Path) -> None:
    """cpu: 2 runs the 2 folds in 2 loky processes; each stays under the budget, together they go over it."""
    plan = plan_for(hog_spec(30_000, cpu=2, memory="700Mi"), store_root)  # ~215 MB per fold in each child
    out = tmp_path / "result.json"
    command = launch.worker_command("evaluate", plan.uri, [0], out=str(out), memory_bytes=700 * MI)
    samples = sample_tree(command, launch.worker_env(2.0), interval=0.02)
    stderr = samples.stderr
    print(
        f"\nchildren: max processes {samples.max_processes}, max RSS of one process "
        f"{samples.max_rss_per_process / MI:.0f} MiB, max tree RSS seen {samples.max_rss / MI:.0f} MiB\n{stderr}"
    )
    assert samples.returncode == 3, stderr
    assert samples.max_processes >= 3  # the worker and its two fold processes
    assert samples.max_rss_per_process < 700 * MI  # a per-process limit would never have fired
    assert "process(es) used" in stderr and "over resources.memory=700Mi" in stderr
    assert not out.exists()
    assert_nothing_stored(plan)
    assert not [pid for pid in samples.pids if psutil.pid_exists(pid) and _alive(pid)]  # children killed too


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_budget_below_start_up_is_bad_input(store_root: str, tmp_path: Path) -> None:
    plan = plan_for(hog_spec(10, memory="32Mi"), store_root)
    out = tmp_path / "result.json"
    command = launch.worker_command("evaluate", plan.uri, [0], out=str(out), memory_bytes=32 * MI)
    completed = subprocess.run(command, env=launch.worker_env(1.0), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith(
        "airflow-grid worker: bad input: memory budget 32Mi (33554432 bytes) is below what the worker needs to "
        "start (≈ "
    )
    print(f"\n{completed.stderr.strip()}")
    assert "MiB after imports). Fix: resources.memory: 512Mi or more." in completed.stderr
    assert not out.exists()
    assert_nothing_stored(plan)


def test_a_candidate_inside_its_budget_is_not_disturbed(store_root: str, tmp_path: Path) -> None:
    """The watchdog's only effect on a candidate that fits: none (exit 0, result stored)."""
    plan = plan_for(hog_spec(200, memory="1Gi"), store_root)
    out = tmp_path / "result.json"
    command = launch.worker_command("evaluate", plan.uri, [0], out=str(out), memory_bytes=2**30)
    completed = subprocess.run(command, env=launch.worker_env(1.0), capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert Store(plan.store_root).get_result(plan.candidates[0]["key"]) is not None
