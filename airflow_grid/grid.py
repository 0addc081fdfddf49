"""Expand a spec's param_grid into candidates, in scikit-learn's ParameterGrid order.

The grid is expanded on the spec's JSON values (object specs stay mappings) with sklearn's own ParameterGrid, so
candidate order is exactly GridSearchCV's; each candidate is then built once at plan time to prove its parameters
exist on the estimator before any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.model_selection import ParameterGrid, ParameterSampler

from airflow_grid import versions as library_versions
from airflow_grid.spec import (
    SAMPLED_STRATEGIES,
    TARGET_KEY,
    SearchSpec,
    SpecError,
    build,
    canonical_json,
    is_object_spec,
)


@dataclass(frozen=True)
class Candidate:
    """One point of the grid: its position in sklearn's order, its JSON-ready params and a readable label."""

    index: int
    params: dict[str, Any]
    label: str

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "params": self.params, "label": self.label}


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a step builds or parses 100,000s of candidate dicts (which hold no
    cycles): the collections their allocation triggers walk every live object, a quarter of planning's time.

    Reference counting frees memory as usual; the collector's previous state is restored on exit.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@collector_paused()
def expand(spec: SearchSpec, n_sampled: int | None = None) -> list[Candidate]:
    """Candidates in ParameterGrid order (keys sorted within each grid, grids in list order); for the sampled
    strategies, ParameterSampler's candidates in its order (``n_sampled`` of them when the data decided it)."""
    if spec.strategy in SAMPLED_STRATEGIES:
        sampled = sample(spec, n_sampled)
        return [Candidate(index=i, params=params, label=candidate_label(params)) for i, params in enumerate(sampled)]
    try:
        grid = ParameterGrid(spec.param_grid)
    except (TypeError, ValueError) as error:  # sklearn's own message names the parameter and the fix
        raise SpecError("param_grid", str(error)) from error
    return [Candidate(index=i, params=dict(params), label=candidate_label(params)) for i, params in enumerate(grid)]


def build_estimator(spec: SearchSpec, params: dict[str, Any] | None = None) -> BaseEstimator:
    """The spec's estimator with a candidate's params set, exactly as GridSearchCV sets them."""
    estimator = build(spec.estimator, "estimator", spec.policy)
    if not params:
        return estimator
    built = {name: build(value, f"param_grid.{name}", spec.policy) for name, value in params.items()}
    return clone(estimator).set_params(**clone(built, safe=False))


_INVALID_PARAMETER = re.compile(r"Invalid parameter '([^']+)'")
_INVALID_VALUE = re.compile(r"The '([^']+)' parameter of (\w+) must be")


def check_candidates(spec: SearchSpec, candidates: list[Candidate]) -> None:
    """Set every candidate's params on a clone of the estimator and validate the values, at plan time.

    Unknown parameter names and values scikit-learn's own parameter validation refuses (``max_depth: deep``,
    ``criterion: bogus``, malformed pipeline steps) fail here, before any task runs, naming the candidate, the
    parameter with its value and the param_grid mapping it comes from.
    """
    base = build_estimator(spec)
    try:
        validate_values(base, params=False)  # the estimator's structure, before any candidate's values
    except Exception as error:
        raise SpecError(
            "estimator", f"{type(error).__name__}: {error}", "give pipeline steps as [name, {_target_: ...}] pairs."
        ) from None
    checked: set[tuple[str, str, str, Any]] = set()
    for candidate in candidates:
        if not _news(candidate.params, checked):
            continue  # every (structure, parameter, value) of it was validated on an earlier candidate
        prefix = _grid_path(spec, candidate.index, candidate.params)
        built = {name: build(value, f"{prefix}.{name}", spec.policy) for name, value in candidate.params.items()}
        try:
            estimator = clone(base).set_params(**clone(built, safe=False))
        except Exception as error:
            match = _INVALID_PARAMETER.search(str(error))
            raise _candidate_error(spec, candidate, prefix, match[1] if match else None, "cannot set", error) from None
        try:
            validate_values(estimator)
        except Exception as error:
            match = _INVALID_VALUE.search(str(error))
            raise _candidate_error(spec, candidate, prefix, match[1] if match else None, "has", error) from None


