"""How a run's conf/params reach the spec, and which dataset version a run works on. Pure: no Airflow import.

Precedence, lowest to highest (each level replaces what it names, whole - no deep merge, as Airflow's Params):

1. the spec file the DAG was built from;
2. ``spec_path``: another spec file;
3. ``spec``: a whole spec document;
4. the field params ``param_grid``, ``search``, ``param_distributions``, ``cv``, ``scoring``, ``resources``,
   ``backend``: replace that field. ``param_grid`` and ``param_distributions`` are the same role (the search
   space): overriding one drops the other from the lower levels (setting both in one conf is refused at plan).

Dataset version, first that is set: the ``dataset_version`` param/conf; the triggering asset event's
``extra.dataset_version``; the run's logical date (scheduled and backfill runs); else the data fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from airflow_grid.policy import default_data_roots, path_within
from airflow_grid.spec import load_spec_file

__all__ = ["FIELD_OVERRIDES", "dataset_version", "default_data_roots", "path_within", "spec_document"]

FIELD_OVERRIDES = ("param_grid", "search", "param_distributions", "cv", "scoring", "resources", "backend")
_SPACES = ("param_grid", "param_distributions")


def spec_document(default_spec_path: str, params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The spec document for a run and the list of overrides applied (for the log and the MLflow run)."""
    applied: list[str] = []
    if params.get("spec"):
        document = dict(params["spec"])
        applied.append("spec")
    elif params.get("spec_path"):
        document = load_spec_file(params["spec_path"])
        applied.append(f"spec_path={params['spec_path']}")
    else:
        document = load_spec_file(default_spec_path)
    overridden = [name for name in _SPACES if params.get(name) is not None]
    if len(overridden) == 1:  # a new search space replaces the file's, whichever field the file used
        document.pop(_SPACES[1 - _SPACES.index(overridden[0])], None)
    for name in FIELD_OVERRIDES:
        if params.get(name) is not None:
            document[name] = params[name]
            applied.append(name)
    return document, applied


def dataset_version(
    params: Mapping[str, Any], asset_event_extras: Iterable[Mapping[str, Any]], logical_date: datetime | None
) -> tuple[str | None, str]:
    """(version, where it came from). ``None`` means: use the data fingerprint once the data is loaded."""
    if params.get("dataset_version"):
        return str(params["dataset_version"]), "conf"
    for extra in asset_event_extras:
        if extra and extra.get("dataset_version"):
            return str(extra["dataset_version"]), "asset_event"
    if logical_date is not None:
        return logical_date.date().isoformat(), "logical_date"
    return None, "fingerprint"
