"""``resources.timeout``: run each fold in a process that can be stopped, and the task deadline it implies.

:func:`cross_validate_folds` is ``cross_validate`` for a candidate whose folds each get at most ``timeout`` seconds
(fit and score). Each fold runs in its own child process, at most ``n_jobs`` at a time; the child calls sklearn's
``cross_validate`` on that one fold, so a fold that finishes has bit-identical scores to the in-process path. A
child past its time is killed with its whole process tree (joblib workers included) and the fold is recorded as a
failed fit: ``error_score`` for its test (and train) scores, ``fit_time`` the time it ran, and the failure summary
in sklearn's own words ("1 fits failed out of a total of 5 ... fold 2 fit timed out after 10m
(resources.timeout)"). With ``error_score="raise"`` a timeout raises :class:`FoldTimeout`, as a fit error would.

Start method: **fork**. The children need the estimator, the data (often a read-only memory map) and the scorers;
fork hands them over without pickling and without imports. Measured on 2 cores (LogisticRegression, one fold per
child, per-fold cost over the in-process fit): fork ≈ 0.02 s on 1 MB and 100 MB of data; forkserver with
sklearn preloaded ≈ 1.1 s to start its server once, then ≈ 0.03 s per fold on 1 MB and ≈ 0.2 s on 100 MB (the
data is pickled through a pipe for every fold); spawn ≈ 1.4-1.8 s per fold (imports). End to end (digits, SVC,
5 folds, one core) a candidate took 0.61 s against 0.15 s in-process: ≈ 0.1 s per fold, as each child copies
the pages it writes and redoes first-call work the parent never did.

Fork is safe here because the process that forks never fits: with a timeout every fit and score of the worker
runs in a child, so the parent has no OpenMP pool (libgomp's is the pool that is not fork-safe) and runs no native
parallel code; OpenBLAS stops its threads before a fork and starts them again when needed (pthread_atfork), and
the worker's one other thread (the memory watchdog) only samples /proc. Each child is forked from the parent, never
from another child, and caps its thread pools again (``threadpool_limits``; ``OMP_NUM_THREADS`` is read when
libgomp loads, which happened before the fork).

Children stay in the worker's process group, so an operator that stops the worker's group (SubprocessHook's
SIGTERM) or a pod's end stops them too, and the memory watchdog counts them (it sums the whole tree).
No Airflow or MLflow import: the worker imports this.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Final, cast

import numpy as np

from airflow_grid import limits

START_METHOD: Final = "fork"
# A deadline's allowance for what a task does around its fits: worker start (≈ 3 s of imports), plan and snapshot
# reads, store writes; generous so that a slow shared filesystem does not fail a healthy task.
STARTUP_MARGIN_S = 120.0
_ONE_FIT_ERROR = re.compile(r"1 fits failed with the following error:\n(.*)\Z", re.DOTALL)


class FoldTimeout(TimeoutError):
    """A fold ran past ``resources.timeout`` under ``error_score="raise"``: the candidate fails, as on a fit error."""


class AllFoldsFailed(ValueError):
    """sklearn's "All the N fits failed" error, carrying the per-fold scores (error_score) and times."""

    def __init__(self, message: str, scores: dict[str, Any]) -> None:
        super().__init__(message)
        self.scores = scores


def timeout_message(fold: int, timeout_text: str) -> str:
    """The fit error recorded for a timed-out fold; ``fold`` is the 0-based split (cv_results ``split<fold>_*``)."""
    return f"fold {fold} fit timed out after {timeout_text} (resources.timeout)"


def task_deadline(
    timeout_s: float, n_folds: int, cpu: float, n_candidates: int, margin_s: float = STARTUP_MARGIN_S
) -> float:
    """Seconds a task evaluating ``n_candidates`` may take when every fold may take ``timeout_s``.

    The worker runs a candidate's folds ``n_jobs`` at a time (:func:`airflow_grid.cv.budget`) and candidates one
    after the other, so at most ``ceil(n_folds / n_jobs) x n_candidates`` fold timeouts follow each other; the margin
    covers start-up and I/O. A task past it is not fitting any more (a fit past its timeout is killed): it hangs.
    """
    from airflow_grid.cv import budget

    n_jobs, _ = budget(cpu, n_folds)
    return timeout_s * math.ceil(n_folds / n_jobs) * max(1, n_candidates) + margin_s


