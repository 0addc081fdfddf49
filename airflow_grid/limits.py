"""A candidate's CPU and memory budgets, enforced inside the worker. Imports neither Airflow nor MLflow.

* :func:`cap_n_jobs` - threadpoolctl caps BLAS/OpenMP pools, not joblib workers: ``RandomForestClassifier(n_jobs=-1)``
  would still take every core of the node. The worker caps every ``n_jobs`` in the estimator tree to its budget.
  ``n_jobs`` never changes a score in scikit-learn, so capping (not refusing) keeps cv_results_ identical to
  GridSearchCV's, whose ``params`` still show the user's value.
* :class:`MemoryWatchdog` - the memory budget covers the resident memory of *all* the candidate's processes (the
  worker and its joblib/loky children), like a container's cgroup limit, on any machine (no cgroup needed).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

MEBI = 2**20
# The worker refuses a budget that leaves less than this share free once its imports are done.
STARTUP_HEADROOM = 0.10


# --------------------------------------------------------------------------------------------------
# CPU: n_jobs


def cap_n_jobs(estimator: Any, limit: int) -> dict[str, dict[str, Any]]:
    """Set every ``n_jobs`` in ``estimator``'s tree that could exceed ``limit`` to ``limit``; return what changed.

    Walks every estimator reachable through ``get_params(deep=False)`` values, recursively through lists, tuples
    and dicts (Pipeline steps, ColumnTransformer transformers, VotingClassifier estimators, a meta-estimator's
    ``estimator``). Capped: negative values (-1 = every core), values above ``limit``, and ``None`` inside a
    joblib ``parallel_config(n_jobs=...)`` that would exceed it. Returns ``{"clf__n_jobs": {"asked": -1, "used":
    1}}``, keyed by sklearn's parameter path.
    """
    capped: dict[str, dict[str, Any]] = {}
    _walk(estimator, "", max(1, int(limit)), capped, set())
    return capped


def _is_estimator(value: Any) -> bool:
    return not isinstance(value, type) and hasattr(value, "get_params") and hasattr(value, "set_params")


def _walk(node: Any, prefix: str, limit: int, capped: dict[str, dict[str, Any]], seen: set[int]) -> None:
    if not _is_estimator(node) or id(node) in seen:
        return
    seen.add(id(node))
    for name, value in node.get_params(deep=False).items():
        if name == "n_jobs":
            used = _capped(value, limit)
            if used is not None:
                node.set_params(n_jobs=used)
                capped[f"{prefix}n_jobs"] = {"asked": value, "used": used}
            continue
        for path, child in _children(value, f"{prefix}{name}__", prefix):
            _walk(child, path, limit, capped, seen)


def _children(value: Any, path: str, parent: str) -> list[tuple[str, Any]]:
    """(parameter path prefix, object) pairs inside a parameter value; named tuples use sklearn's ``name__``."""
    if isinstance(value, dict):
        return [pair for key, item in value.items() for pair in _children(item, f"{path}{key}__", parent)]
    if isinstance(value, list | tuple):
        found: list[tuple[str, Any]] = []
        for index, item in enumerate(value):
            if isinstance(item, tuple) and len(item) >= 2 and isinstance(item[0], str):  # ("clf", SVC(), ...)
                found.append((f"{parent}{item[0]}__", item[1]))
            else:
                found += _children(item, f"{path}{index}__", parent)
        return found
    return [(path, value)] if _is_estimator(value) else []


def _capped(value: Any, limit: int) -> int | None:
    """The value to use instead of ``value``, or None when ``value`` already fits the budget."""
    if value is None:
        from joblib.parallel import get_active_backend

        _, context_n_jobs = get_active_backend()  # None unless inside parallel_config(n_jobs=...)
        if context_n_jobs is None:
            return None  # joblib runs it with 1 job
        value_in_effect: Any = context_n_jobs
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value_in_effect = int(value)
    else:
        return None  # not a count (sklearn rejects it at fit time)
    return limit if value_in_effect < 0 or value_in_effect > limit else None


# --------------------------------------------------------------------------------------------------
# Memory


def memory_text(n_bytes: int) -> str:
    """A byte count as a Kubernetes quantity when it is a whole number of Gi/Mi/Ki, else the plain number."""
    for suffix, factor in (("Gi", 2**30), ("Mi", MEBI), ("Ki", 2**10)):
        if n_bytes >= factor and n_bytes % factor == 0:
            return f"{n_bytes // factor}{suffix}"
    return str(n_bytes)


