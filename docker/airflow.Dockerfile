# The Airflow image of docker-compose.yaml: the official Airflow 3.3.2 image plus airflow-grid, installed with the
# pins of constraints.txt (the versions CI tests together). The compose stack also runs the MLflow server from it,
# so the server and the tasks logging to it share one MLflow version and the image's psycopg2.
#   docker compose build    (context: the repository root; see .dockerignore)
FROM apache/airflow:3.3.2-python3.11

# Mount points of the stack's named volumes. Docker seeds an empty named volume with the ownership of the image's
# directory, so they are created here for the image's airflow user (uid 50000, gid 0), which runs every service.
USER root
RUN install -d -o airflow -g root -m 0775 /opt/airflow-grid/store /opt/airflow/auth /opt/mlflow/artifacts
USER airflow

COPY --chown=airflow:root pyproject.toml README.md constraints.txt /opt/airflow-grid/src/
COPY --chown=airflow:root airflow_grid /opt/airflow-grid/src/airflow_grid
# constraints.txt pins apache-airflow==3.3.2, so pip cannot move the base image's Airflow; pip check fails the
# build if a pin conflicts with a provider the base image ships.
RUN pip install --no-cache-dir --constraint /opt/airflow-grid/src/constraints.txt /opt/airflow-grid/src \
    && pip check
