"""The search spec: parse and validate YAML/JSON into a :class:`SearchSpec`.

A spec is untrusted input (it may come from a UI form): its size and depth are bounded before anything walks it,
every object it names is resolved and checked by :mod:`airflow_grid.policy` at parse time (nothing is called), and
every validation error names the field path, shows the value and says the fix. Validation that needs the estimator
(unknown grid parameters, parameter values, scorers) lives in :mod:`airflow_grid.grid`, which builds each candidate
once at plan time.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from airflow_grid import policy as trust
from airflow_grid.build import TARGET_KEY, build, check, is_object_spec, is_step_list
from airflow_grid.errors import SpecError
from airflow_grid.errors import show as _show
from airflow_grid.policy import ALLOWED_TARGETS_ENV, Policy

__all__ = [
    "ALLOWED_TARGETS_ENV",
    "TARGET_KEY",
    "Holdout",
    "Resources",
    "SearchSpec",
    "SpecError",
    "build",
    "content_hash",
    "is_object_spec",
    "is_step_list",
    "load_spec_file",
    "parse_spec",
]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(s|m|h)$")
_DURATION_FACTORS = {"s": 1, "m": 60, "h": 3600}
_MEMORY_FACTORS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_KNOWN_FIELDS = {
    "name",
    "data",
    "holdout",
    "estimator",
    "param_grid",
    "search",
    "param_distributions",
    "cv",
    "scoring",
    "refit",
    "error_score",
    "return_train_score",
    "resources",
    "limits",
    "backend",
    "fit_params",
    "units",
}
DEFAULT_MAX_FITS = 5000
MAX_SPEC_FILE_BYTES = 1_000_000


# --------------------------------------------------------------------------------------------------
# Resources


def parse_cpu(value: Any, path: str) -> float:
    """CPU as a number of cores or a Kubernetes quantity (``500m``)."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int | float):
        cores = float(value)
    else:
        match = _QUANTITY.match(str(value)) if value is not None else None
        if not match or match.group(2) not in (None, "m"):
            raise SpecError(path, f"got {_show(value)}.", "give cores as a number (2, 0.5) or millicores ('500m').")
        cores = float(match.group(1)) / (1000 if match.group(2) == "m" else 1)
    if not math.isfinite(cores) or cores <= 0:
        raise SpecError(path, f"got {_show(value)}; CPU must be positive.", "give e.g. cpu: 1.")
    return cores


def parse_memory(value: Any, path: str) -> int:
    """Memory as bytes or a Kubernetes quantity (``512Mi``, ``2Gi``, ``1G``)."""
    match = _QUANTITY.match(str(value)) if isinstance(value, str | int) and not isinstance(value, bool) else None
    if not match or match.group(2) == "m":
        raise SpecError(path, f"got {_show(value)}.", "give a Kubernetes quantity such as 512Mi or 2Gi.")
    amount = float(match.group(1)) * _MEMORY_FACTORS[match.group(2)]
    if amount < 2**20:
        raise SpecError(path, f"got {_show(value)} (= {int(amount)} bytes), below 1Mi.", "give e.g. memory: 1Gi.")
    return int(amount)


def parse_timeout(value: Any, path: str) -> float:
    """A duration in seconds: ``<number><s|m|h>`` (``90s``, ``10m``, ``1.5h``) or a positive number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        seconds = float(match.group(1)) * _DURATION_FACTORS[match.group(2)] if match else math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise SpecError(path, f"got {_show(value)}.", "give a duration such as 10m or 90s.")
    return seconds


@dataclass(frozen=True)
class Resources:
    """Per-candidate budget. ``n_jobs`` inside a candidate is derived from ``cpu``; never -1."""

    cpu: float = 1.0
    memory_bytes: int = 2 * 2**30
    cpu_text: str = "1"
    memory_text: str = "2Gi"
    timeout: float | None = None  # seconds a fold's fit may run (resources.timeout); None: no limit
    timeout_text: str | None = None

    @property
    def n_jobs(self) -> int:
        return max(1, math.floor(self.cpu))

    def to_json(self) -> dict[str, str]:
        """The spec's own spelling; ``timeout`` only when set, so plans of specs without one are unchanged."""
        shown = {"cpu": self.cpu_text, "memory": self.memory_text}
        if self.timeout_text is not None:
            shown["timeout"] = self.timeout_text
        return shown


