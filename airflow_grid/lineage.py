"""OpenLineage names for what a study reads and what a refit registers.

The naming is pure and follows the OpenLineage naming spec (https://openlineage.io/docs/spec/naming), so the
dataset a study reads joins the same dataset written by another job: ``s3://bucket`` + key, ``gs://bucket`` + key,
``file`` + absolute path, ``hdfs://host:port`` + path. A ``_target_`` loader (``sklearn.datasets.load_digits``) has
no storage location; it is named after the loader in the ``python`` namespace. A registered model is
``mlflow://<tracking host, or local>`` + ``models/<study>/<version>``.

Only :meth:`Lineage.to_operator_lineage` touches OpenLineage, and it imports the provider inside the call: without
``apache-airflow-providers-openlineage`` it returns ``None`` and nothing else changes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

LOADER_NAMESPACE = "python"
FACET_NAME = "airflowGrid"  # custom facets carry their producer's prefix (OpenLineage spec)
_OBJECT_STORES = {"s3": "s3", "s3a": "s3", "s3n": "s3", "gs": "gs", "gcs": "gs", "abfss": "abfss", "wasbs": "wasbs"}
_FORMATS = (".csv", ".parquet", ".npz")  # as the spec infers data.format from the path
_CONTAINER_AT_ACCOUNT = {"abfs", "abfss", "wasb", "wasbs"}  # their user@ part is the container, not a login


@dataclass(frozen=True)
class LineageDataset:
    """One dataset as OpenLineage names it, plus what airflow-grid knows about it (the ``airflowGrid`` facet)."""

    namespace: str
    name: str
    version: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lineage:
    """A task's inputs and outputs; small enough to keep on the operator between ``execute`` and the hook."""

    inputs: tuple[LineageDataset, ...] = ()
    outputs: tuple[LineageDataset, ...] = ()

    def to_operator_lineage(self) -> Any | None:
        """The provider's ``OperatorLineage``, or ``None`` when the OpenLineage provider is not installed."""
        try:
            from airflow.providers.openlineage.extractors import OperatorLineage  # noqa: TID251  (lazy, optional)
        except ImportError:
            return None
        return OperatorLineage(
            inputs=[_to_openlineage(dataset, output=False) for dataset in self.inputs],
            outputs=[_to_openlineage(dataset, output=True) for dataset in self.outputs],
        )


def location_name(uri: str) -> tuple[str, str]:
    """``(namespace, name)`` of a file path or fsspec URL; credentials, query and fsspec chaining are dropped."""
    uri = uri.rsplit("::", 1)[-1]  # simplecache::s3://b/k reads s3://b/k
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file", "local") or len(scheme) == 1:  # a plain path, file:// URL or a Windows drive
        host = parts.hostname if scheme == "file" else None
        if host and host != "localhost":
            return f"file://{host}", unquote(parts.path)
        path = unquote(parts.path) if scheme in ("file", "local") else uri
        return "file", os.path.abspath(path)
    host = parts.netloc if scheme in _CONTAINER_AT_ACCOUNT else parts.netloc.rpartition("@")[2]  # no user:pw@
    if scheme in _OBJECT_STORES:
        return f"{_OBJECT_STORES[scheme]}://{host}", parts.path.lstrip("/")
    if not host:
        return scheme, parts.path
    return f"{scheme}://{host}", parts.path or "/"


def data_dataset(data: Mapping[str, Any], dataset_version: str | None, fingerprint: str | None) -> LineageDataset:
    """The dataset a spec's ``data`` reads: its (rendered) ``path``, or the ``_target_`` loader it calls."""
    facts: dict[str, Any] = {"fingerprint": fingerprint}
    if isinstance(data.get("path"), str):
        namespace, name = location_name(data["path"])
        facts["format"] = data.get("format") or (name.rpartition(".")[2] if name.endswith(_FORMATS) else None)
    else:
        namespace, name = LOADER_NAMESPACE, str(data.get("_target_"))
        facts["loaderKwargs"] = {key: value for key, value in data.items() if key != "_target_"} or None
    return LineageDataset(namespace, name, dataset_version, {k: v for k, v in facts.items() if v is not None})


def tracking_namespace(tracking_uri: str) -> str:
    """``mlflow://<host[:port]>`` of a tracking/registry URI; ``mlflow://local`` for sqlite and file stores."""
    parts = urlsplit(tracking_uri)
    if parts.scheme.startswith("databricks"):  # databricks://<profile>: a profile name, not a host
        return "mlflow://databricks"
    if parts.hostname:
        return f"mlflow://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return "mlflow://local"


def model_dataset(tracking_uri: str, registered: Mapping[str, Any]) -> LineageDataset:
    """The registered model version a refit wrote (``registered`` is what ``tracking.log_refit`` returns)."""
    model, version = registered["model_name"], str(registered["version"])
    facts = {
        "modelUri": f"models:/{model}/{version}",
        "refitRunId": registered.get("refit_run_id"),
        "promoted": registered.get("promoted"),
        "championVersion": registered.get("champion_version"),
    }
    kept = {key: value for key, value in facts.items() if value is not None}
    return LineageDataset(tracking_namespace(tracking_uri), f"models/{model}/{version}", version, kept)


def plan_lineage(plan_document: Mapping[str, Any], dataset_version: str | None) -> Lineage:
    """What a plan read: its spec's ``data`` (``data.path`` as rendered for the run) at ``dataset_version``."""
    return Lineage(inputs=(_plan_data(plan_document, dataset_version),))


def refit_lineage(plan_document: Mapping[str, Any], registered: Mapping[str, Any], tracking_uri: str) -> Lineage:
    """A refit trained on its study's dataset (at the version the study recorded) and registered a model."""
    dataset = _plan_data(plan_document, registered.get("dataset_version"))
    return Lineage(inputs=(dataset,), outputs=(model_dataset(tracking_uri, registered),))


def _plan_data(plan_document: Mapping[str, Any], dataset_version: str | None) -> LineageDataset:
    return data_dataset(plan_document["spec"]["data"], dataset_version, plan_document.get("data_fingerprint"))


def _to_openlineage(dataset: LineageDataset, *, output: bool) -> Any:
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import dataset_version_dataset

    facets: dict[str, Any] = {}
    if dataset.version:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=dataset.version)
    if dataset.facts:
        facets[FACET_NAME] = _facet_class()(**dataset.facts)
    kind = OutputDataset if output else InputDataset
    return kind(namespace=dataset.namespace, name=dataset.name, facets=facets)


@functools.cache
def _facet_class() -> Any:
    """The ``airflowGrid`` dataset facet class, built on first use so this module imports no OpenLineage."""
    import attr
    from openlineage.client.facet_v2 import DatasetFacet

    @attr.define
    class AirflowGridDatasetFacet(DatasetFacet):
        """airflow-grid's facts about a dataset: what the study read (its sha256 fingerprint, format, the loader's
        arguments), or the registered model (its ``models:/`` URI, refit run, whether the gate promoted it)."""

        fingerprint: str | None = None
        format: str | None = None
        loaderKwargs: dict[str, Any] | None = None  # OpenLineage facet fields are camelCase
        modelUri: str | None = None
        refitRunId: str | None = None
        promoted: bool | None = None
        championVersion: str | None = None

    return AirflowGridDatasetFacet
