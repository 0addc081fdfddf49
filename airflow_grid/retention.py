"""Retention for the result store: what `airflow-grid gc` (and the weekly gc DAG) deletes and keeps.

Rules, in order: a plan whose ``in_use`` marker was touched within the in-use window (a planner or worker started
on it) is kept with every result it names - a running study never loses its inputs; per study the newest
``keep_plans`` plans (by the ``created`` time in plan.json) are kept, with their results; any other result is kept
while younger than ``max_age``. Everything else - older plans, old unreferenced results, old quarantined files,
leftovers of crashed writes - is deleted. Deciding is pure (:func:`collect`); :func:`apply` deletes.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from airflow_grid.store import IN_USE_FILE, QUARANTINE_DIR, Store

#: What the store keeps only to go faster (fitted prefix arrays, rerun lookups): deleted once older than max_age.
CACHE_DIRS = ("prefixes", "lookups")

PLAN_FILE = "plan.json"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass(frozen=True)
class Entry:
    """One unit of retention: a plan directory or a single file, with its fate and why."""

    kind: str  # "plan", "result", "quarantine", "temporary", "cache"
    name: str  # the plan directory or file, relative to the store root
    files: int
    size: int
    delete: bool
    reason: str


@dataclass
class Report:
    root: str
    dry_run: bool
    entries: list[Entry] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(entry.size for entry in self.entries if entry.delete)


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` in seconds; a ValueError names the accepted form."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text))
    if not match:
        raise ValueError(f"age {text!r} is not a number with a unit; write e.g. 30d, 12h, 90m, 45s or 2w.")
    return float(match[1]) * _UNITS[match[2]]


def collect(store: Store, keep_plans: int, max_age: float, in_use_window: float, now: float | None = None) -> Report:
    """Decide, without deleting anything, what a gc of ``store`` removes and keeps (ages in seconds)."""
    if keep_plans < 0:
        raise ValueError(f"keep_plans is {keep_plans}; keep 0 or more plans per study.")
    now = time.time() if now is None else now
    report = Report(root=store.root, dry_run=True)
    referenced = _collect_plans(store, keep_plans, in_use_window, now, report)
    for relative, size in store.list_files("results").items():
        age = now - store.modified(relative)
        key = relative.rsplit("/", 1)[-1].removesuffix(".json")
        if relative.rsplit("/", 1)[-1].startswith("."):
            old = age >= in_use_window
            reason = "leftover of an interrupted write" if old else "a write in progress"
            report.entries.append(Entry("temporary", relative, 1, size, old, reason))
        elif key in referenced:
            report.entries.append(Entry("result", relative, 1, size, False, "named by a kept plan"))
        else:
            young = age < max_age
            reason = (
                f"younger than {_show_age(max_age)}" if young else f"older than {_show_age(max_age)}, in no kept plan"
            )
            report.entries.append(Entry("result", relative, 1, size, not young, reason))
    for relative, size in store.list_files(QUARANTINE_DIR).items():
        old = now - store.modified(relative) >= max_age
        report.entries.append(Entry("quarantine", relative, 1, size, old, "damaged file set aside"))
    for top in CACHE_DIRS:  # rebuilt on demand: kept while young, whatever plan they came from
        for relative, size in store.list_files(top).items():
            old = now - store.modified(relative) >= max_age
            reason = f"{top}/ older than {_show_age(max_age)}" if old else f"{top}/ younger than {_show_age(max_age)}"
            report.entries.append(Entry("cache", relative, 1, size, old, reason))
    return report


def _collect_plans(store: Store, keep_plans: int, in_use_window: float, now: float, report: Report) -> set[str]:
    """Add an entry per plan directory to ``report``; returns the result keys every kept plan names."""
    directories: dict[str, dict[str, int]] = defaultdict(dict)
    for relative, size in store.list_files("plans").items():
        parts = relative.split("/")
        if len(parts) >= 3:
            directories[parts[1]][relative] = size
    documents = {plan_id: _read_plan(store, plan_id) for plan_id in directories}
    by_study: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for plan_id, document in documents.items():
        if document is not None:
            by_study[str(document.get("study"))].append((_created(store, plan_id, document), plan_id))
    newest = {plan_id for plans in by_study.values() for _, plan_id in sorted(plans, reverse=True)[:keep_plans]}
    referenced: set[str] = set()
    for plan_id, files in directories.items():
        document = documents[plan_id]
        marker = f"plans/{plan_id}/{IN_USE_FILE}"
        in_use = marker in files and now - store.modified(marker) < in_use_window
        if in_use:
            reason = f"in use (touched within {_show_age(in_use_window)})"
        elif plan_id in newest:
            reason = f"among the {keep_plans} newest of its study"
        elif document is None:
            reason = "no readable plan.json and not in use"
        else:
            reason = f"older than the {keep_plans} newest of study {document.get('study')}"
        keep = in_use or plan_id in newest
        report.entries.append(Entry("plan", f"plans/{plan_id}", len(files), sum(files.values()), not keep, reason))
        if keep and document is not None:
            referenced.update(str(candidate.get("key")) for candidate in document.get("candidates", []))
    return referenced


def _read_plan(store: Store, plan_id: str) -> dict[str, Any] | None:
    try:
        document = store.read_json(f"plans/{plan_id}/{PLAN_FILE}")
    except (FileNotFoundError, ValueError):
        return None
    return document if isinstance(document, dict) and "candidates" in document else None


def _created(store: Store, plan_id: str, document: dict[str, Any]) -> float:
    """plan.json's ``created`` time; a plan from before it was recorded falls back to the file's mtime."""
    try:
        return datetime.fromisoformat(str(document["created"])).timestamp()
    except (KeyError, ValueError):
        return store.modified(f"plans/{plan_id}/{PLAN_FILE}")


def apply(store: Store, report: Report) -> Report:
    """Delete what ``report`` marks for deletion; returns the report as done (not a dry run)."""
    for entry in report.entries:
        if entry.delete:
            store.delete(entry.name, recursive=entry.kind == "plan")
    report.dry_run = False
    return report


def gc(
    store: Store,
    keep_plans: int = 3,
    max_age: str = "30d",
    in_use_window: str = "24h",
    dry_run: bool = False,
) -> Report:
    """One gc pass: decide, then delete unless ``dry_run``. The entry point for the CLI and the gc DAG."""
    report = collect(store, keep_plans, parse_age(max_age), parse_age(in_use_window))
    return report if dry_run else apply(store, report)


def render(report: Report) -> str:
    """What was (or would be) freed and kept, per kind, with the reasons."""
    verb = "would free" if report.dry_run else "freed"
    lines = [f"airflow-grid gc of {report.root}" + (" (dry run: nothing deleted)" if report.dry_run else "")]
    for delete, title in ((True, "would delete" if report.dry_run else "deleted"), (False, "kept")):
        chosen = [entry for entry in report.entries if entry.delete is delete]
        lines.append(f"{title}:" + ("" if chosen else " nothing"))
        for kind in ("plan", "result", "quarantine", "temporary", "cache"):
            of_kind = [entry for entry in chosen if entry.kind == kind]
            if not of_kind:
                continue
            reasons = Counter(entry.reason for entry in of_kind)
            why = "; ".join(f"{count} {reason}" for reason, count in reasons.most_common())
            size = sum(entry.size for entry in of_kind)
            files = sum(entry.files for entry in of_kind)
            lines.append(f"  {kind + 's':<11} {len(of_kind):>5} ({files} files, {_show_bytes(size)}): {why}")
            if kind == "plan" and delete:
                lines.extend(f"    {entry.name}: {entry.reason}" for entry in of_kind)
    lines.append(f"{verb} {_show_bytes(report.freed_bytes)}")
    return "\n".join(lines)


def _show_bytes(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size} bytes ({size / scale:.1f} {unit})"
    return f"{size} bytes"


def _show_age(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{int(seconds // _UNITS[unit])}{unit}"
    return f"{seconds:g}s"
