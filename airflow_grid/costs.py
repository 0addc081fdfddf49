"""What a unit of work will cost, so the slowest unit starts first and quick units share one task's start-up.

Costs are learned, not guessed: after each search the seconds every unit of work spent in its fold loops
(``elapsed_s`` of its results, split evenly among the unit's candidates) are remembered per study in the result
store (``costs/<study>.json``), keyed by what stays the same when the dataset is re-versioned: the estimator spec,
the candidate's params and its halving resource. Last night's run of a study therefore predicts tonight's.

Without any history every candidate counts as one (a chain or a prefix group counts its members) and nothing is
batched: a quick grid is batched from its second run on. Only the order and the grouping of work change here;
every candidate is still evaluated exactly as alone, so no score can change, and cv_results_ keeps scikit-learn's
order (results are reduced by candidate index, never in the order they ran).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any

from airflow_grid.spec import SearchSpec, canonical_json
from airflow_grid.store import Store

log = logging.getLogger(__name__)

HISTORY_DIR = "costs"
#: A unit predicted to take less than this many seconds of fold loops is batched with others until the task's
#: work reaches it: about five times what starting a task costs on the backend (a local evaluate task under the
#: scheduler ≈ 1.5-2 s before its first fit, a pod ≈ 8 s; see the README's Performance section).
QUICK_SECONDS = {"local": 10.0, "kubernetes": 40.0}
#: How many signatures a study's history keeps (the newest); about 60 bytes each.
MAX_ENTRIES = 200_000


def signature(spec: SearchSpec, row: dict[str, Any]) -> str:
    """What identifies a candidate's work across data versions (not the data, folds or library versions)."""
    identity = {"estimator": spec.raw.get("estimator"), "params": row["params"], "n": row.get("n_resources")}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()[:20]


def history_path(study: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in study)
    return f"{HISTORY_DIR}/{safe}.json"


def load(store: Store, study: str) -> dict[str, float]:
    """The study's remembered seconds per signature; empty when there are none or the file is unreadable."""
    try:
        history = json.loads(store.read_bytes(history_path(study)))
    except FileNotFoundError:
        return {}
    except Exception as error:  # a prediction is never worth failing a plan over
        log.warning("airflow-grid: cost history of %r unreadable (%s); planning without it.", study, error)
        return {}
    if not isinstance(history, dict):
        return {}
    return {k: float(v) for k, v in history.items() if isinstance(v, int | float) and math.isfinite(v) and v >= 0}


def observed(spec: SearchSpec, rows: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds per signature from results: a unit's ``elapsed_s`` shared by the candidates that ran in it."""
    unit_sizes: dict[tuple[Any, ...], int] = {}
    for result in results:
        unit_sizes[_unit(result)] = unit_sizes.get(_unit(result), 0) + 1
    seen = {}
    for row, result in zip(rows, results, strict=True):
        elapsed = result.get("elapsed_s")
        if isinstance(elapsed, int | float) and math.isfinite(elapsed):
            seen[signature(spec, row)] = float(elapsed) / unit_sizes[_unit(result)]
    return seen


def _unit(result: dict[str, Any]) -> tuple[Any, ...]:
    """Results of one unit share its elapsed time and its kind of sharing (chain sizes or shared prefix)."""
    chain = result.get("chain") or {}
    sizes = tuple(chain.get("sizes") or ())
    return (result.get("elapsed_s"), chain.get("param"), sizes, bool(result.get("shared_prefix")))


def remember(store: Store, spec: SearchSpec, rows: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> None:
    """Merge this search's costs into the study's history; best effort (results matter, predictions don't)."""
    try:
        history = {**load(store, spec.name), **observed(spec, rows, results)}
        if len(history) > MAX_ENTRIES:  # dicts keep insertion order: the newest entries are last
            history = dict(list(history.items())[-MAX_ENTRIES:])
        store.write_json(history_path(spec.name), history)
    except Exception as error:
        log.warning("airflow-grid: could not remember the costs of %r (%s); results are unaffected.", spec.name, error)


def predict(units: Sequence[Sequence[str]], history: dict[str, float]) -> tuple[list[float], bool]:
    """Each unit's predicted seconds (units given as their candidates' signatures), and whether they are seconds.

    A candidate without history costs the median of the known ones; with no history at all each candidate costs
    1 (a unit its size), which orders but does not batch.
    """
    known = [history[s] for unit in units for s in unit if s in history]
    if not known:
        return [float(len(unit)) for unit in units], False
    fallback = statistics.median(known)
    return [sum(history.get(s, fallback) for s in unit) for unit in units], True


def schedule(
    units: Sequence[list[int]],
    cost: Sequence[float],
    *,
    quick_seconds: float | None,
    min_items: int,
    max_items: int | None = None,
) -> list[list[int]]:
    """Units grouped into tasks, the costliest task first.

    ``quick_seconds``: units predicted under it are packed together (longest-processing-time first, each into the
    lightest task) into as many tasks as their total needs, but never fewer tasks overall than ``min_items`` (the
    slots that run them), so batching never idles a slot; ``None`` disables batching. ``max_items``: at most that
    many tasks (the ``max_parallel`` param), packed the same way.
    """
    order = sorted(range(len(units)), key=lambda i: -cost[i])  # stable: equal costs keep the plan's order
    tasks = [([i], cost[i]) for i in order]
    if quick_seconds is not None:
        slow = [t for t in tasks if t[1] >= quick_seconds]
        quick = [t for t in tasks if t[1] < quick_seconds]
        if len(quick) > 1:
            wanted = max(math.ceil(sum(c for _, c in quick) / quick_seconds), min_items - len(slow), 1)
            tasks = slow + _pack(quick, min(wanted, len(quick)))
    if max_items and len(tasks) > max_items:
        tasks = _pack(tasks, max_items)
    tasks.sort(key=lambda t: -t[1])
    return [[index for unit in members for index in units[unit]] for members, _ in tasks]


def _pack(tasks: list[tuple[list[int], float]], n_bins: int) -> list[tuple[list[int], float]]:
    """Longest-processing-time first: each task, costliest first, joins the bin with the least work so far."""
    heap = [(0.0, b) for b in range(n_bins)]
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for units, cost in sorted(tasks, key=lambda t: -t[1]):
        total, lightest = heapq.heappop(heap)
        members[lightest].extend(units)
        heapq.heappush(heap, (total + cost, lightest))
    totals = dict((b, total) for total, b in heap)
    return [(members[b], totals[b]) for b in range(n_bins) if members[b]]
