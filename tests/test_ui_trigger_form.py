"""The trigger form as a person uses it: the real Airflow 3.3 UI in Debian's headless Chromium, over a real
``airflow standalone`` (tests/standalone.py).

The test logs in through the simple auth manager's login form (user ``admin``, the password ``airflow standalone``
generated), opens ``grid_search_nightly``'s trigger form (an iris spec here, so the run takes seconds), reads the
sections, labels and descriptions the Params produce, types a param grid, a cv and a dataset version into the
fields, submits, and waits for the run (REST) and for the overrides on the MLflow parent run. Then it shows that
the form refuses bad input with no run created: a malformed param grid disables the Trigger button in the page;
``cv = 1`` (``minimum: 2``) and a dataset version with a space come back as the API's 400, shown in the dialog.

Selenium drives ``/usr/bin/chromium`` through ``/usr/bin/chromedriver`` (Debian's ``chromium`` and
``chromium-driver``); both paths are given, so Selenium Manager never looks for a browser. Without them the test
is skipped, or fails with ``AIRFLOW_GRID_REQUIRE_UI=1`` (set by ``.ci/run``). Screenshots (form filled, error,
after submit, run page) go to ``$AIRFLOW_GRID_UI_ARTIFACTS`` or the test's tmp dir; the test prints their paths and
what it saw (``-s`` or ``-rP``). 1-2 minutes on 2 cores, most of it the server's start and stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import pytest
import yaml
from standalone import Airflow, run_standalone

pytestmark = [pytest.mark.ui, pytest.mark.scheduler]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE_UI = "AIRFLOW_GRID_REQUIRE_UI"
ARTIFACTS = "AIRFLOW_GRID_UI_ARTIFACTS"
DAG_ID = "grid_search_nightly"
STUDY = "ui-iris"
OVERRIDES = "Overrides (empty = the DAG's spec file)"  # the section of dag_factory.search_params()
DEFAULT_SECTION = "Run Parameters"  # where the UI puts params without a section (dataset_version, max_parallel)
ADVANCED = "Advanced Options"  # run id, note, and the whole conf as JSON
WAIT = 30.0  # seconds for any element
DIALOG = "//*[@role='dialog']"  # the trigger form's modal
FIELD = "//*[@id='element_{}']"  # the input the UI renders for a param

DAG_FILE = '''\
"""grid_search_nightly over a small iris spec (written by tests/test_ui_trigger_form.py).

Unscheduled here: the shipped DAG's cron schedule would start a run as soon as it is unpaused.
"""

from pathlib import Path

from airflow_grid.dag_factory import grid_search_dag

dag = grid_search_dag(
    "grid_search_nightly", Path(__file__).parent / "specs" / "iris.yaml", refit_dag_id=None, retries=0, doc_md=__doc__
)
'''

T = TypeVar("T")


# --- the server and the browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser_binaries() -> None:
    """Skip (or fail, with AIRFLOW_GRID_REQUIRE_UI=1) before anything starts when Debian's Chromium is missing."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"{' and '.join(missing)} missing: apt-get install chromium chromium-driver"
        if os.environ.get(REQUIRE_UI) == "1":
            pytest.fail(f"{message} ({REQUIRE_UI}=1: the UI test is required)")
        pytest.skip(f"{message}; set {REQUIRE_UI}=1 to fail instead of skipping")