def parse_resources(value: Any) -> Resources:
    if value is None:
        return Resources()
    if not isinstance(value, Mapping):
        raise SpecError("resources", f"got {_show(value)}.", "write resources: {cpu: 1, memory: 2Gi}.")
    unknown = set(value) - {"cpu", "memory", "timeout"}
    if unknown:
        field = sorted(unknown)[0]
        raise SpecError(
            f"resources.{field}",
            f"unknown field (value {_show(value[field])}).",
            "resources takes cpu, memory and timeout.",
        )
    cpu_value = value.get("cpu", 1)
    memory_value = value.get("memory", "2Gi")
    timeout_value = value.get("timeout")
    return Resources(
        cpu=parse_cpu(cpu_value, "resources.cpu"),
        memory_bytes=parse_memory(memory_value, "resources.memory"),
        cpu_text=str(cpu_value),
        memory_text=str(memory_value),
        timeout=None if timeout_value is None else parse_timeout(timeout_value, "resources.timeout"),
        timeout_text=None if timeout_value is None else duration_text(timeout_value),
    )


def duration_text(value: Any) -> str:
    """A valid ``resources.timeout`` as written (``10m``), a bare number of seconds with its unit (``90s``)."""
    return value if isinstance(value, str) else f"{float(value):g}s"


# --------------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Holdout:
    test_size: float | int = 0.2
    random_state: int | None = None
    stratify: bool | None = None  # None: stratify when the estimator is a classifier


