"""Successive halving as rounds the plan decides, exactly as scikit-learn's Halving*SearchCV runs them.

scikit-learn runs every round in one ``fit``; here each round is a wave of work, so the search is split where
its data flows: what does not depend on scores is decided once at plan time (the resources of each round, the
number of rounds, each round's sub-sampled folds), and what does (the survivors of a round) is replayed from the
stored results by one pure function, :func:`replay`, that the DAG's round tasks, the select task and
``airflow-grid run`` all call. The arithmetic is ``BaseSuccessiveHalving._run_search``'s, line for line; the
resource bounds come from the class's own ``_check_input_parameters``, the sub-samples from its
``_SubsampleMetaSplitter`` and the survivors from its ``_top_k`` (private names of the pinned scikit-learn; the
equivalence tests compare every cell against the real classes, so a change there fails them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import ceil, floor, log
from typing import Any

import numpy as np

from airflow_grid.results import check_failures
from airflow_grid.spec import HALVING_STRATEGIES, SearchSpec, SpecError

N_SAMPLES = "n_samples"


@dataclass(frozen=True)
class Schedule:
    """What a halving search does before any score is known: the rounds and each round's resources."""

    factor: float
    resource: str
    n_candidates: int  # evaluated in the first round
    min_resources: int
    max_resources: int
    n_required_iterations: int
    n_possible_iterations: int
    n_iterations: int
    n_resources: tuple[int, ...]  # per round
    n_candidates_per_round: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "factor": self.factor,
            "resource": self.resource,
            "n_candidates": self.n_candidates,
            "min_resources": self.min_resources,
            "max_resources": self.max_resources,
            "n_required_iterations": self.n_required_iterations,
            "n_possible_iterations": self.n_possible_iterations,
            "n_iterations": self.n_iterations,
            "n_resources": list(self.n_resources),
            "n_candidates_per_round": list(self.n_candidates_per_round),
        }


def is_halving(spec: SearchSpec) -> bool:
    return spec.strategy in HALVING_STRATEGIES


def resource_bounds(spec: SearchSpec, estimator: Any, X: Any, y: Any, groups: Any) -> tuple[int, int]:
    """(min_resources_, max_resources_) before 'exhaust' raises the minimum, from the class's own check."""
    from sklearn.experimental import enable_halving_search_cv  # noqa: F401
    from sklearn.model_selection import HalvingGridSearchCV, HalvingRandomSearchCV
    from sklearn.model_selection._split import _yields_constant_splits

    from airflow_grid import data

    search = spec.search
    kwargs = {k: search[k] for k in ("factor", "resource", "max_resources", "min_resources", "aggressive_elimination")}
    if spec.strategy == "halving_random":
        searcher: Any = HalvingRandomSearchCV(estimator, {}, n_candidates=search["n_candidates"], **kwargs)
    else:
        searcher = HalvingGridSearchCV(estimator, {}, **kwargs)
    searcher._checked_cv_orig = data.checked_cv(spec, estimator, y)
    if not _yields_constant_splits(searcher._checked_cv_orig):
        raise SpecError(
            "cv",
            f"got {spec.cv!r}: successive halving splits the data once per round and needs the same folds each time.",
            "set the splitter's random_state to an integer, or shuffle: false.",
        )
    split_params = {} if groups is None else {"groups": groups}
    try:
        searcher._check_input_parameters(X, y, split_params)
    except ValueError as error:
        raise SpecError("search", str(error), "adjust search.min_resources / max_resources / resource.") from None
    return int(searcher.min_resources_), int(searcher.max_resources_)


def first_round_size(spec: SearchSpec, min_resources: int, max_resources: int) -> int | None:
    """HalvingRandomSearchCV's ``n_candidates='exhaust'``: as many as the resources allow; else None (known)."""
    if spec.strategy == "halving_random" and spec.search["n_candidates"] == "exhaust":
        return max_resources // min_resources
    return None


