"""Trust: what a spec may build, where its data and spec files may come from, how big it may be. Pure, no Airflow.

A spec may come from a trigger form, so every decision here is made on what an object **is**, not on how its name
is spelt: a ``_target_`` is screened as a string (syntax, private names, system modules, allowed prefixes) so that
nothing outside the allowlist is ever imported, then resolved by importing its module by its own name and walking
to the attribute without passing through another module, and the resolved object must be defined under an allowed
prefix and be of an allowed kind:

- classes: estimators and transformers (``BaseEstimator`` or the ``fit``/``get_params``/``set_params`` protocol),
  cross-validation splitters, Gaussian-process kernels, ``make_column_selector``;
- scipy.stats distributions (objects such as ``scipy.stats.loguniform``, which specs call to freeze);
- an explicit list of callables, by role: offline dataset loaders for ``data`` (no file, no network), public
  ``sklearn.metrics`` score/loss functions for scorers, and whatever the deployment names.

Parameters that make a fit read or write files (``memory``, a vectorizer's ``input``) are refused unless the
deployment enables them. Everything here runs before anything a spec names is called.
"""

from __future__ import annotations

import importlib
import inspect
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from airflow_grid.errors import SpecError, show

DEFAULT_PREFIXES: tuple[str, ...] = ("sklearn.", "scipy.stats.")
ALLOWED_TARGETS_ENV = "AIRFLOW_GRID_ALLOWED_TARGETS"
"""Comma-separated extra ``_target_`` prefixes a deployment allows (e.g. ``xgboost.,lightgbm.``)."""
ALLOWED_CALLABLES_ENV = "AIRFLOW_GRID_ALLOWED_CALLABLES"
"""Comma-separated dotted names of extra functions a spec may call (e.g. a company's offline data loader)."""
FILE_PARAMS_ENV = "AIRFLOW_GRID_ALLOW_FILE_PARAMS"
"""``1``/``true``: allow parameters that make a fit touch files (``Pipeline(memory=...)``)."""

OFFLINE_LOADERS: tuple[str, ...] = tuple(
    f"sklearn.datasets.{name}"
    for name in (
        *("load_iris", "load_digits", "load_wine", "load_breast_cancer", "load_diabetes", "load_linnerud"),
        *("make_classification", "make_regression", "make_blobs", "make_moons", "make_circles"),
        *("make_friedman1", "make_friedman2", "make_friedman3", "make_hastie_10_2", "make_gaussian_quantiles"),
        *("make_multilabel_classification", "make_low_rank_matrix", "make_sparse_uncorrelated"),
        *("make_s_curve", "make_swiss_roll"),
    )
)
"""Dataset loaders a spec's ``data`` may call: bundled or generated data only (the ``fetch_*`` ones download)."""

# Refused whatever the deployment allows: a prefix added for a model library must never open these.
_REFUSED_TEXT = """builtins os posix nt sys subprocess shutil importlib pickle marshal shelve dill cloudpickle joblib
    socket ctypes runpy code codeop pty platform io pathlib tempfile glob urllib http ftplib smtplib requests
    webbrowser multiprocessing threading signal asyncio inspect gc types functools operator codecs zipfile tarfile
    sqlite3 fsspec airflow mlflow"""
ALWAYS_REFUSED_MODULES = frozenset(_REFUSED_TEXT.split())
# Parameters that make a fit touch the filesystem, with the only values allowed by default.
FILE_PARAMS: Mapping[str, tuple[Any, ...]] = {"memory": (None,), "input": ("content",)}
_REFUSED_SEGMENTS = frozenset({"tests", "conftest"})
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
_METRIC_SUFFIXES = ("_score", "_loss", "_error", "_coef", "_coefficient")

MAX_SPEC_NODES = 100_000
MAX_SPEC_DEPTH = 64
MAX_FITS_CEILING = 1_000_000
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


