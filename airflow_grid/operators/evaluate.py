"""Evaluate operator, local backend: run the worker for one mapped item through the standard SubprocessHook."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.standard.hooks.subprocess import SubprocessHook
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowTaskTimeout

from airflow_grid.launch import worker_command, worker_env
from airflow_grid.spec import parse_cpu, parse_memory
from airflow_grid.timeouts import STARTUP_MARGIN_S, describe_deadline, item_deadline
from airflow_grid.tracking.links import MlflowCandidateRunLink
from airflow_grid.worker import EXIT_BAD_INPUT

MAP_INDEX_TEMPLATE = "{{ task.candidate['label'] }}"


class LocalEvaluateOperator(BaseOperator):
    """Evaluate the candidates of one mapped item in a worker process inside the item's CPU and memory budget.

    Exit code 2 (bad plan/candidate) fails the task without retries; any other failure is retried by Airflow, and
    candidates already in the store are never fitted twice. Returns the worker's compact results.

    With ``resources.timeout`` the task gets a deadline, :func:`airflow_grid.timeouts.task_deadline`: timeout x
    the fold rounds the worker runs one after another (``ceil(n_folds / n_jobs)`` per candidate, candidates in
    turn) + ``deadline_margin_s`` (default 120 s) for start-up and I/O. A fit past its timeout is stopped inside
    the worker, so a task past the deadline is a worker hung outside a fit. The deadline is set as the task's
    ``execution_timeout`` in ``__init__``: a mapped task's operator is built from its resolved item at run time,
    before the task runner reads ``execution_timeout`` around ``execute`` (task SDK ``_run_execute_callable``),
    so each mapped item gets its own; an ``execution_timeout`` given to the operator wins when it is shorter.
    When it fires, the worker's process group (its fold processes included) is stopped - SIGTERM, then SIGKILL
    after ``STOP_GRACE_S`` - and the task fails with the deadline and how it was derived; Airflow's retries apply.
    """

    template_fields: Sequence[str] = ("candidate",)
    ui_color = "#fff3e0"
    operator_extra_links = (MlflowCandidateRunLink(),)  # written by select once the candidate's child run exists

    STOP_GRACE_S = 10.0

    def __init__(
        self,
        *,
        candidate: dict[str, Any],
        python: str | None = None,
        deadline_margin_s: float = STARTUP_MARGIN_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate
        self.python = python or sys.executable
        self.deadline_margin_s = deadline_margin_s
        self._hook: SubprocessHook | None = None
        deadline = item_deadline(candidate, deadline_margin_s) if isinstance(candidate, Mapping) else None
        if deadline is not None:
            given = self.execution_timeout
            self.execution_timeout = min(timedelta(seconds=deadline), given or timedelta.max)

    def execute(self, context: Context) -> dict[str, Any]:
        cpu = parse_cpu(self.candidate["cpu"], "resources.cpu")
        memory = parse_memory(self.candidate["memory"], "resources.memory")
        with tempfile.TemporaryDirectory(prefix="airflow-grid-evaluate-") as scratch:
            out = Path(scratch) / "result.json"
            command = worker_command(
                "evaluate",
                self.candidate["plan_uri"],
                self.candidate["indices"],
                out=str(out),
                memory_bytes=memory,
                python=self.python,
                round_=int(self.candidate.get("round", 0)),  # successive halving's later rounds
            )
            self._hook = SubprocessHook()
            try:
                result = self._hook.run_command(command, env=worker_env(cpu), cwd=scratch)
            except AirflowTaskTimeout:
                self._stop_worker()
                raise AirflowTaskTimeout(self._deadline_message()) from None
            if result.exit_code == EXIT_BAD_INPUT:
                raise AirflowFailException(f"worker refused its input: {result.output}")
            if result.exit_code != 0:
                raise AirflowException(f"worker exited with {result.exit_code}: {result.output}")
            payload: dict[str, Any] = json.loads(out.read_text())
        for item in payload["results"]:
            how = "from store" if item["from_store"] else f"fitted in {item['elapsed_s']:.1f}s"
            self.log.info(
                "candidate %s (%s): %s, %s failed fits", item["index"], item["label"], how, item["n_failed_fits"]
            )
        return payload

    def on_kill(self) -> None:
        self._stop_worker()

    def _stop_worker(self) -> None:
        """Stop the worker's process group (SubprocessHook starts it in its own session): SIGTERM, then SIGKILL.

        Safe to call twice and after the worker ended (the task runner calls on_kill after a timeout too).
        """
        process = self._hook.sub_process if self._hook is not None else None
        if process is None or process.returncode is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)  # the group's id is the worker's pid (start_new_session)
            try:
                process.wait(timeout=self.STOP_GRACE_S)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # fold processes the worker left behind
        if process.stdout is not None:
            process.stdout.close()

    def _deadline_message(self) -> str:
        timeout = self.execution_timeout.total_seconds() if self.execution_timeout else 0.0
        label = self.candidate.get("label")
        deadline = item_deadline(self.candidate, self.deadline_margin_s)
        if deadline is None or timeout < deadline:
            shorter = "" if deadline is None else f", shorter than the resources.timeout deadline of {deadline:g}s"
            return f"candidate(s) {label}: the worker ran past execution_timeout ({timeout:g}s{shorter}); stopped."
        return (
            f"candidate(s) {label}: the worker ran past the task deadline of {timeout:g}s "
            f"({describe_deadline(self.candidate, self.deadline_margin_s)}) and was stopped; a fit past "
            "resources.timeout is stopped inside the worker, so the worker hung outside a fit (loading data, "
            "the store, start-up). Airflow retries the task; candidates already stored are not fitted again."
        )
