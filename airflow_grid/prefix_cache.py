"""Fitted pipeline prefixes shared across tasks through the result store, where reading beats refitting.

Inside a task, candidates sharing a prefix fit it once per fold (:mod:`airflow_grid.prefixes`). Across tasks - one
candidate per task (``units: candidate``), or a later plan of the same data whose grid changed only final-step
values - the arrays the prefix produced for a fold (``fit_transform`` of the training rows, ``transform`` of the
test rows, and of the training rows for train scores) are written to the store and read back instead of fitting the
prefix again. Those arrays are all the final step and its scorers see, so the scores are the ones refitting gives,
bit for bit (float arrays round-trip ``np.save`` exactly).

Written only when it pays: a fold's arrays are kept when the prefix took longer to fit than
:data:`MIN_GAIN` times the estimated reading time (bytes / :data:`READ_BYTES_PER_S`). A StandardScaler → PCA
prefix on 80,000 x 100 fits in ≈ 0.1 s and would write ≈ 50 MB per fold: not kept (what Pipeline(memory=...)
gets wrong by hashing its input on every call). Only dense numpy outputs are kept; anything else is refitted.

The key names everything that decides those arrays - the estimator spec, the prefix's parameters, the folds, the
data, the library versions, whether train scores are needed - and every file is checked against the sha256
recorded beside it before it is used; a missing or damaged file means fitting the prefix.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import numpy as np

from airflow_grid.spec import SearchSpec, content_hash
from airflow_grid.store import Store

log = logging.getLogger(__name__)

PREFIX_DIR = "prefixes"
#: Reading a fold's arrays back from a local store, sha256 check included: ≈ 800 MB/s measured here for a 48 MB
#: file in the page cache (best of 5); set well below so that a slower store is not assumed fast.
READ_BYTES_PER_S = 250e6
MIN_GAIN = 2.0


def prefix_key(spec: SearchSpec, document: dict[str, Any], row: dict[str, Any], final: str, train: bool) -> str:
    """What decides a prefix's arrays for a row's folds: everything of its key but the final step's parameters."""
    shared = {k: v for k, v in row["params"].items() if k != final and not k.startswith(f"{final}__")}
    rounds = (document.get("halving") or {}).get("rounds") or []
    folds = next((r["folds_hash"] for r in rounds if r["folds"] == row["folds"]), document["folds_hash"])
    return content_hash(
        {
            "prefix_of": spec.raw.get("estimator"),
            "params": shared,
            "folds": folds,
            "data": document["data_fingerprint"],
            "versions": document["versions"],
            "result_format": document["result_format"],
            "train": train,
        }
    )


class PrefixCache:
    """One prefix's per-fold arrays in the store (picklable: it travels to joblib's fold workers)."""

    def __init__(self, store: Store, key: str) -> None:
        self.store, self.key = store, key

    def _path(self, fold: int, suffix: str) -> str:
        return f"{PREFIX_DIR}/{self.key[:2]}/{self.key}/fold{fold}.{suffix}"

    def get(self, fold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(fitted train rows, test rows, train rows for train scores or None), or None to fit the prefix."""
        try:
            check = json.loads(self.store.read_bytes(self._path(fold, "json")))
            payload = self.store.read_bytes(self._path(fold, "npz"))
        except (FileNotFoundError, ValueError):
            return None
        if hashlib.sha256(payload).hexdigest() != check.get("sha256"):
            log.warning("airflow-grid: cached prefix %s fold %d is damaged; fitting the prefix.", self.key[:12], fold)
            return None
        with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
            return arrays["fitted"], arrays["to_test"], arrays.get("to_train")

    def put(self, fold: int, fitted: Any, to_test: Any, to_train: Any, seconds: float) -> bool:
        """Keep a fold's arrays if reading them back is clearly cheaper than the ``seconds`` the prefix took."""
        parts = {"fitted": fitted, "to_test": to_test, **({} if to_train is None else {"to_train": to_train})}
        if not all(type(a) is np.ndarray and a.dtype.kind in "fiub" for a in parts.values()):
            return False  # sparse, frames, objects: refitted rather than converted
        if seconds < MIN_GAIN * sum(a.nbytes for a in parts.values()) / READ_BYTES_PER_S:
            return False
        buffer = io.BytesIO()
        np.savez(buffer, **parts)
        payload = buffer.getvalue()
        try:
            self.store.write_bytes(self._path(fold, "npz"), payload)
            self.store.write_json(self._path(fold, "json"), {"sha256": hashlib.sha256(payload).hexdigest()})
        except OSError as error:  # a cache: the scores are computed either way
            log.warning("airflow-grid: could not keep prefix %s fold %d (%s).", self.key[:12], fold, error)
            return False
        return True