@dataclass(frozen=True)
class Policy:
    """What a spec may build. Travels with the plan, so a pod decides exactly as the planner did."""

    prefixes: tuple[str, ...] = DEFAULT_PREFIXES
    callables: tuple[str, ...] = ()
    allow_file_params: bool = False

    @classmethod
    def from_env(cls, extra_prefixes: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Policy:
        """Defaults, plus the deployment's settings from the environment and from the caller."""
        env = os.environ if environ is None else environ
        return cls.configured(
            extra_prefixes,
            targets=env.get(ALLOWED_TARGETS_ENV, ""),
            callables=env.get(ALLOWED_CALLABLES_ENV, ""),
            allow_file_params=env.get(FILE_PARAMS_ENV, "").strip().lower() in ("1", "true", "yes"),
        )

    @classmethod
    def configured(
        cls, extra_prefixes: Sequence[str] = (), *, targets: str = "", callables: str = "", allow_file_params: bool
    ) -> Policy:
        """Defaults, plus settings the caller read (Airflow's ``[airflow_grid]`` section); lists comma-separated."""
        prefixes = _split(targets) + [p.strip() for p in extra_prefixes if p.strip()]
        return cls(
            prefixes=tuple(dict.fromkeys([*DEFAULT_PREFIXES, *prefixes])),
            callables=tuple(_split(callables)),
            allow_file_params=allow_file_params,
        )

    def to_json(self) -> dict[str, Any]:
        return {"prefixes": list(self.prefixes), "callables": list(self.callables), "files": self.allow_file_params}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Policy:
        return cls(tuple(value["prefixes"]), tuple(value.get("callables", ())), bool(value.get("files", False)))

    def covers(self, dotted: str) -> bool:
        """Whether a dotted name (a target, or a module as ``name.``) lies under an allowed prefix."""
        return any(_under(dotted, prefix) for prefix in self.prefixes)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _under(target: str, prefix: str) -> bool:
    """A prefix ending in a dot is a string prefix; a bare name covers that module and what is inside it."""
    if not prefix:
        return False
    return target.startswith(prefix) if prefix.endswith(".") else target == prefix or target.startswith(prefix + ".")


# --------------------------------------------------------------------------------------------------
# Targets


def resolve(target: Any, path: str, policy: Policy, role: str = "object") -> Any:
    """The object a ``_target_`` names, if the policy allows it; else :class:`SpecError` (nothing called).

    ``role`` is ``object`` (estimators, splitters, distributions, ...), ``data`` (also offline loaders) or
    ``metric`` (``sklearn.metrics`` functions).
    """
    screen(target, path, policy)
    obj = _locate(target, path, policy)
    _check_object(obj, target, path, policy, role)
    return obj


def screen(target: Any, path: str, policy: Policy) -> str:
    """String-level refusals that need no import: syntax, private or test names, system modules, prefixes."""
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise SpecError(
            path,
            f"_target_ must be a dotted import path, got {show(target)}.",
            "write the full path of a class, e.g. sklearn.svm.SVC.",
        )
    parts = target.split(".")
    private = next((p for p in parts if p.startswith("_")), None)
    root = parts[0]
    if private is not None:
        reason = f"{private!r} is private; such names are always refused"
    elif any(p in _REFUSED_SEGMENTS for p in parts):
        reason = "it names test code; such names are always refused"
    elif root in ALWAYS_REFUSED_MODULES:
        reason = f"{root + '.'!r} can run code or touch the system, so it is refused even if the deployment allows it"
    elif not policy.covers(target):
        reason = f"it is not under an allowed prefix ({', '.join(policy.prefixes)})"
        raise _refused(target, path, reason, _PREFIX_FIX)
    else:
        return target
    raise _refused(target, path, reason)


_DEFAULT_FIX = "use a public estimator, transformer or splitter class, e.g. sklearn.svm.SVC."
_PREFIX_FIX = (
    "use a class under an allowed prefix, e.g. sklearn.svm.SVC; to use another library, the deployment adds its "
    f"prefix to [airflow_grid] allowed_targets or ${ALLOWED_TARGETS_ENV} (comma-separated, e.g. xgboost.,lightgbm.)."
)


def _refused(target: str, path: str, reason: str, fix: str = _DEFAULT_FIX) -> SpecError:
    return SpecError(path, f"_target_ {target!r} is not allowed: {reason}.", fix)


def _locate(target: str, path: str, policy: Policy) -> Any:
    """Import the longest allowed module prefix by its own name, then walk attributes through classes only."""
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:split])
        if not policy.covers(name + "."):
            continue  # never import a module outside the allowlist, not even to look
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name and (name == error.name or name.startswith(error.name + ".")):
                continue  # not a module: the name continues with attributes
            raise SpecError(path, f"_target_ {target!r} cannot be imported: {error}.", "install the package.") from None
        except Exception as error:
            raise SpecError(
                path, f"_target_ {target!r} cannot be imported: {type(error).__name__}: {error}.", "check the package."
            ) from None
        if getattr(module, "__name__", None) != name:
            raise _refused(target, path, f"{name!r} is an alias of module {getattr(module, '__name__', '?')!r}")
        return _walk(module, parts[split:], target, path)
    raise SpecError(path, f"_target_ {target!r} cannot be imported.", "check the spelling and the package version.")


