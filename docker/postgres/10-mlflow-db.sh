#!/usr/bin/env bash
# Runs once, when the postgres image initialises an empty data volume (/docker-entrypoint-initdb.d): creates the
# role and database of MLflow's backend store next to Airflow's. Two databases because both applications keep
# their schema version in an alembic_version table, so they cannot share one; one server because it is one
# service to run and back up. On an existing volume this script does not run again: create them by hand
# (the same two statements, as the airflow superuser).
set -e
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set}"
psql --set=ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set=mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
