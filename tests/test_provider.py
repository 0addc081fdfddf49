"""Airflow discovers the provider: schema-valid provider info whose package name matches the distribution."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from packaging.utils import canonicalize_name

import airflow_grid
from airflow_grid import get_provider_info

ENTRY_POINT_GROUP = "apache_airflow_provider"


def airflow_schema(name: str = "provider_info.schema.json") -> dict[str, Any]:
    """A schema shipped in the airflow package, found without importing airflow (which would read its config).

    ``provider_info.schema.json`` is what Airflow validates at runtime; ``provider.yaml.schema.json`` is the
    stricter schema of provider.yaml files.
    """
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.submodule_search_locations, "apache-airflow is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / name
    schema: dict[str, Any] = json.loads(path.read_text())
    return schema


def our_entry_point() -> importlib.metadata.EntryPoint:
    entry_points = [
        ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.module == "airflow_grid"
    ]
    assert len(entry_points) == 1, entry_points
    return entry_points[0]


def test_provider_info_validates_against_airflow_schema() -> None:
    schema = airflow_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(get_provider_info())


def test_config_section_validates_against_the_provider_yaml_schema() -> None:
    """The stricter provider.yaml schema too; its option schema misspells additionalProperties, so check keys."""
    schema = airflow_schema("provider.yaml.schema.json")
    config_schema = {**schema["properties"]["config"], "definitions": schema["definitions"]}
    config = get_provider_info()["config"]
    jsonschema.validators.validator_for(config_schema)(config_schema).validate(config)
    option_fields = set(schema["definitions"]["option"]["properties"])
    assert list(config) == ["airflow_grid"]
    for name, option in config["airflow_grid"]["options"].items():
        assert set(option) <= option_fields, name
        assert set(schema["definitions"]["option"]["required"]) <= set(option), name


def test_provider_info_uses_only_known_fields() -> None:
    # The runtime schema allows additional properties, so a misspelt field would otherwise pass unnoticed.
    known = set(airflow_schema()["properties"]) | set(airflow_schema("provider.yaml.schema.json")["properties"])
    assert set(get_provider_info()) <= known


def test_entry_point_matches_distribution() -> None:
    entry_point = our_entry_point()
    assert entry_point.value == "airflow_grid:get_provider_info"
    assert entry_point.load()() == get_provider_info()
    dist = entry_point.dist
    assert dist is not None
    info = get_provider_info()
    # Airflow compares the canonical distribution name with package-name and refuses a mismatch.
    assert info["package-name"] == canonicalize_name(dist.metadata["Name"]) == "airflow-grid"
    assert info["versions"][0] == dist.version == airflow_grid.__version__


def test_airflow_providers_list_shows_airflow_grid(tmp_path: Path) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    completed = subprocess.run(
        [str(airflow), "providers", "list", "--output", "json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    providers = {row["package_name"]: row for row in json.loads(completed.stdout[completed.stdout.index("[") :])}
    assert providers["airflow-grid"]["version"] == airflow_grid.__version__


@pytest.mark.parametrize("field", ["package-name", "name", "description", "versions", "config"])
def test_provider_info_fields_are_filled(field: str) -> None:
    assert get_provider_info()[field]