def _walk(obj: Any, attributes: list[str], target: str, path: str) -> Any:
    owner = obj.__name__
    for position, attribute in enumerate(attributes):
        try:
            obj = getattr(obj, attribute)
        except Exception:
            raise SpecError(
                path, f"_target_ {target!r} cannot be imported: {owner!r} has no {attribute!r}.", "check the spelling."
            ) from None
        if inspect.ismodule(obj):
            reason = (
                f"resolving it passes through module {obj.__name__!r} (attribute {attribute!r} of {owner!r}); a "
                "target names its module by its own import path"
            )
            raise _refused(target, path, reason)
        if position < len(attributes) - 1 and not isinstance(obj, type):
            reason = f"resolving it passes through {attribute!r}, a {type(obj).__name__} object, not a class"
            raise _refused(target, path, reason)
        owner = f"{owner}.{attribute}"
    return obj


def _defining_module(obj: Any) -> str | None:
    """Where an object is defined: its own ``__module__`` for classes and functions, its type's otherwise."""
    if isinstance(obj, type) or inspect.isroutine(obj):
        module = getattr(obj, "__module__", None)
    else:
        module = type(obj).__module__
    return module if isinstance(module, str) else None


def _check_object(obj: Any, target: str, path: str, policy: Policy, role: str) -> None:
    module = _defining_module(obj)
    if module is None or module.split(".")[0] in ALWAYS_REFUSED_MODULES or not policy.covers(module + "."):
        reason = f"it is defined in {module!r}, outside the allowed prefixes ({', '.join(policy.prefixes)})"
        raise _refused(target, path, reason, _PREFIX_FIX)
    if isinstance(obj, type):
        if is_buildable_class(obj):
            return
        reason = "it is a class, but not an estimator, transformer, splitter, kernel or column selector"
        raise _refused(target, path, reason)
    if is_distribution(obj) or _is_allowed_callable(obj, policy, role):
        return
    kind = "function" if inspect.isroutine(obj) else f"{type(obj).__name__} object"
    if role == "data":
        reason, fix = f"it is a {kind} that is not an offline dataset loader", _loader_fix()
    else:
        reason = f"it is a {kind}; only classes (estimators, transformers, splitters) and distributions may be built"
        fix = (
            f"{_DEFAULT_FIX} A deployment may allow a function by name in [airflow_grid] allowed_callables or "
            f"${ALLOWED_CALLABLES_ENV}."
        )
    raise _refused(target, path, reason, fix)