def item_deadline(item: Mapping[str, Any], margin_s: float = STARTUP_MARGIN_S) -> float | None:
    """:func:`task_deadline` of a plan item (``plan.work_items``), or None when its spec sets no timeout."""
    from airflow_grid.spec import parse_cpu, parse_timeout

    if item.get("timeout") is None:
        return None
    timeout = parse_timeout(item["timeout"], "resources.timeout")
    cpu = parse_cpu(item["cpu"], "resources.cpu")
    return task_deadline(timeout, int(item["n_folds"]), cpu, len(item["indices"]), margin_s)


def describe_deadline(item: Mapping[str, Any], margin_s: float = STARTUP_MARGIN_S) -> str:
    """How an item's deadline was derived, for a failure message: ``10m x 3 fold rounds x 2 candidates + 120s``."""
    from airflow_grid.cv import budget
    from airflow_grid.spec import parse_cpu

    n_folds = int(item["n_folds"])
    n_jobs, _ = budget(parse_cpu(item["cpu"], "resources.cpu"), n_folds)
    rounds = math.ceil(n_folds / n_jobs)
    n = len(item["indices"])
    return (
        f"resources.timeout={item['timeout']} x {rounds} fold round(s) ({n_folds} folds, {n_jobs} at a time) "
        f"x {n} candidate(s) + {margin_s:g}s start-up margin"
    )


@dataclass
class _Running:
    fold: int
    process: Any  # multiprocessing's Process of the fork context
    started: float


def cross_validate_folds(
    estimator: Any,
    X: Any,
    y: Any,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    scoring: Any,
    metric_names: list[str],
    error_score: float | str,
    return_train_score: bool,
    params: dict[str, Any] | None,
    n_jobs: int,
    threads: int,
    timeout: float,
    timeout_text: str,
) -> dict[str, np.ndarray]:
    """``cross_validate(estimator, X, y, cv=folds, n_jobs=n_jobs, ...)`` with each fold stopped after ``timeout``.

    Same contract as ``cross_validate``: per-fold arrays keyed ``fit_time``, ``score_time``, ``test_<m>`` (and
    ``train_<m>``); a FitFailedWarning in sklearn's words when some folds failed; :class:`AllFoldsFailed` (a
    ValueError in sklearn's words) when all did; the fit error itself under ``error_score="raise"``. A child that
    dies without a result (killed, crashed) raises RuntimeError: an infrastructure failure, retried by Airflow.
    """
    context = multiprocessing.get_context(START_METHOD)
    pending = list(range(len(folds)))
    running: dict[Connection, _Running] = {}
    outcomes: list[dict[str, Any] | None] = [None] * len(folds)
    errors: list[str | None] = [None] * len(folds)
    try:
        while pending or running:
            while pending and len(running) < max(1, n_jobs):
                fold = pending.pop(0)
                receive, send = context.Pipe(duplex=False)
                arguments = (send, estimator, X, y, folds[fold], scoring, metric_names, error_score)
                process = context.Process(
                    target=_fold_child, args=(*arguments, return_train_score, params, threads), name=f"fold-{fold}"
                )
                sys.stdout.flush()  # a forked child flushes what it inherited: never print the parent's output twice
                sys.stderr.flush()
                process.start()
                send.close()
                running[receive] = _Running(fold, process, time.monotonic())
            first_deadline = min(job.started for job in running.values()) + timeout
            # At most a minute per wait: poll() refuses a timeout of years (resources.timeout: 100000h).
            ready = wait(list(running), timeout=min(60.0, max(0.0, first_deadline - time.monotonic())))
            for connection in cast(list[Connection], ready):
                job = running.pop(connection)
                outcome, fit_error = _receive(connection, job)
                if fit_error is not None:
                    errors[job.fold] = fit_error
                outcomes[job.fold] = outcome
            now = time.monotonic()
            for connection, job in list(running.items()):
                if now - job.started < timeout:
                    continue
                del running[connection]
                _stop(job, connection)
                message = timeout_message(job.fold, timeout_text)
                if error_score == "raise":
                    raise FoldTimeout(f"{message}; error_score='raise' fails the candidate.")
                errors[job.fold] = message
                outcomes[job.fold] = _failed_fold(metric_names, error_score, return_train_score, now - job.started)
    finally:
        for connection, job in running.items():
            _stop(job, connection)
    scores = {key: np.asarray([o[key][0] for o in outcomes if o is not None]) for key in _keys(outcomes)}
    failed = [error for error in errors if error is not None]
    if failed:
        _warn_or_raise(errors, error_score, scores)
    return scores