@dataclass(frozen=True)
class SearchSpec:
    """A validated search spec. ``raw`` is the canonical JSON-ready form every fingerprint is taken from."""

    name: str
    data: dict[str, Any]
    estimator: dict[str, Any]
    param_grid: list[dict[str, list[Any]]]
    cv: Any
    scoring: str | list[str] | dict[str, str | dict[str, Any]] | None
    refit: str | bool | dict[str, Any]
    error_score: float | str
    return_train_score: bool
    holdout: Holdout | None
    resources: Resources
    max_fits: int
    backend: str
    policy: Policy = field(default_factory=Policy)
    raw: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=lambda: {"strategy": "grid"})  # strategy + the class's kwargs
    param_distributions: list[dict[str, Any]] = field(default_factory=list)  # random: lists or distribution specs

    @property
    def strategy(self) -> str:
        return str(self.search["strategy"])

    @property
    def allowed(self) -> tuple[str, ...]:
        """The ``_target_`` prefixes this spec was validated with."""
        return self.policy.prefixes

    @property
    def multimetric(self) -> bool:
        return isinstance(self.scoring, list | dict)

    @property
    def metric_names(self) -> list[str]:
        """Score names as in cv_results_ keys: ``score`` for single-metric, else the scorer names."""
        if isinstance(self.scoring, dict):
            return list(self.scoring)
        if isinstance(self.scoring, list):
            return list(self.scoring)
        return ["score"]

    @property
    def refit_metric(self) -> str:
        if isinstance(self.refit, dict):
            return str(self.refit["metric"])
        return self.refit if isinstance(self.refit, str) else "score"

    @property
    def refit_rule(self) -> dict[str, Any] | None:
        """The refit rule mapping (``{metric, rule, simplest}``), or None when the best rank wins."""
        return self.refit if isinstance(self.refit, dict) else None

    @property
    def refit_scorer(self) -> str | dict[str, Any] | None:
        """The scoring entry behind the refit metric: a scorer name, a make_scorer mapping, or None (``score``)."""
        if isinstance(self.scoring, dict):
            return self.scoring[self.refit_metric]
        if isinstance(self.scoring, list):
            return self.refit_metric
        return self.scoring

    @property
    def units(self) -> str:
        """``shared`` (default: warm-start chains run as one unit of work) or ``candidate`` (one per task)."""
        return str(self.raw.get("units") or "shared")

    @property
    def fit_params(self) -> dict[str, str]:
        """Fit parameter (as ``GridSearchCV.fit`` takes it, e.g. ``clf__sample_weight``) -> its data column/array."""
        return dict(self.raw.get("fit_params") or {})

    def fingerprint(self) -> str:
        return content_hash(self.raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def content_hash(value: Any) -> str:
    """SHA-256 of canonical JSON: the same content gives the same key in every process."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


#: What ``json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)`` builds on every
#: call, built once (json.dumps makes a new encoder whenever an option differs from its defaults); it keeps no
#: state between calls.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def load_spec_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or JSON spec file (JSON is YAML, so one parser reads both), bounded in size and depth."""
    text = _read_spec_text(path)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(
            "", f"{path} is not valid YAML/JSON: {_yaml_problem(error)}.", "fix the syntax at the line shown."
        ) from None
    except RecursionError:
        raise SpecError("", f"{path} is nested deeper than the parser can follow.", "flatten the document.") from None
    trust.check_shape(document)
    if not isinstance(document, dict):
        raise SpecError("", f"{path} must hold a mapping, got {_show(document)}.", "see dags/specs/ for examples.")
    return document


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: the parser's problem and where it is (its default text spans several lines)."""
    parts = []
    for text, mark in ((getattr(error, "context", None), getattr(error, "context_mark", None)),
                       (getattr(error, "problem", None), getattr(error, "problem_mark", None))):  # fmt: skip
        if text:
            parts.append(f"{text} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(text))
    return ": ".join(parts) or str(error).splitlines()[0]


def _read_spec_text(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, "rb") as handle:
            payload = handle.read(MAX_SPEC_FILE_BYTES + 1)
    except OSError as error:
        problem = f"cannot read spec file {str(path)!r}: {error.strerror or error}."
        raise SpecError("", problem, "check the path (a YAML or JSON file) and its permissions.") from None
    if len(payload) > MAX_SPEC_FILE_BYTES:
        raise SpecError("", f"{path} is larger than {MAX_SPEC_FILE_BYTES:,} bytes.", "a spec is a short document.")
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(
            "",
            f"{path} is not UTF-8 text (byte {error.start}: {payload[error.start : error.start + 1]!r}).",
            "save the spec as UTF-8 YAML or JSON.",
        ) from None


def parse_spec(
    document: Mapping[str, Any], extra_allowed: Sequence[str] = (), policy: Policy | None = None
) -> SearchSpec:
    """Validate a spec document (already parsed from YAML/JSON, with overrides applied).

    ``policy`` decides what the spec may build (default: :meth:`Policy.from_env` with ``extra_allowed``); a plan
    carries the policy it was validated with, so a worker decides exactly as the planner did.
    """
    if not isinstance(document, Mapping):
        raise SpecError("", f"must be a mapping, got {_show(document)}.", "see dags/specs/ for examples.")
    trust.check_shape(document)
    raw = _json_ready(copy.deepcopy(dict(document)))
    unknown = sorted(set(raw) - _KNOWN_FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], _KNOWN_FIELDS, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SpecError(
            unknown[0],
            f"unknown field (value {_show(raw[unknown[0]])}).",
            f"{hint}known fields are: {', '.join(sorted(_KNOWN_FIELDS))}.",
        )
    allowed = policy or Policy.from_env(extra_allowed)

    name = raw.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise SpecError(
            "name",
            f"got {_show(name)}.",
            "use 1-63 lowercase letters, digits and dashes, e.g. digits-model-family.",
        )

    data = _parse_data(raw.get("data"), allowed)
    estimator = raw.get("estimator")
    if not is_object_spec(estimator):
        raise SpecError(
            "estimator", f"got {_show(estimator)}.", "give an object spec, e.g. {_target_: sklearn.svm.SVC}."
        )
    check(estimator, "estimator", allowed)

    search = _parse_search(raw.get("search"))
    param_grid: list[dict[str, list[Any]]] = []
    param_distributions: list[dict[str, Any]] = []
    if search["strategy"] in SAMPLED_STRATEGIES:
        _refuse_space("param_grid", raw, search["strategy"])
        raw.pop("param_grid", None)  # absent or null
        param_distributions = _parse_param_distributions(raw.get("param_distributions"), allowed)
        raw.update(search=search, param_distributions=param_distributions)
    else:
        _refuse_space("param_distributions", raw, search["strategy"])
        raw.pop("param_distributions", None)
        param_grid = _parse_param_grid(raw.get("param_grid"), allowed)
        raw["param_grid"] = param_grid
        if search["strategy"] != "grid":  # with its defaults filled in, so equal searches fingerprint equally
            raw["search"] = search
    cv = _parse_cv(raw.get("cv", 5), allowed)
    scoring = _parse_scoring(raw.get("scoring"), allowed)
    refit = _parse_refit(raw.get("refit"), scoring, _grid_values(param_grid, raw.get("param_distributions")))
    error_score = _parse_error_score(raw.get("error_score", math.nan))
    if search["strategy"] in HALVING_STRATEGIES:
        _check_halving_metric(scoring, raw.get("refit"))
    # The class's own default: Halving*SearchCV return train scores unless told not to; the others do not.
    return_train_score = raw.get("return_train_score", search["strategy"] in HALVING_STRATEGIES)
    if not isinstance(return_train_score, bool):
        raise SpecError("return_train_score", f"got {_show(return_train_score)}.", "write true or false.")
    holdout = _parse_holdout(raw.get("holdout"))
    _check_data_columns(data, raw.get("fit_params"), holdout)
    resources = parse_resources(raw.get("resources"))
    max_fits = _parse_limits(raw.get("limits"))
    if raw.get("units") not in (None, "shared", "candidate"):
        raise SpecError(
            "units",
            f"got {_show(raw['units'])}.",
            "write shared (candidates that share work run together) or candidate (one candidate per task).",
        )
    backend = raw.get("backend", "local")
    if backend not in ("local", "kubernetes"):
        raise SpecError("backend", f"got {_show(backend)}.", "write local or kubernetes.")

    return SearchSpec(
        name=name,
        data=data,
        estimator=estimator,
        param_grid=param_grid,
        cv=cv,
        scoring=scoring,
        refit=refit,
        error_score=error_score,
        return_train_score=return_train_score,
        holdout=holdout,
        resources=resources,
        max_fits=max_fits,
        backend=backend,
        policy=allowed,
        raw=raw,
        search=search,
        param_distributions=param_distributions,
    )


def _json_ready(value: Any) -> Any:
    """Tuples become lists so that the canonical form and fingerprints do not depend on the file format."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _parse_data(value: Any, allowed: Policy) -> dict[str, Any]:
    if is_object_spec(value):
        check(value, "data", allowed, role="data")
        return dict(value)
    if isinstance(value, Mapping) and "path" in value:
        unknown = sorted(set(value) - {"path", "target", "format", "columns", "groups"})
        if unknown:
            raise SpecError(
                f"data.{unknown[0]}",
                f"unknown field (value {_show(value[unknown[0]])}).",
                "data takes path, target, format and columns, and optionally groups.",
            )
        if not isinstance(value["path"], str) or not value["path"]:
            raise SpecError("data.path", f"got {_show(value['path'])}.", "give a file path or fsspec URL.")
        fmt = value.get("format") or _format_from_path(value["path"])
        if fmt not in ("csv", "parquet", "npz"):
            problem = f"got {_show(fmt)}." if value.get("format") else f"cannot tell the format of {value['path']!r}."
            raise SpecError("data.format", problem, "write format: csv, parquet or npz (or use a path ending so).")
        if fmt in ("csv", "parquet") and not isinstance(value.get("target"), str):
            raise SpecError(
                "data.target",
                f"got {_show(value.get('target'))}.",
                "name the column holding y, e.g. target: label.",
            )
        return {**value, "format": fmt}
    raise SpecError(
        "data",
        f"got {_show(value)}.",
        "give an object spec returning (X, y), e.g. {_target_: sklearn.datasets.load_iris, return_X_y: true}, "
        "or {path: data.parquet, target: label}.",
    )


def _check_data_columns(data: dict[str, Any], fit_params: Any, holdout: Holdout | None) -> None:
    """``data.groups`` and ``fit_params`` name columns (arrays in an npz) of a data file, never X or y."""
    groups = data.get("groups")
    if groups is not None and (not isinstance(groups, str) or not groups):
        raise SpecError("data.groups", f"got {_show(groups)}.", "name the column (npz: the array) holding the groups.")
    if groups is not None and holdout is not None and holdout.stratify:
        raise SpecError(
            "holdout.stratify",
            f"got true with data.groups {groups!r}.",
            "remove stratify: a holdout with groups keeps each group on one side (GroupShuffleSplit), unstratified.",
        )
    if fit_params is None:
        return
    if not isinstance(fit_params, Mapping) or not fit_params:
        raise SpecError("fit_params", f"got {_show(fit_params)}.", "write e.g. fit_params: {clf__sample_weight: w}.")
    if "path" not in data:
        raise SpecError(
            "fit_params",
            f"got {_show(fit_params)} with data from an object spec.",
            "use data: {path: ..., target: ...}.",
        )
    for name, column in fit_params.items():
        if not isinstance(column, str) or not column:
            raise SpecError(f"fit_params.{name}", f"got {_show(column)}.", "name the column (npz: the array).")
        if column in (data.get("target"), groups):
            raise SpecError(f"fit_params.{name}", f"got {column!r}, the target or groups.", "name another column.")


def _format_from_path(path: str) -> str | None:
    for suffix in ("csv", "parquet", "npz"):
        if path.endswith(f".{suffix}"):
            return suffix
    return None


def _search_space(value: Any, field: str, item_fix: str, problem: str, fix: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(field path, mapping) pairs of a search space given, as sklearn takes it, as a mapping or a list of them."""
    if isinstance(value, Mapping):
        return [(field, value)]
    if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
        return [(f"{field}[{index}]", mapping) for index, mapping in enumerate(value)]
    if isinstance(value, list) and value:
        index, item = next((i, m) for i, m in enumerate(value) if not isinstance(m, Mapping))
        raise SpecError(
            f"{field}[{index}]", f"got {_show(item)}; each item of a {field} list must be a mapping.", item_fix
        )
    raise SpecError(field, problem, fix)


def _check_values(param: str, values: list[Any], path: str, allowed: Policy) -> None:
    """A parameter's list of values (a grid's, or a sampled list): not empty, each value within the policy."""
    if not values:
        raise SpecError(path, "got an empty list.", "give at least one value.")
    for position, item in enumerate(values):
        trust.check_parameter(param, item, f"{path}[{position}]", allowed)
    check(values, path, allowed)


def _parse_param_grid(value: Any, allowed: Policy) -> list[dict[str, list[Any]]]:
    """sklearn's grid semantics: a mapping or a list of mappings of non-empty lists."""
    checked: list[dict[str, list[Any]]] = []
    for prefix, grid in _search_space(
        value,
        "param_grid",
        "write each item as {parameter: [values, ...]}.",
        f"got {_show(value)}.",
        "give a mapping of parameter name to a list of values, or a list of such mappings.",
    ):
        for param, values in grid.items():
            path = f"{prefix}.{param}"
            if not isinstance(values, list):
                raise SpecError(
                    path,
                    f"got {_show(values)} ({type(values).__name__}); each parameter needs a list of values.",
                    f"single values need to be wrapped in a list with one element: [{_show(values)}].",
                )
            _check_values(str(param), values, path, allowed)
        checked.append(dict(grid))
    return checked


SEARCH_STRATEGIES: dict[str, dict[str, Any]] = {  # each scikit-learn class's own keyword arguments, its defaults
    "grid": {},
    "random": {"n_iter": 10, "random_state": None},
    "halving_grid": {
        "factor": 3,
        "resource": "n_samples",
        "max_resources": "auto",
        "min_resources": "exhaust",
        "aggressive_elimination": False,
        "random_state": None,
    },
    "halving_random": {
        "n_candidates": "exhaust",
        "factor": 3,
        "resource": "n_samples",
        "max_resources": "auto",
        "min_resources": "smallest",
        "aggressive_elimination": False,
        "random_state": None,
    },
}
SEARCH_CLASSES = {
    "grid": "GridSearchCV",
    "random": "RandomizedSearchCV",
    "halving_grid": "HalvingGridSearchCV",
    "halving_random": "HalvingRandomSearchCV",
}
SAMPLED_STRATEGIES = ("random", "halving_random")  # search param_distributions; the others param_grid
HALVING_STRATEGIES = ("halving_grid", "halving_random")
_SEARCH_EXAMPLE = "search: {strategy: random, n_iter: 20, random_state: 0}"
_MAX_SEED = 2**32 - 1  # numpy's RandomState(seed) range


def _parse_search(value: Any) -> dict[str, Any]:
    """``search``: the strategy (sklearn class) and that class's own keyword arguments, with its defaults."""
    if value is None:
        return {"strategy": "grid"}
    if not isinstance(value, Mapping):
        raise SpecError("search", f"got {_show(value)}.", f"write {_SEARCH_EXAMPLE}, or omit search for a grid.")
    strategy = value.get("strategy", "grid")
    if strategy not in SEARCH_STRATEGIES:
        classes = ", ".join(f"{name}: {cls}" for name, cls in SEARCH_CLASSES.items())
        raise SpecError(
            "search.strategy", f"got {_show(strategy)}.", f"write one of {', '.join(SEARCH_STRATEGIES)} ({classes})."
        )
    defaults = SEARCH_STRATEGIES[strategy]
    unknown = sorted(set(value) - {"strategy", *defaults})
    if unknown:
        takes = f"takes {', '.join(defaults)}" if defaults else "takes no other keys"
        raise SpecError(
            f"search.{unknown[0]}",
            f"unknown key for strategy {strategy} (value {_show(value[unknown[0]])}).",
            f"search with strategy {strategy} ({SEARCH_CLASSES[strategy]}) {takes}.",
        )
    search = {"strategy": strategy, **defaults, **{k: v for k, v in value.items() if k != "strategy"}}
    if strategy == "random":
        _positive_int(search, "n_iter", "n_iter: 20")
    if strategy in HALVING_STRATEGIES:
        _check_halving(search)
    if "random_state" in search:
        _check_seed(search)
    return search


def _positive_int(search: Mapping[str, Any], key: str, example: str, *alternatives: str) -> None:
    value = search[key]
    if value in alternatives and isinstance(value, str):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        options = "".join(f" or {alternative!r}" for alternative in alternatives)
        raise SpecError(f"search.{key}", f"got {_show(value)}.", f"give a positive integer{options}, e.g. {example}.")


def _check_halving(search: dict[str, Any]) -> None:
    """The successive-halving keywords, with scikit-learn's own constraints (factor must also exceed 1 here)."""
    factor = search["factor"]
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor) or factor <= 1:
        raise SpecError(
            "search.factor",
            f"got {_show(factor)}; each round keeps 1/factor of the candidates, so it must be a number above 1.",
            "give e.g. factor: 3 (scikit-learn's default) or 2.",
        )
    resource = search["resource"]
    if not isinstance(resource, str) or not resource:
        raise SpecError(
            "search.resource",
            f"got {_show(resource)}.",
            "write n_samples, or an estimator parameter such as clf__n_estimators.",
        )
    _positive_int(search, "max_resources", "max_resources: 1000", "auto")
    _positive_int(search, "min_resources", "min_resources: 20", "exhaust", "smallest")
    if "n_candidates" in search:
        _positive_int(search, "n_candidates", "n_candidates: 64", "exhaust")
        if search["n_candidates"] == "exhaust" and search["min_resources"] == "exhaust":
            raise SpecError(
                "search.n_candidates",
                "got 'exhaust' with min_resources 'exhaust': each needs the other (scikit-learn refuses it).",
                "give n_candidates as a number, or min_resources: smallest.",
            )
    if not isinstance(search["aggressive_elimination"], bool):
        raise SpecError(
            "search.aggressive_elimination", f"got {_show(search['aggressive_elimination'])}.", "write true or false."
        )
    if search["max_resources"] == "auto" and resource != "n_samples":
        raise SpecError(
            "search.max_resources",
            f"got 'auto' with resource {resource!r}: only n_samples has a size the data can tell.",
            f"give the largest {resource} to reach, e.g. max_resources: 100.",
        )


def _check_seed(search: dict[str, Any]) -> None:
    """A seed is required where it decides candidates or sub-samples: the plan must be reproducible."""
    seed = search["random_state"]
    needed = search["strategy"] in SAMPLED_STRATEGIES or search.get("resource") == "n_samples"
    if seed is None and needed:
        what = "sample other candidates" if search["strategy"] in SAMPLED_STRATEGIES else "draw other sub-samples"
        raise SpecError(
            "search.random_state",
            f"is missing; without it every process would {what}, so the plan could not be "
            "reproduced (scikit-learn allows None; a study here may not).",
            f"give an integer seed, e.g. {_SEARCH_EXAMPLE if search['strategy'] == 'random' else 'random_state: 0'}.",
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED):
        raise SpecError("search.random_state", f"got {_show(seed)}.", f"give an integer in [0, {_MAX_SEED}].")


def _check_halving_metric(scoring: Any, refit: Any) -> None:
    """Successive halving ranks each round by one score, as scikit-learn's Halving*SearchCV (no multi-metric)."""
    if isinstance(scoring, list | dict):
        raise SpecError(
            "scoring",
            f"got {_show(scoring)}; successive halving keeps each round's best by one metric (scikit-learn's "
            "Halving*SearchCV refuse multi-metric scoring).",
            "give one scorer name, e.g. scoring: accuracy.",
        )
    if isinstance(refit, Mapping):
        raise SpecError(
            "refit",
            f"got {_show(refit)}; successive halving's winner is the best candidate of the last round.",
            "omit refit (or use search strategy grid or random for a refit rule).",
        )


def _refuse_space(name: str, raw: Mapping[str, Any], strategy: str) -> None:
    """param_grid belongs to the grid strategy, param_distributions to random: never both, never crossed."""
    if raw.get(name) is None:  # absent, or null (a form's empty field)
        return
    other = "param_distributions" if name == "param_grid" else "param_grid"
    fix = (
        "rename it to param_distributions (lists are sampled uniformly) or omit search for a grid."
        if name == "param_grid"
        else f"set {_SEARCH_EXAMPLE} to sample it, or rename it to param_grid."
    )
    raise SpecError(
        name,
        f"is not used by search strategy {strategy}, which searches {other} "
        f"(value {_show(raw[name])}); param_grid and param_distributions are mutually exclusive.",
        fix,
    )


def _parse_param_distributions(value: Any, allowed: Policy) -> list[dict[str, Any]]:
    """sklearn's ParameterSampler semantics: a mapping or a list of mappings of lists or scipy.stats distributions."""
    example = "{clf__C: {_target_: scipy.stats.loguniform, a: 0.001, b: 1000}, clf__kernel: [rbf, poly]}"
    checked: list[dict[str, Any]] = []
    for prefix, mapping in _search_space(
        value,
        "param_distributions",
        f"write each item as {example}.",
        f"got {_show(value)}." if value is not None else "is missing (search strategy random samples it).",
        f"give a mapping of parameter name to a list or a scipy.stats distribution, e.g. {example}.",
    ):
        if not mapping:
            raise SpecError(prefix, "got an empty mapping: nothing to sample.", f"name parameters, e.g. {example}.")
        for param, values in mapping.items():
            path = f"{prefix}.{param}"
            if is_object_spec(values):
                check(values, path, allowed)
                if not hasattr(trust.resolve(values[TARGET_KEY], f"{path}._target_", allowed), "rvs"):
                    raise SpecError(
                        f"{path}._target_",
                        f"got {_show(values[TARGET_KEY])}, which is not a distribution (it has no rvs method).",
                        "use a scipy.stats distribution, e.g. {_target_: scipy.stats.loguniform, a: 0.001, b: 1000}, "
                        "or a list of values.",
                    )
                continue
            if not isinstance(values, list):
                raise SpecError(
                    path,
                    f"got {_show(values)} ({type(values).__name__}); each parameter needs a list of values or a "
                    "scipy.stats distribution.",
                    f"wrap a single value in a list: [{_show(values)}], or give {{_target_: scipy.stats...}}.",
                )
            _check_values(str(param), values, path, allowed)
        checked.append(dict(mapping))
    return checked


def _parse_cv(value: Any, allowed: Policy) -> Any:
    if isinstance(value, bool) or not (isinstance(value, int) or is_object_spec(value)):
        raise SpecError(
            "cv",
            f"got {_show(value)}.",
            "give a number of folds (>= 2) or a splitter, e.g. {_target_: sklearn.model_selection.KFold, "
            "n_splits: 5, shuffle: true, random_state: 0}.",
        )
    if isinstance(value, int) and value < 2:
        raise SpecError("cv", f"got {value}; cross-validation needs at least 2 folds.", "write cv: 5.")
    if is_object_spec(value):
        check(value, "cv", allowed)
    return value


def _parse_scoring(value: Any, allowed: Policy) -> str | list[str] | dict[str, str | dict[str, Any]] | None:
    from sklearn.metrics import get_scorer_names  # local: the spec module stays cheap to import

    from airflow_grid import scoring_spec

    names = set(get_scorer_names())

    def check(name: Any, path: str) -> str:
        if not isinstance(name, str) or name not in names:
            close = _close_names(name, names) if isinstance(name, str) else []
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise SpecError(
                path,
                f"unknown scorer {_show(name)}.{hint}",
                "use a name from sklearn.metrics.get_scorer_names(), e.g. accuracy, f1_macro, r2.",
            )
        return name

    if value is None:
        return None
    if isinstance(value, str):
        return check(value, "scoring")
    if isinstance(value, list) and value:
        if len(set(map(str, value))) != len(value):
            raise SpecError("scoring", f"got duplicates in {_show(value)}.", "list each scorer once.")
        return [check(name, f"scoring[{i}]") for i, name in enumerate(value)]
    if scoring_spec.is_make_scorer(value):
        raise SpecError(
            "scoring",
            f"got {_show(value)}: a make_scorer entry needs a metric name.",
            f"name it, e.g. scoring: {{f2: {{make_scorer: {value['make_scorer']}, ...}}}}, and refit by that name.",
        )
    if isinstance(value, Mapping) and value:
        return {
            str(key): scoring_spec.parse_entry(entry, f"scoring.{key}", allowed)
            if scoring_spec.is_make_scorer(entry)
            else check(entry, f"scoring.{key}")
            for key, entry in value.items()
        }
    raise SpecError(
        "scoring",
        f"got {_show(value)}.",
        "give a scorer name, a list of names, or a mapping {metric: scorer-name or {make_scorer: fbeta_score, ...}}.",
    )


def _close_names(name: str, names: set[str], limit: int = 4) -> list[str]:
    """Suggestions for a misspelt scorer: same prefix first, then similar spellings, then substrings."""
    ranked = [
        *sorted(n for n in names if n.startswith(name)),
        *difflib.get_close_matches(name, sorted(names), n=limit, cutoff=0.6),
        *sorted(n for n in names if name in n or n in name),
    ]
    return list(dict.fromkeys(ranked))[:limit]


def _parse_refit(
    value: Any, scoring: str | list[str] | dict[str, Any] | None, grid_values: dict[str, list[Any] | None]
) -> str | bool | dict[str, Any]:
    if isinstance(value, Mapping):
        return _parse_refit_rule(value, scoring, grid_values)
    if not isinstance(scoring, list | dict):
        if value in (None, True):
            return True
        if isinstance(value, str) and value in (scoring, "score"):
            return True
        raise SpecError(
            "refit",
            f"got {_show(value)} with a single metric.",
            "omit refit (the single metric ranks candidates).",
        )
    metrics = list(scoring)
    if value not in metrics:
        raise SpecError(
            "refit",
            f"got {_show(value)}; with several metrics, refit must name the one that picks the winner.",
            f"write refit: one of {metrics}.",
        )
    return str(value)


REFIT_RULES = ("one_standard_error",)
_RULE_EXAMPLE = "refit: {metric: acc, rule: one_standard_error, simplest: {param: clf__C, order: ascending}}"


def _parse_refit_rule(
    value: Mapping[str, Any], scoring: str | list[str] | dict[str, Any] | None, grid_values: dict[str, Any]
) -> dict[str, Any]:
    """``{metric, rule, simplest: {param, order}}``, normalised (``metric`` as in cv_results_ keys)."""
    for known, path in ((("metric", "rule", "simplest"), "refit"), (("param", "order"), "refit.simplest")):
        mapping = value if path == "refit" else value.get("simplest")
        unknown = sorted(set(mapping) - set(known)) if isinstance(mapping, Mapping) else []
        if unknown:
            raise SpecError(
                f"{path}.{unknown[0]}",
                f"unknown field (value {_show(mapping[unknown[0]])}).",  # type: ignore[index]
                f"{path} takes {', '.join(known)}, e.g. {_RULE_EXAMPLE}.",
            )
    metric = value.get("metric")
    if isinstance(scoring, list | dict):
        if metric not in list(scoring):
            raise SpecError(
                "refit.metric", f"got {_show(metric)}.", f"name the metric the rule uses: one of {list(scoring)}."
            )
    elif metric in (None, "score", scoring):
        metric = "score"
    else:
        raise SpecError("refit.metric", f"got {_show(metric)} with a single metric.", "omit refit.metric.")
    if value.get("rule") not in REFIT_RULES:
        raise SpecError("refit.rule", f"got {_show(value.get('rule'))}.", f"write rule: {' or '.join(REFIT_RULES)}.")
    simplest = value.get("simplest")
    if not isinstance(simplest, Mapping):
        raise SpecError("refit.simplest", f"got {_show(simplest)}.", f"name the parameter to prefer: {_RULE_EXAMPLE}.")
    param, order = simplest.get("param"), simplest.get("order", "ascending")
    if not isinstance(param, str) or param not in grid_values:
        close = difflib.get_close_matches(str(param), list(grid_values), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise SpecError(
            "refit.simplest.param",
            f"got {_show(param)}, which is not a searched parameter.",
            f"{hint}name one of {sorted(grid_values)}.",
        )
    values = [v for v in grid_values[param] or [] if v is not None]
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not (numbers or all(isinstance(v, str) for v in values)):
        raise SpecError(
            "refit.simplest.param",
            f"{param} has values {_show(values)}, which have no order.",
            "pick a parameter whose values are all numbers or all strings (null sorts last).",
        )
    if order not in ("ascending", "descending"):
        raise SpecError("refit.simplest.order", f"got {_show(order)}.", "write ascending or descending.")
    return {"metric": metric, "rule": value["rule"], "simplest": {"param": param, "order": order}}


def _grid_values(param_grid: list[dict[str, list[Any]]], distributions: Any) -> dict[str, list[Any] | None]:
    """Every searched parameter and its listed values (None: sampled from a distribution, not listed)."""
    found: dict[str, list[Any] | None] = {}
    grids = distributions if isinstance(distributions, list) else [distributions] if distributions else []
    for grid in [*param_grid, *grids]:
        for name, values in grid.items() if isinstance(grid, Mapping) else ():
            if isinstance(values, list) and found.get(name, []) is not None:
                found[name] = [*(found.get(name) or []), *values]
            else:
                found[name] = None
    return found


def _parse_error_score(value: Any) -> float | str:
    if value == "raise":
        return "raise"
    if isinstance(value, str) and value.lower() in ("nan", ".nan"):
        return math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise SpecError("error_score", f"got {_show(value)}.", "write a number (e.g. .nan or 0) or 'raise'.")


def _parse_holdout(value: Any) -> Holdout | None:
    if value is None or value is False:
        return None
    if not isinstance(value, Mapping):
        raise SpecError("holdout", f"got {_show(value)}.", "write holdout: {test_size: 0.2, random_state: 42}.")
    unknown = sorted(set(value) - {"test_size", "random_state", "stratify"})
    if unknown:
        raise SpecError(
            f"holdout.{unknown[0]}",
            f"unknown field (value {_show(value[unknown[0]])}).",
            "holdout takes test_size, random_state, stratify.",
        )
    test_size = value.get("test_size", 0.2)
    valid_fraction = isinstance(test_size, float) and 0 < test_size < 1
    valid_count = isinstance(test_size, int) and not isinstance(test_size, bool) and test_size >= 1
    if not (valid_fraction or valid_count):
        raise SpecError(
            "holdout.test_size", f"got {_show(test_size)}.", "give a fraction in (0, 1) or a number of rows."
        )
    random_state = value.get("random_state")
    if random_state is not None and (isinstance(random_state, bool) or not isinstance(random_state, int)):
        raise SpecError(
            "holdout.random_state",
            f"got {_show(random_state)}.",
            "give an integer so the split is the same everywhere.",
        )
    stratify = value.get("stratify")
    if stratify is not None and not isinstance(stratify, bool):
        raise SpecError("holdout.stratify", f"got {_show(stratify)}.", "write true or false.")
    return Holdout(test_size=test_size, random_state=random_state, stratify=stratify)


def _parse_limits(value: Any) -> int:
    if value is None:
        return DEFAULT_MAX_FITS
    if not isinstance(value, Mapping) or set(value) - {"max_fits"}:
        raise SpecError("limits", f"got {_show(value)}.", "write limits: {max_fits: 5000}.")
    max_fits = value.get("max_fits", DEFAULT_MAX_FITS)
    if isinstance(max_fits, bool) or not isinstance(max_fits, int) or max_fits < 1:
        raise SpecError("limits.max_fits", f"got {_show(max_fits)}.", "give a positive integer.")
    trust.check_max_fits(max_fits)
    return max_fits