def _loader_fix() -> str:
    names = ", ".join(name.rsplit(".", 1)[1] for name in OFFLINE_LOADERS[:6])
    return (
        f"use data from a file ({{path: data.parquet, target: label}}) or an offline loader of sklearn.datasets "
        f"({names}, make_*); the deployment may allow more by name in [airflow_grid] allowed_callables or "
        f"${ALLOWED_CALLABLES_ENV}."
    )


def is_buildable_class(cls: type) -> bool:
    """Estimators/transformers (sklearn's base or its protocol), splitters, kernels, column selectors."""
    from sklearn.base import BaseEstimator
    from sklearn.compose import make_column_selector
    from sklearn.gaussian_process.kernels import Kernel
    from sklearn.model_selection import BaseCrossValidator, BaseShuffleSplit
    from sklearn.model_selection._split import _RepeatedSplits

    if issubclass(cls, BaseEstimator | BaseCrossValidator | BaseShuffleSplit | _RepeatedSplits | Kernel):
        return True
    if issubclass(cls, make_column_selector):
        return True
    return all(callable(getattr(cls, name, None)) for name in ("fit", "get_params", "set_params"))


def is_distribution(obj: Any) -> bool:
    """A scipy.stats distribution object (``scipy.stats.norm``, ``loguniform``): a spec calls it to freeze it."""
    if not type(obj).__module__.startswith("scipy."):
        return False
    from scipy.stats._distn_infrastructure import rv_generic

    return isinstance(obj, rv_generic)


def _is_allowed_callable(obj: Any, policy: Policy, role: str) -> bool:
    if not callable(obj):
        return False
    allowed = _callables(policy.callables)
    if role == "data":
        allowed = allowed | _callables(OFFLINE_LOADERS)
    if role == "metric":
        allowed = allowed | _metric_functions()
    return any(obj is candidate for candidate in allowed)


@cache
def _callables(names: tuple[str, ...]) -> frozenset[Any]:
    """The objects behind allowed callable names (compared by identity, never by spelling)."""
    found = set()
    for name in names:
        module_name, _, attribute = name.rpartition(".")
        if module_name.split(".")[0] in ALWAYS_REFUSED_MODULES:
            continue
        try:
            found.add(getattr(importlib.import_module(module_name), attribute))
        except (ImportError, AttributeError):
            continue  # a deployment naming a function its image lacks: that function is simply not allowed
    return frozenset(found)


@cache
def _metric_functions() -> frozenset[Any]:
    import sklearn.metrics

    names = [n for n in sklearn.metrics.__all__ if n.endswith(_METRIC_SUFFIXES)]
    return frozenset(getattr(sklearn.metrics, n) for n in names if inspect.isfunction(getattr(sklearn.metrics, n)))


def check_call(obj: Any, kwargs: Mapping[str, Any], path: str, policy: Policy) -> None:
    """Refuse keyword arguments that would make a fit read or write files (checked before the call)."""
    for name, value in kwargs.items():
        check_parameter(name, value, f"{path}.{name}", policy)


def check_parameter(name: str, value: Any, path: str, policy: Policy) -> None:
    """A parameter, as a keyword or a grid name (``clf__memory``): file-touching values are refused."""
    short = name.rsplit("__", 1)[-1]
    allowed = FILE_PARAMS.get(short)
    if allowed is None or policy.allow_file_params or any(value == ok for ok in allowed):
        return
    raise SpecError(
        path,
        f"got {show(value)}; {short!r} makes a fit read or write files, which a spec may not do by default.",
        f"remove it (allowed values: {', '.join(map(repr, allowed))}); a deployment that needs it sets "
        f"[airflow_grid] allow_file_params = True or ${FILE_PARAMS_ENV}=1.",
    )


# --------------------------------------------------------------------------------------------------
# Documents