def _receive(connection: Connection, job: _Running) -> tuple[dict[str, Any], str | None]:
    """A finished child's (scores, fit error or None); re-raises its fit error under ``error_score="raise"``."""
    try:
        kind, payload = connection.recv()
    except EOFError:
        job.process.join()
        raise RuntimeError(
            f"fold {job.fold}: its process ended with exit code {job.process.exitcode} and no result "
            "(killed or crashed); nothing was stored for this candidate."
        ) from None
    finally:
        connection.close()
    job.process.join()
    if kind == "raise":
        raise payload
    scores, fit_error = payload
    return scores, fit_error


def _stop(job: _Running, connection: Connection) -> None:
    """SIGKILL a fold's process and everything it started (joblib/loky workers), then reap it."""
    for pid in [*limits.descendants(job.process.pid), job.process.pid]:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    job.process.join()
    connection.close()


def _keys(outcomes: list[dict[str, Any] | None]) -> list[str]:
    for outcome in outcomes:
        if outcome is not None:
            return list(outcome)
    return []


def _failed_fold(
    metric_names: list[str], error_score: float | str, return_train_score: bool, ran: float
) -> dict[str, Any]:
    """One fold's cross_validate-shaped scores for a fit that did not finish: error_score, and the time it ran."""
    from airflow_grid.cv import error_scores

    return error_scores(np.asarray([ran]), metric_names, error_score, return_train_score)


def _warn_or_raise(errors: list[str | None], error_score: float | str, scores: dict[str, Any]) -> None:
    """sklearn's own failure summary over all folds: FitFailedWarning, or the all-failed ValueError."""
    from sklearn.model_selection._validation import _warn_or_raise_about_fit_failures

    try:
        _warn_or_raise_about_fit_failures([{"fit_error": error} for error in errors], error_score)
    except ValueError as failure:
        raise AllFoldsFailed(str(failure), scores) from None


def _fold_child(
    send: Connection,
    estimator: Any,
    X: Any,
    y: Any,
    fold: tuple[np.ndarray, np.ndarray],
    scoring: Any,
    metric_names: list[str],
    error_score: float | str,
    return_train_score: bool,
    params: dict[str, Any] | None,
    threads: int,
) -> None:
    """In the child: sklearn's cross_validate on one fold, in-process; sends ("ok", (scores, fit error)) or
    ("raise", error)."""
    from sklearn.model_selection import cross_validate
    from threadpoolctl import threadpool_limits

    from airflow_grid.cv import _renamed_from

    started = time.perf_counter()
    try:
        with threadpool_limits(limits=threads), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # as the in-process path, which records and drops them
            try:
                scores = cross_validate(
                    estimator,
                    X,
                    y,
                    cv=[fold],
                    scoring=scoring,
                    n_jobs=1,
                    error_score=error_score,
                    return_train_score=return_train_score,
                    params=params or None,
                )
                message: tuple[str, Any] = ("ok", (scores, None))
            except ValueError as failure:
                if error_score == "raise":
                    raise (_renamed_from(failure) or failure) from None
                match = _ONE_FIT_ERROR.search(str(failure))
                if not match:
                    raise
                ran = time.perf_counter() - started
                message = ("ok", (_failed_fold(metric_names, error_score, return_train_score, ran), match.group(1)))
    except BaseException as error:  # sent to the parent, which raises it as the in-process path would
        message = ("raise", error)
    try:
        send.send(message)
    except Exception as unpicklable:  # an exception that cannot be pickled still fails the candidate
        send.send(("raise", RuntimeError(f"{type(message[1]).__name__}: {message[1]} ({unpicklable})")))
    send.close()
