"""How a run's conf/params reach the spec, and which dataset version a run works on. Pure: no Airflow import.

Precedence, lowest to highest (each level replaces what it names, whole - no deep merge, as Airflow's Params):

1. the spec file the DAG was built from;
2. ``spec_path``: another spec file;
3. ``spec``: a whole spec document;
4. the field params ``param_grid``, ``cv``, ``scoring``, ``resources``, ``backend``: replace that field.

Dataset version, first that is set: the ``dataset_version`` param/conf; the triggering asset event's
``extra.dataset_version``; the run's logical date (scheduled and backfill runs); else the data fingerprint.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_grid.spec import load_spec_file

FIELD_OVERRIDES = ("param_grid", "cv", "scoring", "resources", "backend")


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


def default_data_roots(document: Mapping[str, Any]) -> list[str]:
    """Where a DAG's own spec reads its data: the directory of ``data.path`` up to its first template, if any."""
    data = document.get("data")
    path = data.get("path") if isinstance(data, Mapping) else None
    if not isinstance(path, str) or not path:
        return []
    fixed = path.split("{{", 1)[0]
    directory = fixed if fixed.endswith("/") else posixpath.dirname(fixed) + "/"
    if not _split_url(directory)[1].strip("/"):  # no fixed directory (or the filesystem root): no default root
        return []
    return [directory]


def path_within(path: str, roots: Sequence[str]) -> bool:
    """Whether ``path`` (a local path or an fsspec URL) lies under one of ``roots``; ``..`` never climbs out.

    Local paths (and ``file://``) are compared resolved, symlinks followed; URLs by scheme and normalised path,
    and a URL with a ``..`` segment is refused outright (object stores do not resolve it the same way).
    """
    scheme, rest = _split_url(path)
    if scheme != "file" and ".." in PurePosixPath(rest).parts:
        return False
    for root in roots:
        root_scheme, root_rest = _split_url(root)
        if root_scheme != scheme:
            continue
        if scheme == "file":
            if Path(rest).resolve().is_relative_to(Path(root_rest).resolve()):
                return True
        elif PurePosixPath(posixpath.normpath(rest)).is_relative_to(PurePosixPath(posixpath.normpath(root_rest))):
            return True
    return False


def _split_url(path: str) -> tuple[str, str]:
    if "://" not in path:
        return "file", path
    scheme, rest = path.split("://", 1)
    return scheme.lower(), rest