def schedule(spec: SearchSpec, n_candidates: int, min_resources: int, max_resources: int) -> Schedule:
    """The rounds ``_run_search`` would run for ``n_candidates`` first-round candidates (same arithmetic)."""
    search = spec.search
    factor = search["factor"]
    n_required = 1 + floor(log(n_candidates, factor))
    if search["min_resources"] == "exhaust":
        min_resources = max(min_resources, max_resources // factor ** (n_required - 1))
    if min_resources > max_resources:  # exhaust cannot cause it; an explicit min_resources can
        raise SpecError(
            "search.min_resources",
            f"got {min_resources}, more than max_resources {max_resources}.",
            "lower min_resources or raise max_resources.",
        )
    n_possible = 1 + floor(log(max_resources // min_resources, factor))
    n_iterations = n_required if search["aggressive_elimination"] else min(n_possible, n_required)
    resources, sizes, remaining = [], [], n_candidates
    for itr in range(n_iterations):
        power = max(0, itr - n_required + n_possible) if search["aggressive_elimination"] else itr
        resources.append(min(int(factor**power * min_resources), max_resources))
        sizes.append(remaining)
        remaining = ceil(remaining / factor)
    return Schedule(
        factor=factor,
        resource=str(search["resource"]),
        n_candidates=n_candidates,
        min_resources=int(min_resources),
        max_resources=int(max_resources),
        n_required_iterations=n_required,
        n_possible_iterations=n_possible,
        n_iterations=n_iterations,
        n_resources=tuple(int(r) for r in resources),
        n_candidates_per_round=tuple(sizes),
    )


def check_resource(spec: SearchSpec, estimator: Any, candidates: Sequence[dict[str, Any]]) -> None:
    """An estimator-parameter resource must exist and must not be searched (scikit-learn refuses both)."""
    resource = spec.search["resource"]
    if resource == N_SAMPLES:
        return
    if resource not in estimator.get_params():
        raise SpecError(
            "search.resource",
            f"got {resource!r}, which {type(estimator).__name__} does not have.",
            "use n_samples or a parameter from estimator.get_params(), e.g. clf__n_estimators.",
        )
    if any(resource in params for params in candidates):
        raise SpecError(
            "search.resource",
            f"got {resource!r}, which is also a searched parameter.",
            f"remove {resource} from the search space: the rounds set it.",
        )


def round_folds(
    folds: Sequence[tuple[np.ndarray, np.ndarray]], n_samples: int, n_resources: int, random_state: int | None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """A round's folds with ``resource: n_samples``: each train and test part sub-sampled as scikit-learn does."""
    from sklearn.model_selection._search_successive_halving import _SubsampleMetaSplitter

    class _Stored:  # the plan's folds, as the base splitter the meta-splitter wraps
        def split(self, X: Any, y: Any, **kwargs: Any) -> Any:
            return iter(folds)

    splitter = _SubsampleMetaSplitter(
        base_cv=_Stored(), fraction=n_resources / n_samples, subsample_test=True, random_state=random_state
    )
    return [(np.asarray(train), np.asarray(test)) for train, test in splitter.split(None, None)]


def round_params(params: dict[str, Any], resource: str, n_resources: int) -> dict[str, Any]:
    """A candidate's params in a round: an estimator-parameter resource is set to the round's amount."""
    return params if resource == N_SAMPLES else {**params, resource: n_resources}


def round_means(results: Sequence[dict[str, Any]], n_splits: int) -> np.ndarray:
    """``mean_test_score`` of a round's rows, computed as ``BaseSearchCV._format_results`` computes it."""
    array = np.array([r["test_scores"]["score"] for r in results], dtype=np.float64).reshape(len(results), n_splits)
    return np.asarray(np.average(array, axis=1))


def survivors(rows: Sequence[int], means: np.ndarray, factor: float, itr: int) -> list[int]:
    """The candidates (plan indices) the next round evaluates, in scikit-learn's order (``_top_k``)."""
    from sklearn.model_selection._search_successive_halving import _top_k

    kept = _top_k(
        {"iter": [itr] * len(rows), "mean_test_score": means, "params": list(rows)}, ceil(len(rows) / factor), itr
    )
    return [int(index) for index in kept]


Lookup = Callable[[int, int], "dict[str, Any] | None"]


def replay(document: dict[str, Any], n_splits: int, lookup: Lookup) -> list[list[int]]:
    """Each round's rows (plan candidate indices, in cv_results_ order) as far as the results reach.

    ``lookup(iter, index)`` returns a row's result or None. Round 0 is every candidate; round r+1 is round r's
    survivors, once every row of round r has a result. A complete search has ``n_iterations`` rounds.
    """
    halving = document["halving"]
    rounds = [list(range(halving["n_candidates"]))]
    for itr in range(1, halving["n_iterations"]):
        previous = rounds[-1]
        results = [lookup(itr - 1, index) for index in previous]
        if any(result is None for result in results):
            break
        check_failures(results, n_splits)  # type: ignore[arg-type]  # scikit-learn raises per round, so do we
        means = round_means(results, n_splits)  # type: ignore[arg-type]  # no None past the check
        rounds.append(survivors(previous, means, halving["factor"], itr - 1))
    return rounds


def remaining(
    document: dict[str, Any], last_round: Sequence[int], last_results: Sequence[dict[str, Any]], n_splits: int
) -> int:
    """``n_remaining_candidates_``: how many the last round would keep (scikit-learn keeps its _top_k)."""
    halving = document["halving"]
    means = round_means(last_results, n_splits)
    return len(survivors(last_round, means, halving["factor"], halving["n_iterations"] - 1))


def best_row(cv_results: dict[str, Any]) -> int:
    """The winner: the best of the last round, as ``BaseSuccessiveHalving._select_best_index`` picks it."""
    from sklearn.model_selection._search_successive_halving import BaseSuccessiveHalving

    arrays = {key: np.asarray(cv_results[key]) for key in ("iter", "mean_test_score")}
    return int(BaseSuccessiveHalving._select_best_index(None, "score", arrays))
