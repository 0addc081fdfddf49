"""Evaluate operator, local backend: run the worker for one mapped item through the standard SubprocessHook."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.providers.standard.hooks.subprocess import SubprocessHook
from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_grid.launch import worker_command, worker_env
from airflow_grid.spec import parse_cpu, parse_memory
from airflow_grid.tracking.links import MlflowCandidateRunLink
from airflow_grid.worker import EXIT_BAD_INPUT

MAP_INDEX_TEMPLATE = "{{ task.candidate['label'] }}"


class LocalEvaluateOperator(BaseOperator):
    """Evaluate the candidates of one mapped item in a worker process inside the item's CPU and memory budget.

    Exit code 2 (bad plan/candidate) fails the task without retries; any other failure is retried by Airflow, and
    candidates already in the store are never fitted twice. Returns the worker's compact results.
    """

    template_fields: Sequence[str] = ("candidate",)
    ui_color = "#fff3e0"
    operator_extra_links = (MlflowCandidateRunLink(),)  # written by select once the candidate's child run exists

    def __init__(self, *, candidate: dict[str, Any], python: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.candidate = candidate
        self.python = python or sys.executable
        self._hook: SubprocessHook | None = None

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
            )
            self._hook = SubprocessHook()
            result = self._hook.run_command(command, env=worker_env(cpu), cwd=scratch)
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
        if self._hook is not None:
            self._hook.send_sigterm()
