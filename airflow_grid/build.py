"""Object specs to objects: the one door through which a spec's ``_target_`` is ever called.

An object spec is a mapping with ``_target_`` (a dotted path) and keyword arguments; nested object specs are built
recursively; lists of ``[name, obj, ...]`` become tuples, as Pipeline and ColumnTransformer expect. Every target is
resolved and checked by :mod:`airflow_grid.policy` and every keyword checked for file access *before* the call, so
:func:`check` (plan-time validation, nothing called) and :func:`build` refuse exactly the same things.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow_grid import policy as trust
from airflow_grid.errors import SpecError, show
from airflow_grid.policy import Policy

TARGET_KEY = "_target_"


def is_object_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and TARGET_KEY in value


def is_step_list(value: Any) -> bool:
    """A list of `[name, obj]` pairs: pipeline steps or ColumnTransformer-style transformers."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(item, list | tuple) and len(item) >= 2 and isinstance(item[0], str) for item in value)
    )


def check(value: Any, path: str, policy: Policy, role: str = "object") -> None:
    """Resolve and check every target inside ``value`` and every keyword it would be called with; call nothing.

    ``role`` applies to the outermost object spec only (``data`` may be an offline loader; what it is called with
    may not).
    """
    if isinstance(value, Mapping):
        if TARGET_KEY in value:
            trust.resolve(value[TARGET_KEY], f"{path}._target_", policy, role)
            trust.check_call(value[TARGET_KEY], _kwargs(value), path, policy)
        for key, item in value.items():
            if key != TARGET_KEY:
                check(item, f"{path}.{key}", policy)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check(item, f"{path}[{index}]", policy)


def build(value: Any, path: str, policy: Policy, role: str = "object") -> Any:
    """Build the object specs inside ``value``; a constructor's error becomes a :class:`SpecError` naming ``path``."""
    if isinstance(value, Mapping):
        if TARGET_KEY in value:
            return _call(value, path, policy, role)
        return {k: build(v, f"{path}.{k}", policy) for k, v in value.items()}
    if is_step_list(value):
        return [
            tuple(build(part, f"{path}[{i}][{j}]", policy) for j, part in enumerate(item))
            for i, item in enumerate(value)
        ]
    if isinstance(value, list):
        return [build(item, f"{path}[{i}]", policy) for i, item in enumerate(value)]
    return value


def _call(value: Mapping[str, Any], path: str, policy: Policy, role: str) -> Any:
    target = value[TARGET_KEY]
    factory = trust.resolve(target, f"{path}._target_", policy, role)
    trust.check_call(factory, _kwargs(value), path, policy)
    kwargs = {str(k): build(v, f"{path}.{k}", policy) for k, v in _kwargs(value).items()}
    try:
        return factory(**kwargs)
    except Exception as error:  # a constructor or loader refusing its arguments: the user's to fix, not a crash
        fix = "check the argument names." if isinstance(error, TypeError) else "check the argument values."
        raise SpecError(path, f"{target}(**{show(kwargs)}) failed: {type(error).__name__}: {error}", fix) from None


def _kwargs(value: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in value.items() if k != TARGET_KEY}
