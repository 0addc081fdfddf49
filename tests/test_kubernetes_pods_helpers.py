"""The pure pod helpers (:mod:`airflow_grid.kubernetes.pods`) on their own: plain data in, kubernetes models out.

The pods they add up to are checked through the operator in ``test_kubernetes_pod.py``; here each helper's own
contract, with no operator, no Airflow and no cluster.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import models as k8s

from airflow_grid.errors import SpecError
from airflow_grid.kubernetes import pods
from airflow_grid.launch import MEMORY_ENV

ITEM: dict[str, Any] = {
    "plan_uri": "/store/plans/p1/",
    "indices": [3, 4],
    "label": "C=1 | C=2",
    "cpu": "2",
    "memory": "1Gi",
}


@pytest.mark.parametrize(
    ("memory", "factor", "cap", "tries", "expected"),
    [
        pytest.param("100Mi", 4.0, None, 1, None, id="first-try"),
        pytest.param("100Mi", 1.0, None, 3, None, id="factor-1"),
        pytest.param("100Mi", 2.0, None, 2, (200 * 2**20, 400 * 2**20), id="second-try"),
        pytest.param("100Mi", 4.0, None, 3, (400 * 2**20, 400 * 2**20), id="default-cap-4x"),
        pytest.param("100Mi", 4.0, "1Gi", 3, (2**30, 2**30), id="given-cap"),
    ],
)
def test_retry_memory(
    memory: str, factor: float, cap: str | None, tries: int, expected: tuple[int, int] | None
) -> None:
    assert pods.retry_memory(memory, factor, cap, tries) == expected


def test_candidate_env_carries_the_budget_and_refuses_bad_quantities() -> None:
    env = pods.candidate_env(ITEM)
    assert env[MEMORY_ENV] == str(2**30) and env["AIRFLOW_GRID_N_JOBS"] == "2" and env["OMP_NUM_THREADS"] == "1"
    with pytest.raises(SpecError, match=r"resources\.memory"):
        pods.candidate_env({**ITEM, "memory": "lots"})


def test_candidate_labels_name_plan_candidate_and_later_rounds_only() -> None:
    assert pods.candidate_labels(ITEM) == {
        "app.kubernetes.io/name": "airflow-grid",
        "airflow-grid/plan": "p1",
        "airflow-grid/candidate": "3-4",
    }
    assert pods.candidate_labels({**ITEM, "round": 2})["airflow-grid/round"] == "2"


def test_candidate_resources_are_guaranteed() -> None:
    resources = pods.candidate_resources(ITEM)
    assert resources.requests == resources.limits == {"cpu": "2", "memory": "1Gi"}
    assert resources.requests is not resources.limits  # a retry replaces one without aliasing the other


def test_pod_volumes_order_scratch_store_extra() -> None:
    extra = (k8s.V1Volume(name="host-0"), k8s.V1VolumeMount(name="host-0", mount_path="/opt"))
    volumes, mounts = pods.pod_volumes(pods.StoreVolume(mount_path="/store", claim_name="grid"), [extra])
    assert [v.name for v in volumes] == [m.name for m in mounts] == ["scratch", "airflow-grid-store", "host-0"]
    assert volumes[1].persistent_volume_claim.claim_name == "grid"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, {}, id="none"),
        pytest.param({"A": 1}, {"A": "1"}, id="mapping"),
        pytest.param([k8s.V1EnvVar(name="A", value="b")], {"A": "b"}, id="env-vars"),
    ],
)
def test_env_dict(value: Any, expected: dict[str, str]) -> None:
    assert pods.env_dict(value) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        pytest.param(None, pods.XCOM_SIDECAR_RESOURCES, id="none-given"),
        pytest.param({"requests": {"cpu": "1m"}}, pods.XCOM_SIDECAR_RESOURCES, id="requests-only"),
        pytest.param({"limits": {"cpu": "1", "memory": "1Gi"}}, None, id="connection-limits-kept"),
    ],
)
def test_limit_sidecar(given: Any, expected: dict[str, str] | None) -> None:
    sidecar = k8s.V1Container(name="airflow-xcom-sidecar", resources=given)
    base = k8s.V1Container(name="base")
    pod = pods.limit_sidecar(k8s.V1Pod(spec=k8s.V1PodSpec(containers=[base, sidecar])), "airflow-xcom-sidecar")
    if expected is None:
        assert sidecar.resources == given
    else:
        assert sidecar.resources.limits == sidecar.resources.requests == expected
    assert pod.spec.containers[0].resources is None  # only the sidecar is touched
