"""airflow_grid: resource-safe scikit-learn grid search as an Apache Airflow 3 provider.

This module imports nothing heavy: Airflow calls :func:`get_provider_info` inside ``import airflow``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    """Provider metadata for Airflow's provider registry (validated against its schema in the tests)."""
    return {
        "package-name": "airflow-grid",
        "name": "Airflow Grid",
        "description": "Resource-safe distributed scikit-learn grid search: mapped tasks, pools, "
        "Kubernetes pods with limits, MLflow tracking.",
        "versions": [__version__],
    }