def check_shape(document: Any, path: str = "") -> None:
    """Refuse documents too big or too deep to handle (YAML alias bombs, pathological nesting), without recursion.

    Aliases are walked as often as they are referenced, so an expansion bomb counts what it would expand to, and
    the walk stops at the limit instead of expanding it.
    """
    stack: list[tuple[Any, int]] = [(document, 0)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SPEC_NODES:
            raise SpecError(
                path,
                f"the document expands to more than {MAX_SPEC_NODES:,} values (YAML aliases or a huge grid).",
                "write the spec out without aliases, and keep grids to lists of values.",
            )
        if depth > MAX_SPEC_DEPTH:
            raise SpecError(path, f"the document is nested deeper than {MAX_SPEC_DEPTH} levels.", "flatten it.")
        if isinstance(value, Mapping):
            stack.extend((item, depth + 1) for item in (*value.keys(), *value.values()))
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)


def check_max_fits(max_fits: int, path: str = "limits.max_fits") -> None:
    """A spec may raise its budget only up to the ceiling: counting and planning must stay bounded."""
    if max_fits > MAX_FITS_CEILING:
        raise SpecError(
            path, f"got {max_fits:,}, above the ceiling of {MAX_FITS_CEILING:,} fits.", "split the study into parts."
        )


# --------------------------------------------------------------------------------------------------
# Where a run may read from (the plan operator's trust decisions)

DATA_PATH_VARIABLES = (
    *("ds", "ds_nodash", "logical_date", "data_interval_start", "data_interval_end", "run_id", "params"),
)
"""What ``data.path`` may render besides ``{{ dataset_version }}``: the run's dates and params, never var/conn."""


def check_dataset_version(version: str | None, source: str) -> None:
    """A dataset version is rendered into file paths: a name, never a path (asset extras are unvalidated input)."""
    if version is None or (_VERSION.match(version) and ".." not in version):
        return
    raise SpecError(
        "dataset_version",
        f"got {show(version)} (from {source}); a version is rendered into data paths, so it may not hold '/', "
        "'..' or spaces.",
        "use letters, digits and . _ : + - (at most 128), e.g. 2026-11-30 or v12.",
    )


def check_spec_path(requested: str, spec_dirs: Sequence[str]) -> Path:
    """``spec_path`` from conf may only name an existing file inside the DAG's spec directories."""
    resolved = Path(requested).resolve()
    allowed = [Path(d).resolve() for d in spec_dirs]
    if any(resolved.is_relative_to(d) for d in allowed) and resolved.is_file():
        return resolved
    raise SpecError(
        "spec_path",
        f"got {requested!r}, not a spec file in {[str(d) for d in allowed]}.",
        "name a file in the DAG's specs directory, or pass the whole spec in the spec param.",
    )


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


def path_within(path: str, roots: Iterable[str]) -> bool:
    """Whether ``path`` (a local path or an fsspec URL) lies under one of ``roots``; ``..`` never climbs out.

    Local paths (and ``file://``) are compared resolved, symlinks followed; URLs by scheme and normalised path,
    and a URL with a ``..`` segment is refused outright (object stores do not resolve it the same way). Chained
    URLs (``simplecache::s3://``) have their own scheme and so match only a root written the same way.
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


def check_data_root(path: str, roots: Sequence[str]) -> None:
    """Data named by untrusted conf (a whole spec, a dataset version) must lie under the DAG's data roots."""
    if path_within(path, roots):
        return
    where = f"under {list(roots)} (this DAG's data roots)" if roots else "nowhere: this DAG has no data roots"
    raise SpecError(
        "data.path",
        f"got {path!r}; a spec or version passed in the run's conf may read files {where}.",
        "use a path under a data root, a `_target_` loader, or a spec file of the DAG's specs directory "
        "(spec_path); or build the DAG with data_roots=[...] naming where tuning data lives.",
    )


def _split_url(path: str) -> tuple[str, str]:
    if "://" not in path:
        return "file", path
    scheme, rest = path.split("://", 1)
    return scheme.lower(), rest
