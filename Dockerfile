# The worker image: what a Kubernetes pod needs to evaluate or refit candidates, and nothing more.
# No Airflow, no MLflow: results go back through KPO's xcom sidecar and are logged on the Airflow side.
#   docker build -t airflow-grid-worker:0.1.0 .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libgomp1: OpenMP runtime used by scikit-learn's compiled estimators.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/airflow-grid
COPY pyproject.toml README.md constraints.txt ./
COPY airflow_grid ./airflow_grid
# Only the worker's dependencies: the package itself is installed without its Airflow/MLflow requirements.
RUN pip install --no-deps . \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['worker']))" \
        | xargs -d '\n' pip install --constraint constraints.txt \
    && python -c "import airflow_grid.worker, sys; assert 'airflow' not in sys.modules and 'mlflow' not in sys.modules"

# Non-root, with a writable scratch dir only (the pod mounts an emptyDir at /tmp; the root fs is read-only).
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin worker
USER 10001
ENV TMPDIR=/tmp JOBLIB_TEMP_FOLDER=/tmp
ENTRYPOINT ["python", "-m", "airflow_grid.worker"]
