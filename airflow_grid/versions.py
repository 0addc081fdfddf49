"""The library versions that can change a score, named in every plan and candidate key.

A result computed under scikit-learn 1.9.1 is not a result for 1.9.2 (defaults, solvers and numerics change), so
the versions go into the plan id and every candidate key: an upgrade gives a new plan and new keys, never a stale
hit. The worker compares them with its own before it fits anything (:func:`mismatch`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable, Mapping
from functools import cache

# Bump when the layout of a stored result JSON changes: old results then get new keys instead of being misread.
RESULT_FORMAT = 2

# Always named: they decide every score whatever the spec allows.
CORE_DISTRIBUTIONS = ("scikit-learn", "numpy", "scipy")
UNKNOWN = "unknown"

# Top-level modules whose distribution has another name (checked before any scan of installed distributions).
_KNOWN_DISTRIBUTIONS = {"sklearn": "scikit-learn", "skimage": "scikit-image", "cv2": "opencv-python"}


def runtime_versions(extra_prefixes: Iterable[str] = ()) -> dict[str, str]:
    """Versions of scikit-learn, numpy, scipy and of the top-level package of every allowlisted prefix.

    Keys are distribution names (``scikit-learn``), or the module name when no installed distribution provides it;
    a version that cannot be found is ``"unknown"`` (stable across processes, so it still matches).
    """
    found = {name: _distribution_version(name) for name in CORE_DISTRIBUTIONS}
    for prefix in extra_prefixes:
        module = prefix.strip().strip(".").split(".", 1)[0]
        if module:
            name, version = _module_version(module)
            found.setdefault(name, version)
    return dict(sorted(found.items()))


def versions_of(names: Iterable[str]) -> dict[str, str]:
    """This process's versions of the named distributions (or modules), always with the core ones.

    The worker checks a plan with this, on the names the plan recorded: it needs neither the plan's allowlist nor
    its format, and a library the planner named but this image lacks shows up as ``unknown``.
    """
    found = {}
    for name in dict.fromkeys([*CORE_DISTRIBUTIONS, *names]):
        version = _distribution_version(name)
        found[name] = version if version != UNKNOWN else _module_version(name)[1]
    return dict(sorted(found.items()))


def mismatch(planned: Mapping[str, str], running: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The entries that differ, as (what the plan names, what this process runs); both empty when they agree."""
    names = sorted(set(planned) | set(running))
    differ = [name for name in names if planned.get(name) != running.get(name)]
    return (
        {name: planned.get(name, "absent") for name in differ},
        {name: running.get(name, "absent") for name in differ},
    )


def describe(versions: Mapping[str, str]) -> str:
    """``scikit-learn 1.9.1, numpy 2.4.0``: versions as a reader would write them."""
    return ", ".join(f"{name} {version}" for name, version in versions.items()) or "nothing"


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN


@cache
def _module_version(module: str) -> tuple[str, str]:
    """(distribution or module name, version) for a top-level module, without depending on what was imported."""
    first = _KNOWN_DISTRIBUTIONS.get(module, module)
    if _distribution_version(first) != UNKNOWN:
        return first, _distribution_version(first)
    for name in _packages_distributions().get(module, []):  # the scan (~0.2 s) only when the name misses
        if _distribution_version(name) != UNKNOWN:
            return name, _distribution_version(name)
    try:  # a module installed without metadata (a local package): its own __version__, if it has one
        version = str(getattr(importlib.import_module(module), "__version__", UNKNOWN))
    except Exception:  # not importable here: the fit will say so, the key says "unknown"
        version = UNKNOWN
    return module, version


@cache
def _packages_distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()