def write_dag(root: Path) -> None:
    """The DAG file, its spec (3 candidates x 5 folds) and iris as CSV under two dataset versions."""
    from sklearn.datasets import load_iris

    data, specs = root / "data", root / "dags" / "specs"
    data.mkdir(parents=True)
    specs.mkdir(parents=True)
    frame = load_iris(as_frame=True).frame
    frame.columns = ["sepal_length", "sepal_width", "petal_length", "petal_width", "target"]
    for version in ("v1", "ui-v2"):
        frame.to_csv(data / f"iris-{version}.csv", index=False)
    spec = {
        "name": STUDY,
        "data": {"path": f"{data}/iris-{{{{ dataset_version }}}}.csv", "target": "target"},
        "estimator": {"_target_": "sklearn.svm.SVC"},
        "param_grid": {"C": [0.1, 1, 10]},
        "cv": 5,
        "scoring": "accuracy",
        "resources": {"cpu": 1, "memory": "1Gi"},
    }
    (specs / "iris.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (root / "dags" / "nightly.py").write_text(DAG_FILE)


@pytest.fixture(scope="module")
def airflow(browser_binaries: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Airflow]:
    root = tmp_path_factory.mktemp("standalone-ui")
    write_dag(root)
    with run_standalone(root, pool="grid_fits", pool_slots=2, parallelism=4) as server:
        yield server


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where a test's screenshots go: $AIRFLOW_GRID_UI_ARTIFACTS/<test name> (.ci/run: test-artifacts/ui), else
    the test's tmp dir."""
    root = os.environ.get(ARTIFACTS)
    target = Path(root) / request.node.name if root else tmp_path / "ui-artifacts"
    target.mkdir(parents=True, exist_ok=True)
    print(f"\n    screenshots under {target.resolve()}")
    return target.resolve()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium from Debian's packages; nothing is downloaded (both binaries are given explicitly)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,2400", "--lang=en-US",
    ):  # fmt: skip
        options.add_argument(argument)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


# --- a person's actions, with explicit waits ------------------------------------------------------------------------


