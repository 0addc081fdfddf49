"""The deployment's settings: Airflow's ``[airflow_grid]`` configuration section (Airflow side only).

The options and their defaults are declared once, in :func:`airflow_grid.get_provider_info`, so Airflow lists them
(``airflow config list --section airflow_grid``) and reads them from ``airflow.cfg``,
``AIRFLOW__AIRFLOW_GRID__<OPTION>`` or a secrets backend. Per option, first that applies:

1. a value Airflow's configuration gives that differs from the option's default;
2. the legacy ``AIRFLOW_GRID_*`` environment variable, if set and not empty (deployments that predate the section);
3. the default.

The worker never imports this module: what it needs travels as arguments or in the plan (the policy does).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from airflow.sdk import conf

from airflow_grid import SECTION, get_provider_info
from airflow_grid.policy import ALLOWED_CALLABLES_ENV, ALLOWED_TARGETS_ENV, FILE_PARAMS_ENV, Policy
from airflow_grid.store import STORE_ENV

LEGACY_ENV: dict[str, str] = {
    "store": STORE_ENV,
    "allowed_targets": ALLOWED_TARGETS_ENV,
    "allowed_callables": ALLOWED_CALLABLES_ENV,
    "allow_file_params": FILE_PARAMS_ENV,
    **{
        f"kubernetes_{name}": f"AIRFLOW_GRID_K8S_{name.upper()}"
        for name in (
            *("image", "namespace", "conn_id", "config_file", "image_pull_policy", "service_account"),
            *("worker_command", "store_path", "store_claim", "store_host_path", "host_mounts", "deferrable"),
            *("memory_retry_factor", "memory_cap"),
        )
    },
}
"""Option → the environment variable that configured it before the ``[airflow_grid]`` section existed."""

MLFLOW_UI_DEFAULT = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` / ``mlflow server`` serve by default."""

_TRUE = ("1", "true", "t", "yes")
_FALSE = ("0", "false", "f", "no", "")


def get(option: str, environ: Mapping[str, str] | None = None) -> str:
    """The option's value (see the module docstring for the order); ``environ`` replaces ``os.environ``."""
    options = get_provider_info()["config"][SECTION]["options"]
    if option not in options:
        raise KeyError(f"[{SECTION}] has no option {option!r}; the options are {sorted(options)}.")
    env = os.environ if environ is None else environ
    value = conf.get(SECTION, option, fallback=None)
    if value is not None and value != conf.get_default_value(SECTION, option, fallback=None):
        return str(value)
    legacy = env.get(LEGACY_ENV.get(option, ""), "")
    if legacy:
        return legacy
    home = env.get("AIRFLOW_HOME") or str(Path.home() / "airflow")  # as Airflow and store.default_root expand it
    return str(options[option]["default"]).replace("{AIRFLOW_HOME}", home)


def flag(option: str, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean option: ``True``/``False`` as Airflow writes them; ``1``/``yes`` as the legacy variables took."""
    value = get(option, environ).strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(_invalid(option, value, "True or False"))
    return value in _TRUE


def number(option: str, kind: type[int] | type[float], environ: Mapping[str, str] | None = None) -> float:
    """An integer or float option, with an error that names the option, the value and how to set it."""
    value = get(option, environ)
    try:
        return kind(value)
    except ValueError:
        raise ValueError(_invalid(option, value, f"a number ({kind.__name__})")) from None


def _invalid(option: str, value: str, expected: str) -> str:
    legacy = f" or ${LEGACY_ENV[option]}" if option in LEGACY_ENV else ""
    return (
        f"[{SECTION}] {option}: got {value!r}; expected {expected}. Fix: set {option} in airflow.cfg, "
        f"AIRFLOW__{SECTION.upper()}__{option.upper()}{legacy}."
    )


def store() -> str:
    """Root of the result store for the plan operator (and whatever else runs on the Airflow side)."""
    return get("store")


def policy(extra_prefixes: Sequence[str] = ()) -> Policy:
    """What a spec may build in this deployment, plus a DAG's own ``extra_allowed`` prefixes."""
    return Policy.configured(
        extra_prefixes,
        targets=get("allowed_targets"),
        callables=get("allowed_callables"),
        allow_file_params=flag("allow_file_params"),
    )


def default_pool() -> str:
    return get("default_pool")


def max_child_runs() -> int:
    count = int(number("max_child_runs", int))
    if count < 0:
        raise ValueError(_invalid("max_child_runs", str(count), "a whole number >= 0"))
    return count


def mlflow_ui_url() -> str:
    """Base URL of the MLflow UI: the option; else the tracking URI if it is a server; else ``mlflow ui``'s."""
    from airflow_grid.tracking import tracking_uri

    configured = get("mlflow_ui_url")
    if configured:
        return configured.rstrip("/")
    uri = tracking_uri()
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else MLFLOW_UI_DEFAULT