def _news(params: Mapping[str, Any], checked: set[tuple[str, str, str, Any]]) -> bool:
    """Record the candidate's (structure, parameter, value) triples; True if any is new.

    scikit-learn validates each parameter on its own against the estimator that owns it, and which estimator owns
    it is decided by the structure: the object-valued parameters (a swapped step, a kernel) and list/mapping values.
    So a scalar value valid in one candidate is valid in every candidate of the same structure, and a grid of
    100,000 candidates is validated in as many candidates as it has distinct values. The first candidate to bring
    a bad value is the one checked, so the error names the same candidate as checking them all would.
    """
    shaped = {k: v for k, v in params.items() if type(v) not in _PLAIN and isinstance(v, Mapping | list)}
    structure = canonical_json(shaped) if shaped else ""
    triples = {(structure, name, type(value).__name__, _hashable(value)) for name, value in params.items()}
    triples = triples or {(structure, "", "", "")}
    new = not triples <= checked
    checked.update(triples)
    return new


def _hashable(value: Any) -> Any:
    return value if type(value) in _PLAIN or not isinstance(value, Mapping | list) else canonical_json(value)


def _candidate_error(
    spec: SearchSpec, candidate: Candidate, prefix: str, name: str | None, verb: str, error: Exception
) -> SpecError:
    bad = next((n for n in sorted(candidate.params) if name and n.rsplit("__", 1)[-1] == name), None)
    setting = f" {bad}={_show_param(candidate.params[bad])}" if bad else ""
    where = f"{prefix}.{bad}" if bad else ("estimator" if name or not candidate.params else prefix)
    if verb == "cannot set":
        problem = f"candidate {candidate.index} ({candidate.label}) cannot set{setting} on the estimator: {error}"
        fix = (
            "use parameter names the estimator has (step__param for pipeline steps); "
            "estimator.get_params().keys() lists them."
        )
    else:
        problem = f"candidate {candidate.index} ({candidate.label}) has an invalid value{setting}: {error}"
        fix = "use a value scikit-learn accepts for that parameter (its docstring lists them)."
    return SpecError(where, problem, fix)


