"""The Kubernetes backend, kept apart from its operator (as cncf.kubernetes keeps ``utils/`` apart from KPO).

- :mod:`~airflow_grid.kubernetes.pods`: pure helpers over pod objects - what an evaluate pod holds for a plan item
  (arguments, limits, env, labels, volumes, security contexts), why a finished pod failed, manifest validation.
  Imports no Airflow (ruff's banned-API rule and ``tests/test_isolation.py`` check it).
- :mod:`~airflow_grid.kubernetes.backend`: :class:`~airflow_grid.kubernetes.backend.KubernetesBackend`, the
  deployment's pod settings read from ``[airflow_grid] kubernetes_*``, and the operator keyword arguments they make.

The operator itself is :class:`airflow_grid.operators.kubernetes.KubernetesEvaluateOperator`, which re-exports the
names above. Nothing is imported here, so importing :mod:`~airflow_grid.kubernetes.pods` stays free of Airflow.
"""
