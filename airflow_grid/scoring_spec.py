"""Scoring entries of a spec: a scorer name, or ``{make_scorer: <sklearn.metrics function>, ...}``.

:func:`parse_entry` validates an entry at parse time (so at plan, before anything runs): the function is a plain
name resolved as ``sklearn.metrics.<name>`` through :func:`airflow_grid.policy.resolve` with role ``metric``
(public score/loss functions only), its keyword arguments are checked against the function's signature and
``response_method``/``greater_is_better`` against what ``make_scorer`` takes. :func:`scorers` and
:func:`refit_scorer` are the one place the scorers are built, for cross-validation and for the holdout.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow_grid import policy as trust
from airflow_grid.errors import SpecError
from airflow_grid.errors import show as _show

if TYPE_CHECKING:
    from airflow_grid.policy import Policy
    from airflow_grid.spec import SearchSpec

MAKE_SCORER = "make_scorer"
RESPONSE_METHODS = ("predict", "predict_proba", "decision_function")
_OPTIONS = (MAKE_SCORER, "greater_is_better", "response_method")
_PLAIN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_FUNCTION_FIX = (
    "name a public score or loss function of sklearn.metrics without its module, e.g. make_scorer: fbeta_score."
)


def is_make_scorer(entry: Any) -> bool:
    return isinstance(entry, Mapping) and MAKE_SCORER in entry


def parse_entry(entry: Mapping[str, Any], path: str, policy: Policy) -> dict[str, Any]:
    """Validate a ``make_scorer`` entry; returns it unchanged (JSON-ready: it is part of the candidate key)."""
    name = entry[MAKE_SCORER]
    function = metric_function(name, f"{path}.{MAKE_SCORER}", policy)
    greater = entry.get("greater_is_better", True)
    if not isinstance(greater, bool):
        raise SpecError(f"{path}.greater_is_better", f"got {_show(greater)}.", "write true or false.")
    _response_method(entry.get("response_method", "predict"), f"{path}.response_method")
    parameters = list(inspect.signature(function).parameters.values())
    accepted = {
        p.name: p for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }  # the first two are (y_true, y_pred / y_score), which the scorer passes
    for key, value in entry.items():
        if key in _OPTIONS:
            continue
        if key not in accepted:
            close = difflib.get_close_matches(key, [*accepted, *_OPTIONS[1:]], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SpecError(
                f"{path}.{key}",
                f"{name} takes no keyword argument {key!r} (value {_show(value)}).",
                f"{hint}use {name}'s own arguments ({', '.join(accepted) or 'none'}) or make_scorer's "
                "greater_is_better and response_method.",
            )
        if isinstance(value, Mapping):
            raise SpecError(
                f"{path}.{key}",
                f"got {_show(value)}; a metric argument is a plain value.",
                "give a number, string, boolean, null or a list of those.",
            )
    return dict(entry)


def metric_function(name: Any, path: str, policy: Policy) -> Any:
    """``sklearn.metrics.<name>`` if it is a public metric function the policy allows; else SpecError."""
    if not isinstance(name, str) or not _PLAIN_NAME.match(name):
        raise SpecError(path, f"got {_show(name)}; only a function name in sklearn.metrics is accepted.", _FUNCTION_FIX)
    try:
        return trust.resolve(f"sklearn.metrics.{name}", path, policy, role="metric")
    except SpecError:
        raise SpecError(
            path, f"got {_show(name)}, which is not a score or loss function of sklearn.metrics.", _FUNCTION_FIX
        ) from None


def _response_method(value: Any, path: str) -> str | tuple[str, ...]:
    if isinstance(value, str) and value in RESPONSE_METHODS:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, str) and v in RESPONSE_METHODS for v in value)
        and len(set(value)) == len(value)
    ):
        return tuple(value)
    raise SpecError(
        path,
        f"got {_show(value)}.",
        f"write one of {', '.join(RESPONSE_METHODS)}, or a list of them tried in order (default predict).",
    )


def build_scorer(entry: str | Mapping[str, Any] | None, path: str, policy: Policy) -> Any:
    """A scorer name stays a name (sklearn resolves it); a make_scorer entry becomes ``make_scorer(...)``."""
    if not is_make_scorer(entry):
        return entry
    from sklearn.metrics import make_scorer

    assert isinstance(entry, Mapping)
    kwargs = {k: v for k, v in entry.items() if k not in _OPTIONS}
    return make_scorer(
        metric_function(entry[MAKE_SCORER], f"{path}.{MAKE_SCORER}", policy),
        greater_is_better=entry.get("greater_is_better", True),
        response_method=_response_method(entry.get("response_method", "predict"), f"{path}.response_method"),
        **kwargs,
    )


def scorers(spec: SearchSpec) -> Any:
    """``scoring`` for ``cross_validate``: None, a name, a list of names, or a dict of names/scorers."""
    if isinstance(spec.scoring, Mapping):
        return {key: build_scorer(entry, f"scoring.{key}", spec.policy) for key, entry in spec.scoring.items()}
    return spec.scoring


def refit_scorer(spec: SearchSpec) -> Any:
    """The scorer behind the refit metric, for the holdout (None: the estimator's own ``score``)."""
    return build_scorer(spec.refit_scorer, f"scoring.{spec.refit_metric}", spec.policy)
