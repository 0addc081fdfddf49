"""Which components' scores depend on a ``random_state`` left unset (None), so a fresh run can score differently.

A rerun of the same plan reuses stored results, so its scores are the same; a fresh plan (another store, a
cleaned store, an upgrade) fits again, and every component below draws new random numbers. :func:`unseeded`
names them, so a user knows which scores will move and where to set a seed. It is pure: scikit-learn only, no
Airflow, no MLflow.

Rules (scikit-learn 1.9 docstrings, checked against the code where they disagree):

- **Splitters** (``cv``, and a splitter inside an estimator such as ``LogisticRegressionCV(cv=...)``): an int
  ``cv`` is (Stratified)KFold without shuffling: not random. A splitter with a ``random_state`` attribute left
  None is listed when it draws: with a ``shuffle`` attribute (KFold, StratifiedKFold, GroupKFold,
  StratifiedGroupKFold) only when ``shuffle=True``; without one (ShuffleSplit, StratifiedShuffleSplit,
  GroupShuffleSplit, RepeatedKFold, RepeatedStratifiedKFold) always. Splitters that take no ``random_state``
  never: LeaveOneOut, PredefinedSplit, LeaveOneGroupOut, and TimeSeriesSplit (its inherited attributes are
  ``shuffle=False``, ``random_state=None``). Folds are computed once per plan,
  so an unseeded splitter gives a fresh plan other folds (and a new plan id: no stored result is reused).
- **Estimators** (the spec's estimator, every step and inner estimator reachable through ``get_params``, and
  every grid value that is an object spec): one whose ``random_state`` is None is listed, except where
  scikit-learn documents it unused for the settings it has:

  - ``SVC``, ``NuSVC``: only with ``probability=True`` (deprecated in 1.9; its default is now the string
    ``"deprecated"``, which does not draw). ``SVR``, ``NuSVR``, ``OneClassSVM`` have no
    ``random_state``: never listed.
  - ``LogisticRegression``, ``LogisticRegressionCV``: only ``solver`` in sag, saga, liblinear.
  - ``Ridge``, ``RidgeClassifier``: only ``solver`` in sag, saga (``auto`` resolves to cholesky, sparse_cg or
    lbfgs in ``fit``, never sag).
  - ``PCA``: ``svd_solver`` arpack or randomized; ``auto`` is listed as *may* (it picks randomized for data larger
    than 500x500 with ``n_components`` below 80% of its smaller side, which only the data tells); full and
    covariance_eigh never.
  - ``KernelPCA``: ``eigen_solver`` arpack or randomized; ``auto`` as *may* (arpack when ``n_components`` < 10
    and more than 200 samples); dense never.
  - ``LinearSVC``: ``dual=True``; ``dual="auto"`` as *may* (dual when n_samples < n_features); ``dual=False``
    never.
  - Coordinate descent with a ``selection`` parameter (``Lasso``, ``ElasticNet``, their CV and multi-task
    variants): only ``selection="random"``.
  - SGD family (``SGDClassifier``, ``SGDRegressor``, ``SGDOneClassSVM``, ``Perceptron``, passive-aggressive):
    unless ``shuffle=False`` and ``early_stopping=False`` (the docstring names shuffling; early stopping's
    validation split draws with the same ``random_state``).
  - ``HistGradientBoosting*``: listed; certain with ``early_stopping=True`` or ``max_features`` < 1, else *may*
    (``auto`` stops early above 10,000 samples; binning subsamples above 200,000).
  - Everything else with ``random_state=None`` is listed: trees and forests, (gradient) boosting, bagging,
    ``KMeans``, ``MLP*``, random projections, ``TruncatedSVD``, ... - scikit-learn documents no setting where
    they do not draw, and estimators from other libraries admitted by the allowlist are treated the same way.

  A candidate that sets ``random_state`` to an int (in the grid, or inside a grid value's object spec) is not
  listed for that component.
- **Holdout** (``holdout`` without ``random_state``): ``train_test_split`` (``GroupShuffleSplit`` with
  ``data.groups``) with ``random_state=None`` draws other rows on every plan: the search data, the folds and the
  holdout score all change.
- **Search**: ``grid`` never draws. Any other strategy with ``search.random_state`` None is listed (``random``
  refuses None at parse). ``halving_grid`` draws only through its per-round row subsampling, which scikit-learn's
  code does for ``resource="n_samples"`` (its docstring says the opposite, ``resources != 'n_samples'``; the code
  in ``_search_successive_halving.py`` is what runs), so ``halving_grid`` with another resource is not listed.

Each entry is JSON-ready: ``component`` (``estimator``, a ``get_params`` path such as ``clf``, ``cv``,
``holdout``, ``search``), ``source`` (the spec field that defines it: ``estimator``, ``param_grid.clf``, ...),
``class``, ``why``, ``may`` (true when whether it draws depends on the data), ``candidates`` (inclusive index
ranges ``[[first, last], ...]``) and ``n_candidates``. Entries come estimator components first (by first candidate,
then path, then class), then ``cv``, ``holdout``, ``search``.

Cost: candidates are grouped by the grid values that can change a verdict (object specs, component
replacements, and the parameters the rules read: :data:`RULE_PARAMS`), and one estimator is built and walked per
group, so a 100,000-candidate grid over numbers costs one build and a pass over the candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sklearn.base import BaseEstimator

from airflow_grid.grid import Candidate, build_estimator
from airflow_grid.spec import SEARCH_CLASSES, SearchSpec, build, canonical_json, is_object_spec

#: Parameters a rule reads: a grid over one of them can change a verdict, so candidates differing in it are
#: walked apart. Any other numeric or string grid value cannot, and is not even set while walking.
RULE_PARAMS = frozenset(
    {
        "random_state",
        "probability",
        "solver",
        "svd_solver",
        "eigen_solver",
        "dual",
        "selection",
        "shuffle",
        "early_stopping",
        "max_features",
    }
)
_COMPONENT_VALUES = ("passthrough", "drop")
_SCALARS = (int, float, bool, str, type(None))
_ADVICE = "Set random_state to make reruns reproducible."

Entry = dict[str, Any]
_Finding = tuple[str, str, str, str, bool]  # component, source, class, why, may


def unseeded(spec: SearchSpec, candidates: Sequence[Candidate]) -> list[Entry]:
    """Every component whose results depend on a ``random_state`` left None (see the module docstring)."""
    n = len(candidates)
    everyone = [[0, n - 1]] if n else []
    entries = _estimator_entries(spec, candidates)
    for finding in (_cv_finding(spec), _holdout_finding(spec), _search_finding(spec)):
        if finding is not None:
            entries.append(_entry(finding, everyone, n))
    return entries


def summary(entries: Sequence[Mapping[str, Any]], n_candidates: int | None = None) -> str:
    """One line for a log or a terminal, e.g. ``results depend on an unset random_state: clf
    (RandomForestClassifier, candidates 3-8); cv (ShuffleSplit). Set random_state to make reruns reproducible.``;
    empty when nothing is unseeded."""
    if not entries:
        return ""
    return f"results depend on an unset random_state: {'; '.join(_short(e, n_candidates) for e in entries)}. {_ADVICE}"


def details(entries: Sequence[Mapping[str, Any]], n_candidates: int | None = None) -> list[str]:
    """One line per entry: what, where in the spec, which candidates, and why it draws."""
    lines = []
    for entry in entries:
        scope = _scope(entry, n_candidates)
        maybe = "may depend on the data: " if entry.get("may") else ""
        lines.append(f"{entry['component']} ({entry['class']}, {entry['source']}, {scope}): {maybe}{entry['why']}")
    return lines


def names(entries: Iterable[Mapping[str, Any]]) -> str:
    """A short comma list, ``clf (RandomForestClassifier), cv (ShuffleSplit)`` (an MLflow tag's value)."""
    return ", ".join(dict.fromkeys(f"{e['component']} ({e['class']})" for e in entries))


# --------------------------------------------------------------------------------------------------
# Estimators


def _estimator_entries(spec: SearchSpec, candidates: Sequence[Candidate]) -> list[Entry]:
    space = "param_distributions" if spec.param_distributions else "param_grid"
    base = build_estimator(spec)
    base_params = base.get_params(deep=True)
    kinds: dict[str, str] = {}
    value_keys: dict[int, tuple[Any, str]] = {}  # id -> (value kept alive, canonical JSON)
    groups: dict[tuple[Any, ...], list[int]] = {}
    chosen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for candidate in candidates:
        signature = []
        relevant = {}
        for name, value in candidate.params.items():
            kind = kinds.get(name)
            if kind is None:
                kind = kinds[name] = _kind(name, base_params)
            if kind == "always" or _structural(value, kind):
                signature.append((name, _value_key(value, value_keys)))
                relevant[name] = value
        key = tuple(signature)
        indices = groups.get(key)
        if indices is None:
            groups[key] = indices = []
            chosen[key] = relevant
        indices.append(candidate.index)
    found: dict[_Finding, list[int]] = {}
    for key, indices in groups.items():
        params = chosen[key]
        estimator = build_estimator(spec, params) if params else base
        for finding in _walk(estimator, params, space):
            found.setdefault(finding, []).extend(indices)
    ordered = sorted(found.items(), key=lambda item: (min(item[1]), item[0][0], item[0][2], item[0][1]))
    return [_entry(finding, _ranges(indices), len(indices)) for finding, indices in ordered]


def _kind(name: str, base_params: Mapping[str, Any]) -> str:
    """``always``: the value may change a verdict; ``objects``: only an object spec may; ``unknown`` (a
    parameter of an object the grid brings): an object spec, None, passthrough or drop may."""
    if name.rsplit("__", 1)[-1] in RULE_PARAMS:
        return "always"
    if name not in base_params:
        return "unknown"
    return "always" if _is_component(base_params[name]) else "objects"


def _structural(value: Any, kind: str) -> bool:
    if type(value) in _SCALARS:  # most grid values: never an object spec, so no Mapping check per candidate
        return kind == "unknown" and (value is None or (type(value) is str and value in _COMPONENT_VALUES))
    if is_object_spec(value):
        return True
    return kind == "unknown" and (value is None or (isinstance(value, str) and value in _COMPONENT_VALUES))


def _value_key(value: Any, memo: dict[int, tuple[Any, str]]) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return (type(value).__name__, value)
    known = memo.get(id(value))
    if known is None:
        known = memo[id(value)] = (value, canonical_json(value))
    return known[1]


def _is_component(value: Any) -> bool:
    return isinstance(value, BaseEstimator) or _is_splitter(value)


def _is_splitter(value: Any) -> bool:
    return (
        not isinstance(value, BaseEstimator | type)
        and callable(getattr(value, "split", None))
        and callable(getattr(value, "get_n_splits", None))
    )


def _walk(estimator: BaseEstimator, params: Mapping[str, Any], space: str) -> list[_Finding]:
    """Findings for the estimator and everything reachable through its ``get_params(deep=True)``."""
    found = []
    for path, obj in [("", estimator), *estimator.get_params(deep=True).items()]:
        if isinstance(obj, BaseEstimator):
            if obj.get_params(deep=False).get("random_state", 0) is not None:
                continue  # seeded, or no random_state at all
            rule = _estimator_rule(obj)
        elif _is_splitter(obj):
            rule = _splitter_rule(obj)
        else:
            continue
        if rule is not None:
            found.append((path or "estimator", _source(path, params, space), type(obj).__name__, *rule))
    return found


def _source(path: str, params: Mapping[str, Any], space: str) -> str:
    """The spec field that defines the component at ``path``: the grid value it comes from, else the estimator."""
    seed = f"{path}__random_state" if path else "random_state"
    if seed in params:  # the grid sets random_state: None explicitly
        return f"{space}.{seed}"
    owners = [name for name, value in params.items() if is_object_spec(value) and _within(path, name)]
    return f"{space}.{max(owners, key=len)}" if owners else "estimator"


def _within(path: str, name: str) -> bool:
    return path == name or path.startswith(f"{name}__")


def _estimator_rule(obj: BaseEstimator) -> tuple[str, bool] | None:
    """(why, may) when ``obj`` draws with its unset random_state, None where scikit-learn documents it unused."""
    from sklearn.decomposition import PCA, KernelPCA
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV, Ridge, RidgeClassifier
    from sklearn.svm import SVC, LinearSVC, NuSVC

    params = obj.get_params(deep=False)
    bases = {cls.__name__ for cls in type(obj).__mro__}
    if isinstance(obj, SVC | NuSVC):
        # probability defaults to the string "deprecated" in scikit-learn 1.9: only a real True draws
        if params.get("probability") is True:
            return "probability=True shuffles the data for the probability estimates", False
        return None
    if isinstance(obj, LogisticRegression | LogisticRegressionCV):
        solver = params.get("solver")
        return (f"solver={solver!r} shuffles the data", False) if solver in ("sag", "saga", "liblinear") else None
    if isinstance(obj, Ridge | RidgeClassifier):
        solver = params.get("solver")
        return (f"solver={solver!r} shuffles the data", False) if solver in ("sag", "saga") else None
    if isinstance(obj, PCA):
        return _solver_rule(
            params.get("svd_solver"),
            "svd_solver",
            "'auto' picks the randomized solver for data larger than 500x500 with n_components below 80% of its "
            "smaller side",
        )
    if isinstance(obj, KernelPCA):
        return _solver_rule(
            params.get("eigen_solver"),
            "eigen_solver",
            "'auto' picks arpack (random start) when n_components < 10 and there are more than 200 samples",
        )
    if isinstance(obj, LinearSVC):
        dual = params.get("dual")
        if dual is False:
            return None
        if dual == "auto":
            return "dual='auto' solves the dual (shuffled coordinate descent) when n_samples < n_features", True
        return "dual=True shuffles the data in coordinate descent", False
    if "selection" in params:  # coordinate descent: Lasso, ElasticNet and their CV / multi-task variants
        if params["selection"] == "random":
            return "selection='random' updates the features in random order", False
        return None
    if "BaseSGD" in bases:
        if params.get("shuffle", True):
            return "shuffles the data every epoch (shuffle=True)", False
        if params.get("early_stopping", False):
            return "early_stopping=True splits off a random validation set", False
        return None
    if "BaseHistGradientBoosting" in bases:
        max_features = params.get("max_features", 1.0)
        if params.get("early_stopping") is True or (isinstance(max_features, float) and max_features < 1):
            return "early stopping's validation split or max_features < 1 draws at random", False
        return (
            "early stopping ('auto': above 10,000 samples) splits off a random validation set, and binning "
            "subsamples above 200,000 samples",
            True,
        )
    return _FAMILY_REASONS.get(next((b for b in bases if b in _FAMILY_REASONS), ""), _DEFAULT_REASON), False


def _solver_rule(solver: Any, name: str, auto: str) -> tuple[str, bool] | None:
    if solver in ("arpack", "randomized"):
        return f"{name}={solver!r} starts from random vectors", False
    if solver == "auto":
        return auto, True
    return None


_FAMILY_REASONS = {
    "BaseDecisionTree": "permutes the features at every split (ties between equal splits fall at random)",
    "BaseForest": "draws bootstrap samples and candidate features for every tree",
    "BaseGradientBoosting": "seeds every tree (feature permutation, subsample, early-stopping split)",
    "_BaseKMeans": "draws the initial centroids",
    "BaseMultilayerPerceptron": "initialises the weights at random and shuffles the batches",
}
_DEFAULT_REASON = "random_state is None and scikit-learn documents no setting of this class where it is unused"


def _splitter_rule(splitter: Any) -> tuple[str, bool] | None:
    if getattr(splitter, "random_state", 0) is not None:
        return None  # seeded, or a splitter without randomness (LeaveOneOut, TimeSeriesSplit, ...)
    if hasattr(splitter, "shuffle"):
        return ("shuffle=True draws other folds on every plan", False) if splitter.shuffle else None
    return "draws other folds on every plan", False


# --------------------------------------------------------------------------------------------------
# The splitter, the holdout, the search


def _cv_finding(spec: SearchSpec) -> _Finding | None:
    if not is_object_spec(spec.cv):  # an int: (Stratified)KFold without shuffling
        return None
    splitter = build(spec.cv, "cv", spec.policy)
    rule = _splitter_rule(splitter)
    return None if rule is None else ("cv", "cv", type(splitter).__name__, *rule)


def _holdout_finding(spec: SearchSpec) -> _Finding | None:
    if spec.holdout is None or spec.holdout.random_state is not None:
        return None
    splitter = "GroupShuffleSplit" if spec.data.get("groups") else "train_test_split"
    why = "draws other holdout rows on every plan: the search data, its folds and the holdout score change"
    return "holdout", "holdout", splitter, why, False


def _search_finding(spec: SearchSpec) -> _Finding | None:
    strategy = spec.strategy
    if strategy == "grid" or spec.search.get("random_state") is not None:
        return None
    resource = spec.search.get("resource", "n_samples")
    if strategy == "halving_grid" and resource != "n_samples":
        return None  # no row subsampling, no sampled candidates
    if strategy.startswith("halving"):
        why = "subsamples the rows of every round (resource n_samples)" if resource == "n_samples" else ""
        if strategy == "halving_random":
            why = f"samples the candidates{' and ' + why if why else ''}"
    else:
        why = "samples the candidates"
    return "search", "search", SEARCH_CLASSES.get(strategy, strategy), why, False


# --------------------------------------------------------------------------------------------------
# Rendering


def _entry(finding: _Finding, ranges: list[list[int]], count: int) -> Entry:
    component, source, name, why, may = finding
    return {
        "component": component,
        "source": source,
        "class": name,
        "why": why,
        "may": may,
        "candidates": ranges,
        "n_candidates": count,
    }


def _ranges(indices: Iterable[int]) -> list[list[int]]:
    """Sorted indices as inclusive ``[first, last]`` runs."""
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and runs[-1][1] == index - 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return runs


def _scope(entry: Mapping[str, Any], n_candidates: int | None, limit: int = 4) -> str:
    ranges = entry.get("candidates") or []
    if n_candidates is not None and entry.get("n_candidates") == n_candidates:
        return "all candidates"
    shown = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit])
    more = f", ... ({entry.get('n_candidates')} in all)" if len(ranges) > limit else ""
    return f"candidate{'s' if entry.get('n_candidates') != 1 else ''} {shown}{more}"


def _short(entry: Mapping[str, Any], n_candidates: int | None) -> str:
    parts = [str(entry["class"])]
    if entry.get("may"):
        parts.append("may")
    if entry["component"] not in ("cv", "holdout", "search") and n_candidates != entry.get("n_candidates"):
        parts.append(_scope(entry, n_candidates))
    return f"{entry['component']} ({', '.join(parts)})"