def validate_values(estimator: Any, *, params: bool = True) -> None:
    """scikit-learn's own parameter validation, run now rather than at fit, on every estimator in the tree.

    Uses each estimator's ``_validate_params`` (the check ``fit`` runs first) and the composition checks of
    Pipeline, FeatureUnion and ColumnTransformer, so what fit would refuse for its parameters alone is refused
    at plan. Data-dependent checks (``n_components`` > features) stay at fit, as failed fits.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    for obj in _estimators(estimator):
        if params and hasattr(obj, "_parameter_constraints") and callable(getattr(obj, "_validate_params", None)):
            obj._validate_params()
        if isinstance(obj, Pipeline):
            if not obj.steps:
                raise ValueError("The pipeline has no steps.")
            obj._validate_steps()
        elif isinstance(obj, FeatureUnion | ColumnTransformer):
            obj._validate_transformers()


def _estimators(root: Any) -> list[Any]:
    """Every estimator reachable from ``root`` through its parameters (steps, transformers, inner estimators)."""
    found: list[Any] = []
    stack = [root]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, BaseEstimator):
            found.append(value)
            stack.extend(value.get_params(deep=False).values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
        elif isinstance(value, Mapping):
            stack.extend(value.values())
    return found


def count_candidates(spec: SearchSpec) -> int | None:
    """How many candidates the grid holds, by arithmetic: nothing is expanded or built.

    Random: ``n_iter``, or the grid size when every value is a list and the grid is smaller (ParameterSampler then
    samples without replacement and yields ``min(n_iter, grid size)``); halving_random: ``n_candidates`` likewise,
    or None with ``n_candidates: exhaust`` (the data decides: see :func:`airflow_grid.halving.first_round_size`).
    """
    if spec.strategy in SAMPLED_STRATEGIES:
        n_iter = _n_sampled(spec)
        if n_iter is None:
            return None
        if any(is_object_spec(v) for mapping in spec.param_distributions for v in mapping.values()):
            return n_iter
        return min(n_iter, sum(math.prod(len(v) for v in mapping.values()) for mapping in spec.param_distributions))
    return sum(math.prod(len(values) for values in mapping.values()) for mapping in spec.param_grid)


def _n_sampled(spec: SearchSpec) -> int | None:
    """How many candidates the sampler draws: ``n_iter`` (random) or ``n_candidates`` (halving_random)."""
    value = spec.search["n_iter" if spec.strategy == "random" else "n_candidates"]
    return None if value == "exhaust" else int(value)


def sample(spec: SearchSpec, n_sampled: int | None = None) -> list[dict[str, Any]]:
    """Exactly ``ParameterSampler(param_distributions, n_iter, random_state=...)``'s candidates, in its order.

    Distributions are built (through the policy); lists stay JSON values, so object specs in them stay mappings as
    in grid candidates; sampled numpy scalars become Python int/float, so JSON and keys are stable.
    """
    distributions = [
        {
            name: build(value, f"{_mapping_path(spec, index)}.{name}", spec.policy) if is_object_spec(value) else value
            for name, value in mapping.items()
        }
        for index, mapping in enumerate(spec.param_distributions)
    ]
    n_iter = n_sampled if n_sampled is not None else _n_sampled(spec)
    sampler = ParameterSampler(distributions, int(n_iter or 0), random_state=spec.search["random_state"])
    with warnings.catch_warnings():  # "smaller than n_iter": counted and reported by the budget guard already
        warnings.simplefilter("ignore", UserWarning)
        return [{name: _plain(value) for name, value in params.items()} for params in sampler]


def _plain(value: Any) -> Any:
    """A sampled numpy scalar as the Python number with the same value (``float64.item()`` is exact)."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def _mapping_path(spec: SearchSpec, index: int) -> str:
    return "param_distributions" if len(spec.param_distributions) == 1 else f"param_distributions[{index}]"


def min_splits(spec: SearchSpec) -> int:
    """The fold count when known without data (an int, or a splitter that can tell), else the minimum, 2."""
    if isinstance(spec.cv, int):
        return spec.cv
    try:
        n_splits = build(spec.cv, "cv", spec.policy).get_n_splits()
    except Exception:  # splitters such as LeaveOneOut need the data: the exact check runs after the folds
        return 2
    return n_splits if isinstance(n_splits, int) and n_splits >= 2 else 2


def _grid_path(spec: SearchSpec, index: int, params: Mapping[str, Any] | None = None) -> str:
    """``param_grid[i]`` for the mapping candidate ``index`` comes from (ParameterGrid walks them in order)."""
    if spec.strategy in SAMPLED_STRATEGIES:  # sampled: the first mapping with the candidate's parameter names
        names = set(params or ())
        position = next((i for i, m in enumerate(spec.param_distributions) if set(m) == names), 0)
        return _mapping_path(spec, position)
    if len(spec.param_grid) == 1:
        return "param_grid"
    end = 0
    for position, mapping in enumerate(spec.param_grid):
        end += math.prod(len(values) for values in mapping.values())
        if index < end:
            return f"param_grid[{position}]"
    return "param_grid"