def startup_problem(limit: int, rss: int) -> str | None:
    """Why a budget cannot work when the worker already holds ``rss`` bytes after its imports, or None."""
    if rss < limit * (1 - STARTUP_HEADROOM):
        return None
    suggestion = 1 << max(8, (2 * rss - 1).bit_length() - 20)  # a power of two in Mi, >= twice the start-up RSS
    return (
        f"memory budget {memory_text(limit)} ({limit} bytes) is below what the worker needs to start "
        f"(≈ {rss / MEBI:.0f} MiB after imports). Fix: resources.memory: {suggestion}Mi or more."
    )


def tree_rss(pid: int | None = None) -> tuple[int, int]:
    """(resident bytes summed over process ``pid`` and all its descendants, number of processes).

    Shared pages (libraries, memory-mapped data) count once per process: a conservative stand-in for a cgroup.
    """
    root = os.getpid() if pid is None else pid
    total, count = 0, 0
    for member in [root, *descendants(root)]:
        try:
            with open(f"/proc/{member}/statm") as statm:
                total += int(statm.read().split()[1]) * _PAGE_SIZE
            count += 1
        except (OSError, IndexError, ValueError):  # exited since it was listed, or no /proc: ask psutil
            rss = _psutil_rss(member)
            total, count = total + rss, count + (rss > 0)
    return total, count


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, read from /proc/<pid>/task/<tid>/children (Linux): the cost grows with the
    candidate's own processes and threads, not with every process on the node, as a scan of /proc would."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        import psutil

        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            threads = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                with open(f"/proc/{parent}/task/{thread}/children") as children:
                    kids = [int(kid) for kid in children.read().split()]
            except (OSError, ValueError):
                continue
            found += kids
            pending += kids
    return found


def _psutil_rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


class MemoryWatchdog:
    """A daemon thread that stops the worker when its whole process tree goes over the memory budget.

    Every ``interval`` seconds it sums the resident memory of this process and its descendants; over ``limit`` it
    kills the descendants, prints why on stderr and calls ``on_exceeded`` (the worker exits 3 there, so nothing is
    stored for the candidate in progress). A sampler, not a hard limit: a burst within one interval can overshoot
    before it is seen; a fit holding the GIL in C code for seconds delays the check.
    """

    def __init__(self, limit: int, on_exceeded: Callable[[], None], interval: float = 0.05) -> None:
        self.limit = limit
        self.interval = interval
        self.on_exceeded = on_exceeded
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="airflow-grid-memory-watchdog", daemon=True)

    def start(self) -> MemoryWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            used, processes = tree_rss()
            self.peak = max(self.peak, used)
            if used > self.limit:
                self._exceeded(used, processes)
                return

    def _exceeded(self, used: int, processes: int) -> None:
        kill_descendants()
        remove_joblib_leftovers()  # the killed resource tracker would have removed them
        print(
            f"airflow-grid worker: out of memory: the candidate's {processes} process(es) used "
            f"{used / MEBI:.0f} MiB, over resources.memory={memory_text(self.limit)} ({self.limit} bytes); nothing "
            "was stored for the candidate in progress. Fix: raise resources.memory, or lower the data size or "
            "resources.cpu (each parallel fold is a process holding its own copy of the model).",
            file=sys.stderr,
            flush=True,
        )
        self.on_exceeded()


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (joblib/loky workers), twice in case one spawned meanwhile."""
    for _ in range(2):
        for child in descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)


def remove_joblib_leftovers(pid: int | None = None) -> None:
    """Delete the memmapping folders and loky semaphores this process created (``*_<pid>_*`` in /dev/shm, TMPDIR)."""
    import glob
    import shutil
    import tempfile

    pid = os.getpid() if pid is None else pid
    roots = {"/dev/shm", tempfile.gettempdir(), os.environ.get("JOBLIB_TEMP_FOLDER") or tempfile.gettempdir()}
    for root in roots:
        for path in glob.glob(os.path.join(root, f"joblib_memmapping_folder_{pid}_*")):
            shutil.rmtree(path, ignore_errors=True)
    for path in glob.glob(f"/dev/shm/sem.loky-{pid}-*"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def exit_out_of_memory(code: int) -> Callable[[], None]:
    """An ``on_exceeded`` that ends the process at once: the main thread may be inside a fit that never returns."""

    def stop() -> None:
        sys.stderr.flush()
        os._exit(code)

    return stop