class Page:
    """The browser as a person uses it: find what is shown, click, type; every wait explicit and named."""

    def __init__(self, driver: Any, artifacts: Path) -> None:
        self.driver = driver
        self.artifacts = artifacts
        self.shots: list[Path] = []

    def wait(self, what: str, condition: Callable[[Any], T], timeout: float = WAIT) -> T:
        """``condition(driver)`` until truthy; stale or missing elements are retried; a named timeout otherwise."""
        from selenium.common.exceptions import (
            ElementNotInteractableException,
            NoSuchElementException,
            StaleElementReferenceException,
            TimeoutException,
        )
        from selenium.webdriver.support.wait import WebDriverWait

        ignored = (NoSuchElementException, StaleElementReferenceException, ElementNotInteractableException)
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.25, ignored_exceptions=ignored).until(condition)
        except TimeoutException:
            message = f"timed out after {timeout:.0f}s waiting for {what} (at {self.driver.current_url})"
            raise AssertionError(message) from None

    def find(self, what: str, xpath: str, timeout: float = WAIT) -> Any:
        """The first displayed element matching ``xpath``."""

        def displayed(driver: Any) -> Any:
            return next((e for e in driver.find_elements("xpath", xpath) if e.is_displayed()), None)

        return self.wait(what, displayed, timeout)

    def click(self, what: str, xpath: str) -> None:
        """Click once the element is shown and enabled (re-found if React replaced it meanwhile)."""

        def clicked(driver: Any) -> bool:
            element = self.find(what, xpath)
            if not element.is_enabled():
                return False
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
            element.click()
            return True

        self.wait(f"{what} to be clickable", clicked)

    def type_into(self, what: str, xpath: str, text: str) -> None:
        """Select what the field holds, delete it and type ``text`` key by key, as a person does."""
        from selenium.webdriver.common.keys import Keys

        def typed(driver: Any) -> bool:
            element = self.find(what, xpath)
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
            element.click()
            element.send_keys(Keys.CONTROL, "a")
            element.send_keys(Keys.BACKSPACE)
            element.send_keys(text)
            return same_value(self.find(what, xpath).get_attribute("value"), text)

        self.wait(f"{what} to hold {text!r}", typed)

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{len(self.shots) + 1:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        self.shots.append(path)
        print(f"    screenshot: {path}")
        return path

    @contextlib.contextmanager
    def evidence(self) -> Iterator[None]:
        """On any failure: a screenshot and the page's HTML beside the others, named in the error."""
        try:
            yield
        except BaseException as error:
            with contextlib.suppress(Exception):
                shot = self.screenshot("FAILURE")
                (self.artifacts / "FAILURE.html").write_text(self.driver.page_source)
                error.add_note(f"screenshot at failure: {shot}; page HTML: {self.artifacts / 'FAILURE.html'}")
            raise


def same_value(shown: str | None, typed: str) -> bool:
    """Whether a field shows what was typed; a JSON field re-displays valid JSON pretty-printed."""
    if shown == typed:
        return True
    try:
        return bool(json.loads(shown or "") == json.loads(typed))
    except ValueError:
        return False


def button(label: str, scope: str = "") -> str:
    """XPath of a button whose visible text is ``label`` (icons around it allowed)."""
    return f"{scope}//button[normalize-space(.)={json.dumps(label)}]"


def log_in(page: Page, base: str, password: str) -> None:
    """Open the DAG's page; the UI sends a person without a token to the login form; sign in as ``admin``."""
    page.driver.get(f"{base}/dags/{DAG_ID}")
    page.type_into("the login form's username", "//input[@name='username']", "admin")
    page.type_into("the login form's password", "//input[@name='password']", password)
    page.click("the Sign in button", button("Sign in"))
    page.wait(
        f"{DAG_ID}'s page after login", lambda d: "/auth/" not in d.current_url and f"/dags/{DAG_ID}" in d.current_url
    )
    page.find(f"{DAG_ID}'s Trigger button", button("Trigger"))


def open_trigger_form(page: Page, base: str) -> None:
    """The DAG page's Trigger button → the dialog with its param form (the page is reloaded: a fresh form)."""
    page.driver.get(f"{base}/dags/{DAG_ID}")
    page.click(f"{DAG_ID}'s Trigger button", button("Trigger"))
    page.find("the trigger dialog's param form", f"{DIALOG}//*[@data-testid='config-form']")
    page.find(f"the section {DEFAULT_SECTION!r}", section_trigger(DEFAULT_SECTION))


def section_trigger(title: str) -> str:
    return f"{DIALOG}//button[@aria-expanded][normalize-space(.)={json.dumps(title)}]"


def show_section(page: Page, title: str) -> None:
    """Expand a section of the form (the UI keeps one open at a time: opening one closes the others)."""

    def expanded(driver: Any) -> bool:
        trigger = page.find(f"the section {title!r}", section_trigger(title))
        if trigger.get_attribute("aria-expanded") != "true":
            trigger.click()
            return False
        return True

    page.wait(f"the section {title!r} expanded", expanded)


def section_of(param: str) -> str:
    return DEFAULT_SECTION if param in ("dataset_version", "max_parallel") else OVERRIDES


def read_form(page: Page) -> dict[str, Any]:
    """What the open form shows: section titles, and per field its label, description and the input's id."""
    script = """
        const form = document.querySelector("[role=dialog] [data-testid=config-form]");
        const sections = [...form.querySelectorAll("button[aria-expanded]")].map(b => b.innerText.trim());
        const fields = [...form.querySelectorAll("[id^=element_]")].map(input => {
            const row = input.closest("[data-part=root]");
            const text = sel => row && row.querySelector(sel) ? row.querySelector(sel).innerText.trim() : null;
            return {id: input.id, tag: input.tagName.toLowerCase(), label: text("label"),
                    description: text("[data-part=helper-text]")};
        });
        return {sections, fields};
    """
    return dict(page.wait("the form's sections and fields", lambda d: d.execute_script(script)))


def fill_overrides(page: Page, values: dict[str, str]) -> None:
    """Type each value (JSON for the param-grid and cv text areas, plain text for the dataset version)."""
    for name, text in values.items():
        show_section(page, section_of(name))
        page.type_into(f"the {name} field", DIALOG + FIELD.format(name), text)


def field_errors(page: Page) -> list[str]:
    script = """return [...document.querySelectorAll("[role=dialog] [data-part=error-text]")]
                    .map(e => e.innerText.trim()).filter(Boolean);"""
    return list(page.driver.execute_script(script))


def trigger_button(page: Page) -> Any:
    """The dialog's own Trigger button (the DAG page has one too, under the dialog)."""
    return page.find("the dialog's Trigger button", button("Trigger", DIALOG))


def new_run(airflow: Airflow, before: set[str], timeout: float = 60) -> dict[str, Any]:
    """The one run that appeared since ``before`` (REST)."""
    deadline = time.monotonic() + timeout
    while not (runs := [r for r in airflow.dag_runs(DAG_ID) if r["dag_run_id"] not in before]):
        assert time.monotonic() < deadline, f"no new {DAG_ID} run {timeout:.0f}s after the form was submitted"
        time.sleep(0.5)
    assert len(runs) == 1, f"one submission, {len(runs)} runs: {[r['dag_run_id'] for r in runs]}"
    return runs[0]


def run_ids(airflow: Airflow) -> set[str]:
    return {run["dag_run_id"] for run in airflow.dag_runs(DAG_ID)}


def admin_password(airflow: Airflow) -> str:
    """What `airflow standalone` generated for the simple auth manager's ``admin`` user."""
    path = airflow.root / "home" / "simple_auth_manager_passwords.json.generated"
    return str(json.loads(path.read_text())["admin"])


def base_url(airflow: Airflow) -> str:
    return str(airflow.api.base_url).rstrip("/")


# --- the tests ------------------------------------------------------------------------------------------------------


def check_form(page: Page) -> None:
    """The override sections, labels and descriptions the Params produce, as shown; printed."""
    seen = read_form(page)
    print(f"    sections: {seen['sections']}")
    for field in seen["fields"]:
        print(f"    field {field['id']} <{field['tag']}>: {field['label']!r} - {field['description']!r}")
    fields = {f["id"].removeprefix("element_"): f for f in seen["fields"]}
    assert seen["sections"][:2] == [OVERRIDES, DEFAULT_SECTION], seen["sections"]
    assert {"spec", "spec_path", "param_grid", "cv", "scoring", "resources", "backend", "dataset_version"} <= set(
        fields
    )
    assert (fields["spec"]["label"], fields["spec_path"]["label"]) == ("Whole spec", "Spec file")
    assert fields["dataset_version"]["label"] == "Dataset version"
    assert fields["cv"]["description"] == "Number of folds (>= 2) or a splitter object spec."
    assert fields["param_grid"]["description"].startswith("Replaces param_grid")  # description_md, rendered
    assert (fields["param_grid"]["tag"], fields["cv"]["tag"]) == ("textarea", "textarea")  # JSON typed as text


def check_mlflow(airflow: Airflow, run_id: str) -> None:
    """The overrides and the dataset version typed into the form, as tags of the study's MLflow parent run."""
    tags = airflow.parent_run(STUDY, DAG_ID, run_id).data.tags
    shown = ("overrides", "dataset_version", "dataset_version_source", "n_candidates")
    print("    MLflow parent run tags: " + ", ".join(f"{key}={tags[f'airflow_grid.{key}']}" for key in shown))
    assert json.loads(tags["airflow_grid.overrides"]) == ["param_grid", "cv"]
    assert tags["airflow_grid.dataset_version"] == "ui-v2"
    assert tags["airflow_grid.dataset_version_source"] == "conf"
    assert tags["airflow_grid.n_candidates"] == "2"  # the form's grid, not the spec's three values of C


def test_form_overrides_reach_the_mlflow_run(airflow: Airflow, browser: Any, artifacts: Path) -> None:
    page, base = Page(browser, artifacts), base_url(airflow)
    typed = {"param_grid": '{"C": [0.5, 5]}', "cv": "3", "dataset_version": "ui-v2"}
    print(f"\n[ui] {DAG_ID}'s trigger form at {base}")
    with page.evidence():
        log_in(page, base, admin_password(airflow))
        open_trigger_form(page, base)
        page.screenshot("form-opened")
        check_form(page)
        fill_overrides(page, typed)
        assert trigger_button(page).is_enabled(), f"Trigger disabled with valid input; errors {field_errors(page)}"
        for section, name in ((OVERRIDES, "overrides"), (DEFAULT_SECTION, "run-parameters"), (ADVANCED, "conf")):
            show_section(page, section)
            page.screenshot(f"filled-{name}")
        before = run_ids(airflow)
        page.click("the dialog's Trigger button", button("Trigger", DIALOG))
        page.find("the 'Dag Run Triggered' notice", "//*[normalize-space(.)='Dag Run Triggered']")
        page.wait("the new run's page", lambda d: f"/dags/{DAG_ID}/runs/" in d.current_url)
        page.screenshot("after-submit")
        shown_run_id = unquote(page.driver.current_url.split("/runs/", 1)[1].split("?")[0])

        run = airflow.wait_for_run(DAG_ID, new_run(airflow, before)["dag_run_id"])
        print(f"    run {run['dag_run_id']}: {run['state']} ({run['run_type']}, triggered_by {run['triggered_by']})")
        print(f"    conf: {json.dumps(run['conf'])}")
        assert run["dag_run_id"] == shown_run_id
        assert (run["state"], run["triggered_by"]) == ("success", "ui")
        assert (run["conf"]["param_grid"], run["conf"]["cv"]) == ({"C": [0.5, 5]}, 3)
        assert run["conf"]["dataset_version"] == "ui-v2"
        check_mlflow(airflow, run["dag_run_id"])

        page.driver.get(f"{base}/dags/{DAG_ID}/runs/{quote(shown_run_id, safe='')}")
        page.find("the run's state 'Success'", "//*[normalize-space(.)='Success']")
        page.screenshot("run-succeeded")


def submit_refused(page: Page, base: str, param: str, text: str) -> str:
    """Open a fresh form, type one bad value, submit: the API's 400 is shown in the dialog; returns its message."""
    open_trigger_form(page, base)
    fill_overrides(page, {param: text})
    page.click("the dialog's Trigger button", button("Trigger", DIALOG))
    shown = f"{DIALOG}//*[text()[contains(., 'Invalid input for param {param}')]]"
    message = str(page.find(f"the dialog's refusal of {param}", shown).text.strip())
    page.find("the 'Failed to Trigger Dag' notice", "//*[normalize-space(.)='Failed to Trigger Dag']")
    page.screenshot(f"refused-{param}")
    assert "/runs/" not in page.driver.current_url, f"the UI went to a run page: {page.driver.current_url}"
    return message


def test_form_refuses_invalid_values(airflow: Airflow, browser: Any, artifacts: Path) -> None:
    page, base = Page(browser, artifacts), base_url(airflow)
    print(f"\n[ui] invalid values in {DAG_ID}'s trigger form")
    with page.evidence():
        log_in(page, base, admin_password(airflow))
        before = run_ids(airflow)

        # malformed JSON is refused in the page: an error under the field, the Trigger button disabled
        open_trigger_form(page, base)
        fill_overrides(page, {"param_grid": '{"C": [1, 10]'})
        page.wait("the dialog's Trigger button disabled", lambda d: not trigger_button(page).is_enabled())
        errors = page.wait("an error under the param_grid field", lambda d: field_errors(page))
        page.screenshot("refused-malformed-json")
        print(f"    param_grid '{{\"C\": [1, 10]' -> Trigger disabled, shown: {errors}")
        assert errors == ["Value must be one of: null, object, array"], errors

        # values the Params' JSON schema rejects: the API answers 400 and the dialog shows why
        for param, text in (("cv", "1"), ("dataset_version", "v 1")):
            message = submit_refused(page, base, param, text).splitlines()[0]
            print(f"    {param} {text!r} -> HTTP 400 shown in the dialog: {message!r}")
            assert message.startswith(f"Invalid input for param {param}: {text if param == 'cv' else repr(text)}")

        after = run_ids(airflow)
        print(f"    runs before: {sorted(before)}; after: {sorted(after)}")
        assert after == before, f"a refused form created runs: {sorted(after - before)}"