def _show_param(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def count_fits(n_candidates: int, n_splits: int) -> int:
    return n_candidates * n_splits


def check_budget(spec: SearchSpec, n_candidates: int, n_splits: int, rounds: int = 1) -> int:
    """The budget guard: refuse a grid whose fit count exceeds limits.max_fits, with the count.

    ``n_candidates`` counts cv_results_ rows: with successive halving, every round's candidates.
    """
    n_fits = count_fits(n_candidates, n_splits)
    if n_fits > spec.max_fits:
        shrink = {"random": "lower search.n_iter", "halving_random": "lower search.n_candidates"}
        counted = f"{n_candidates:,} candidates" if rounds == 1 else f"{n_candidates:,} candidates over {rounds} rounds"
        raise SpecError(
            "limits.max_fits",
            f"the grid has {counted} x {n_splits} folds = {n_fits:,} fits, more than max_fits={spec.max_fits:,}.",
            f"{shrink.get(spec.strategy, 'shrink param_grid')} or cv, or raise limits.max_fits if the cluster can "
            "afford it.",
        )
    return n_fits


def candidate_key(
    spec: SearchSpec,
    params: dict[str, Any],
    folds_hash: str,
    data_fingerprint: str,
    versions: Mapping[str, str],
    result_format: int | None = None,
) -> str:
    """Content hash of everything that decides a candidate's scores; equal keys mean reusable results.

    ``versions`` (:func:`airflow_grid.versions.runtime_versions`) and the result format are in it, so a library
    upgrade or a new result layout never serves an old result. ``resources.timeout`` can turn a score into
    error_score, so it is in the key, but only when set: keys of specs without a timeout are unchanged.
    """
    return key_maker(spec, folds_hash, data_fingerprint, versions, result_format)(params)


_PARAMS_SLOT = "\x00params\x00"


def key_maker(
    spec: SearchSpec,
    folds_hash: str,
    data_fingerprint: str,
    versions: Mapping[str, str],
    result_format: int | None = None,
) -> Any:
    """``params -> key`` for one plan: the canonical JSON of everything but the params is made once, and each
    candidate's params are spliced into it, so the string hashed is exactly :func:`candidate_key`'s."""
    timeout = {} if spec.resources.timeout is None else {"timeout_s": repr(spec.resources.timeout)}
    fixed = canonical_json(
        {
            **timeout,
            "estimator": spec.estimator,
            "params": _PARAMS_SLOT,
            "folds": folds_hash,
            "scoring": spec.scoring,
            "error_score": "raise" if spec.error_score == "raise" else repr(spec.error_score),
            "return_train_score": spec.return_train_score,
            "data": data_fingerprint,
            "versions": dict(versions),
            "result_format": library_versions.RESULT_FORMAT if result_format is None else result_format,
        }
    )
    before, after = fixed.split(canonical_json(_PARAMS_SLOT), 1)
    head, tail = hashlib.sha256(before.encode()), after.encode()

    def key(params: dict[str, Any]) -> str:
        digest = head.copy()  # sha256 of before + params + after, the shared prefix hashed once per plan
        digest.update(canonical_json(params).encode())
        digest.update(tail)
        return digest.hexdigest()

    return key


def candidate_label(params: dict[str, Any]) -> str:
    """A short label such as ``clf=SVC C=10 kernel=rbf`` (step prefixes dropped, object specs by class name).

    A prefix is kept where dropping it would make two names equal (``pca__n_components``, ``svd__n_components``).
    """
    names = _display_names(tuple(sorted(params)))
    return " ".join(f"{shown}={_short_value(params[name])}" for name, shown in names)


@functools.lru_cache(maxsize=1024)
def _display_names(names: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(name, shown) in sorted order: the name without its step prefixes unless that would be ambiguous."""
    shorts = {name: name.rsplit("__", 1)[-1] for name in names}
    counts = Counter(shorts.values())
    return tuple((name, shorts[name] if counts[shorts[name]] == 1 else name) for name in names)


_PLAIN = (int, str, bool, type(None))


def _short_value(value: Any) -> str:
    if type(value) in _PLAIN:
        return str(value)
    if is_object_spec(value):
        return str(value[TARGET_KEY]).rsplit(".", 1)[-1]
    if isinstance(value, float) and math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value)) if not isinstance(value, bool) else str(value)
    return str(value)
