"""A rerun with nothing changed is answered from the store: no planning, no scikit-learn import, no data load.

Planning costs about 2 s before the first fit whatever the grid (Python importing scikit-learn, loading and
fingerprinting the data, checking the snapshot). When a complete ``airflow-grid run`` is repeated with the same
spec document, the same policy, the same data and the same library versions, its plan, every candidate's result
and the reduced ``cv_results_`` are already in the store; this module finds them without recomputing the plan.

It may only answer what the full path would: the lookup key names the spec document, the policy and the data
(a ``data.path`` file by the sha256 of its bytes; a dataset loader by its spec), and a key is recorded only where
those decide the plan — the data loader is scikit-learn's and seeded (or draws nothing), and neither the folds,
the holdout nor the search draw with an unset ``random_state``. The plan's library versions are checked against
this process's, as the worker checks them; the reduced result is used only if every candidate's stored result is
byte for byte the one it was reduced from. Anything else falls back to planning.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from typing import Any

from airflow_grid import versions
from airflow_grid.spec import SearchSpec, content_hash
from airflow_grid.store import Store

LOOKUP_DIR = "lookups"
REDUCED_DIR = "reduced"
#: unseeded components that change the plan itself (its folds, holdout or candidates), not only scores
PLAN_DRAWS = ("cv", "holdout", "search")


def data_identity(raw_spec: dict[str, Any]) -> dict[str, Any] | None:
    """What names the data without loading it: a file's bytes by sha256, a loader by its spec; None if unknown."""
    data = raw_spec.get("data")
    if not isinstance(data, dict):
        return None
    path = data.get("path")
    if path is None:
        return {"loader": data} if isinstance(data.get("_target_"), str) else None
    if not isinstance(path, str) or "{" in path:  # templated paths are rendered by the DAG, not here
        return None
    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (OSError, ValueError):
        return None  # the full path reports the error
    where = os.path.abspath(path) if "://" not in path else path
    return {"path": where, "sha256": digest.hexdigest()}


def lookup_key(raw_spec: dict[str, Any], policy: dict[str, Any], identity: dict[str, Any]) -> str:
    return content_hash({"spec": raw_spec, "policy": policy, "data": identity})


def decided_by_inputs(spec: SearchSpec, document: dict[str, Any]) -> bool:
    """Whether the spec, policy, data identity and versions decide this plan (so a lookup may stand for it)."""
    if document.get("halving"):  # its rounds are replayed from scores: left to the full path
        return False
    if any(entry.get("component") in PLAN_DRAWS for entry in document.get("unseeded") or []):
        return False
    data = spec.data
    if "path" in data:
        return True
    module_name, _, name = str(data.get("_target_", "")).rpartition(".")
    if module_name.split(".")[:2] != ["sklearn", "datasets"]:
        return False  # another library's loader: whether it draws is not known here
    loader = getattr(importlib.import_module(module_name), name, None)
    if loader is None:
        return False
    if "random_state" not in inspect.signature(loader).parameters:
        return True  # load_iris and the like read bundled files
    seed = data.get("random_state")
    return isinstance(seed, int) and not isinstance(seed, bool)


def results_digest(store: Store, keys: list[str]) -> str | None:
    """One digest of every candidate's stored result bytes, in order; None if any is missing."""
    read = stored_results(store, keys)
    return None if read is None else read[0]


def stored_results(store: Store, keys: list[str]) -> tuple[str, list[bytes]] | None:
    """(the digest of every candidate's stored result bytes in order, those bytes); None if any is missing."""
    digest, payloads = hashlib.sha256(), []
    for key in keys:
        try:
            payload = store.read_bytes(store.result_path(key))
        except FileNotFoundError:
            return None
        digest.update(key.encode() + b"\0" + hashlib.sha256(payload).digest())
        payloads.append(payload)
    return digest.hexdigest(), payloads


def remember(store: Store, key: str, plan_id: str, digest: str, reduced: dict[str, Any]) -> None:
    """After a complete run: the plan the inputs give, and what its results reduced to."""
    store.write_json(f"{store.plan_dir(plan_id)}/{REDUCED_DIR}/{digest[:40]}.json", reduced)
    store.write_json(f"{LOOKUP_DIR}/{key[:40]}.json", {"plan_id": plan_id})


def answer(store: Store, raw_spec: dict[str, Any], policy: dict[str, Any]) -> dict[str, Any] | None:
    """The stored outcome of the same inputs, with ``plan_id``, ``plan_uri``, ``document`` and the candidates'
    ``results``; else None."""
    identity = data_identity(raw_spec)
    if identity is None:
        return None
    try:
        plan_id = store.read_json(f"{LOOKUP_DIR}/{lookup_key(raw_spec, policy, identity)[:40]}.json")["plan_id"]
        directory = store.plan_dir(plan_id)
        document = store.read_json(f"{directory}/plan.json")
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    planned = document.get("versions") or {}
    if any(versions.mismatch(planned, versions.versions_of(planned))):
        return None  # an upgrade gives a new plan: the full path makes it
    if not store.files_match(document):
        return None  # a damaged snapshot: re-planning heals it (and a refit needs it whole)
    read = stored_results(store, [candidate["key"] for candidate in document["candidates"]])
    if read is None:
        return None
    try:
        reduced = store.read_json(f"{directory}/{REDUCED_DIR}/{read[0][:40]}.json")
    except (FileNotFoundError, ValueError):
        return None
    store.touch_in_use(plan_id)  # as make_plan does: gc keeps a plan in use
    results = [json.loads(payload) for payload in read[1]]  # byte for byte what was reduced: they parse
    return {**reduced, "plan_id": plan_id, "plan_uri": store.url(directory), "document": document, "results": results}
