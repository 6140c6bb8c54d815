"""The dashboard in a real browser: Debian's chromium, driven by selenium, against a live cluster.

Nothing is downloaded: the driver and the browser are the Debian packages' binaries, named
explicitly, so Selenium Manager never runs (SE_OFFLINE as well, in case it would). One
``twistd -n taskserver`` cluster (2 children, embedded Redis) and one browser serve the
whole module; the tests run in file order and build on each other's tasks. After each test
the browser's console must hold no error and no warning.
"""

from __future__ import annotations

import os
import signal
import struct
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from harness import Twistd

#: Poll timings in a browser: run alone (`make test` runs `serial` tests last).
pytestmark = pytest.mark.serial

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install chromium chromium-driver"
#: Without the background-networking flags chromium tries Google's hosts, and this machine's
#: closed network refuses them; a fresh profile keeps runs apart.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,800",
)
WINDOW = (1280, 800)
#: A deadline, not an expectation: the page polls every 2 s and the counters flush every 1 s.
UPDATE_DEADLINE_S = 15.0
#: The throughput chart needs two history samples, pushed at most every 5 s.
HISTORY_DEADLINE_S = 30.0
ADMIN_TOKEN = "a-token-for-the-browser-test"
#: The page writes ranges with an en dash: "1\N{EN DASH}20 of 47".
DASH = "\N{EN DASH}"
XSS_STRINGS = ("<script>window.__xss=1</script>", '"><img src=x onerror=window.__xss=1>')
CLUSTER_SETTINGS = {
    "WORKERS": "2",
    "TASK_HANDLER": "sample_dashboard:run",
    "MAX_ATTEMPTS": "2",
    "RETRY_BACKOFF": "0.05",
}
T = TypeVar("T")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """Headless chromium at 1280x800; skipped where it is not installed, failed under CI."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        message = f"{' and '.join(missing)} not found: {INSTALL_HINT}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test cannot be skipped under CI: {message}")
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def cluster(browser: WebDriver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twistd]:
    """A real cluster with the embedded Redis; the page is loaded once, from ``/``."""
    server = Twistd(tmp_path_factory.mktemp("dashboard-cluster"), CLUSTER_SETTINGS)
    try:
        server.wait_until_ready(2)
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(browser: WebDriver, cluster: Twistd) -> Iterator[WebDriver]:
    """The dashboard, loaded once, live; the console must stay clean during each test."""
    if not browser.current_url.startswith(cluster.url):
        browser.get(cluster.url + "/")
    wait(browser, lambda d: text(d, "status-line") == "live", "the page goes live")
    yield browser
    problems = [
        entry for entry in browser.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")
    ]
    assert not problems, f"the browser console logged: {problems}"


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """A file whose existence makes the tasks naming it fail (or wait)."""
    path = tmp_path / f"marker-{uuid.uuid4().hex[:8]}"
    path.touch()
    return path


def test_slash_redirects_to_a_live_dashboard(page: WebDriver, cluster: Twistd) -> None:
    """``/`` lands on /dashboard, which shows both workers and the embedded Redis as up."""
    assert page.current_url == cluster.url + "/dashboard"
    assert page.title == "taskserver dashboard"
    wait(page, lambda d: len(worker_rows(d)) == 2, "two workers listed")
    pids = {int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in worker_rows(page)}
    assert pids <= set(cluster.worker_pids()), pids
    assert text(page, "redis-status") == "up"
    assert text(page, "redis-kind").startswith("embedded")
    assert text(page, "redis-address").startswith("127.0.0.1:")


def test_counts_follow_posted_tasks(page: WebDriver, cluster: Twistd, marker: Path) -> None:
    """A held task shows as processing (and in flight); posted tasks raise the completed total."""
    completed_before = number(page, "total-completed")
    held = post(cluster, "dashboard-held", {"hold": str(marker)})
    wait(page, lambda d: number(d, "count-processing") == 1, "#count-processing shows the task")
    wait(page, lambda d: in_flight(d) == 1, "the workers table shows it in flight")
    for n in range(3):
        post(cluster, f"dashboard-quick-{n}", {"n": n})
    marker.unlink()
    wait(
        page,
        lambda d: number(d, "total-completed") >= completed_before + 4,
        "#total-completed counts the four tasks",
    )
    wait(page, lambda d: number(d, "count-processing") == 0, "#count-processing back to 0")
    assert cluster.status_of(held) == "completed"


def test_a_dead_task_requeued_by_a_click_completes(
    page: WebDriver, cluster: Twistd, marker: Path
) -> None:
    """The task fails twice, appears in the dead letters, and one click on Requeue revives it."""
    dead_before = number(page, "count-dead")
    failed_before = number(page, "total-failed")
    task_id = post(cluster, "dashboard-doomed", {"fail_while": str(marker), "text": "boom"})
    row = wait(page, lambda d: dead_row(d, task_id), "the dead task's row")
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "dashboard-doomed"
    assert cells[2] == "2"
    assert cells[4] == "RuntimeError: failed on purpose: boom"
    assert '"text": "boom"' in cells[5] or '"text":"boom"' in cells[5]
    wait(page, lambda d: number(d, "count-dead") == dead_before + 1, "#count-dead counts it")
    assert number(page, "total-failed") >= failed_before + 2

    marker.unlink()
    click(page, f'#dead-table tr[data-task-id="{task_id}"] button.requeue')
    wait(page, lambda d: dead_row(d, task_id) is None, "the row leaves the dead letters")
    wait(page, lambda d: cluster.status_of(task_id) == "completed", "the task completes")
    page.find_element(By.ID, "lookup-input").clear()
    page.find_element(By.ID, "lookup-input").send_keys(task_id)
    click(page, "#lookup-button")
    result = wait(page, lambda d: lookup_text(d, task_id), "the lookup shows the task")
    assert "completed" in result.split("\n")
    wait(page, lambda d: number(d, "count-dead") == dead_before, "#count-dead goes back down")


def test_client_values_are_shown_as_text(page: WebDriver, cluster: Twistd, marker: Path) -> None:
    """Script and markup in a user_id, a payload and an error message stay text: nothing runs."""
    task_ids = {
        post(cluster, xss, {"text": xss, "fail_while": str(marker)}): xss for xss in XSS_STRINGS
    }
    for task_id, xss in task_ids.items():
        row = wait(page, lambda d, task_id=task_id: dead_row(d, task_id), "the XSS task's row")
        cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        assert cells[1] == xss, "user_id"
        assert cells[4] == f"RuntimeError: failed on purpose: {xss}", "error"
        assert xss in cells[5], "payload excerpt"
    page.find_element(By.ID, "lookup-input").clear()
    page.find_element(By.ID, "lookup-input").send_keys(next(iter(task_ids)))
    click(page, "#lookup-button")
    result = wait(page, lambda d: lookup_text(d, next(iter(task_ids))), "the lookup")
    assert XSS_STRINGS[0] in result
    assert page.execute_script("return typeof window.__xss") == "undefined"
    assert not page.find_elements(By.CSS_SELECTOR, "main script, main img")


def test_polls_never_overlap_and_pause_while_hidden(page: WebDriver) -> None:
    """At most one overview request in flight; none while the tab is hidden; back when shown."""
    page.execute_script(COUNT_POLLS_JS)
    wait(page, lambda d: polls(d)["started"] >= 3, "three polls")
    assert polls(page)["most"] == 1
    page.minimize_window()
    wait(page, lambda d: text(d, "status-line") == "paused", "#status-line says paused")
    wait(page, lambda d: polls(d)["active"] == 0, "the last poll finishes")
    started = polls(page)["started"]
    # The one wait that must run out: two poll intervals (and more) with no poll started.
    with pytest.raises(TimeoutException):
        WebDriverWait(page, 5).until(lambda d: polls(d)["started"] > started)
    page.set_window_size(*WINDOW)
    wait(page, lambda d: polls(d)["started"] > started, "polling resumes once shown")
    wait(page, lambda d: text(d, "status-line") == "live", "#status-line says live again")
    assert polls(page)["most"] == 1


def test_screenshot_of_the_loaded_dashboard(
    page: WebDriver, cluster: Twistd, tmp_path: Path
) -> None:
    """The whole page with data, as a 1280-wide PNG (DASHBOARD_SCREENSHOT names a copy to keep)."""
    for n in range(4):
        post(cluster, f"dashboard-shot-{n}", {"n": n})
    code, _ = cluster.request("POST", "/api/v1/task", {"user_id": "dashboard-shot-0"})
    assert code == 429  # one rate-limited request, so that panel shows a count
    wait(
        page,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#throughput-chart polyline")) == 2,
        "the throughput chart has its two lines",
        HISTORY_DEADLINE_S,
    )
    height = page.execute_script(
        "return document.documentElement.scrollHeight + outerHeight - innerHeight"
    )
    page.set_window_size(WINDOW[0], height)
    try:
        target = Path(os.environ.get("DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        assert page.save_screenshot(str(target))
    finally:
        page.set_window_size(*WINDOW)
    png = target.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">I", png[16:20])[0] == WINDOW[0]


def test_dead_letters_are_paged(page: WebDriver, cluster: Twistd, marker: Path) -> None:
    """20 a page, newest first: Next shows the older ones, Prev comes back."""
    already = number(page, "count-dead")
    doomed = [post(cluster, f"dashboard-paged-{n}", {"fail_while": str(marker)}) for n in range(21)]
    total = already + len(doomed)
    wait(page, lambda d: text(d, "dead-range") == f"1{DASH}20 of {total}", "the first page")
    first = dead_ids(page)
    assert len(first) == 20
    assert not page.find_element(By.ID, "dead-prev").is_enabled()
    click(page, "#dead-next")
    wait(page, lambda d: text(d, "dead-range") == f"21{DASH}{total} of {total}", "page two")
    second = wait(page, lambda d: dead_ids(d) if len(dead_ids(d)) == total - 20 else None, "rows")
    assert not set(first) & set(second)
    assert set(doomed) <= set(first) | set(second)
    assert not page.find_element(By.ID, "dead-next").is_enabled()
    click(page, "#dead-prev")
    wait(page, lambda d: dead_ids(d) == first, "the first page again")


def test_requeue_all_and_purge_ask_first(page: WebDriver) -> None:
    """Each asks in the page: Cancel changes nothing, Yes acts (the requeued die again here)."""
    dead = number(page, "total-dead")
    count = number(page, "count-dead")
    assert count >= 2, "the earlier tests' tasks are still dead"
    click(page, "#requeue-all")
    assert page.find_element(By.ID, "confirm").is_displayed()
    assert text(page, "confirm-text") == f"Requeue all {count} dead letters?"
    click(page, "#confirm-no")
    assert not page.find_element(By.ID, "confirm").is_displayed()
    assert number(page, "total-dead") == dead

    click(page, "#requeue-all")
    click(page, "#confirm-yes")
    wait(page, lambda d: text(d, "action-result") == f"requeued {count} tasks", "requeued")
    # Their marker still exists: they fail twice more each and are dead letters again.
    wait(page, lambda d: number(d, "total-dead") == dead + count, "they die again")
    wait(page, lambda d: number(d, "count-dead") == count, "#count-dead counts them again")

    click(page, "#purge")
    assert text(page, "confirm-text") == f"Delete all {count} dead letters for good?"
    click(page, "#confirm-yes")
    wait(page, lambda d: text(d, "action-result") == f"purged {count} dead letters", "purged")
    wait(page, lambda d: number(d, "count-dead") == 0, "#count-dead 0")
    wait(page, lambda d: text(d, "dead-table") == "no dead letters", "an empty dead-letter table")
    assert not page.find_element(By.ID, "purge").is_enabled()


def test_redis_down_is_shown_and_polling_goes_on(page: WebDriver, cluster: Twistd) -> None:
    """A Redis that does not answer (SIGSTOPped) shows as "Redis down"; the page recovers alone."""
    redis = cluster.redis_pid()
    os.kill(redis, signal.SIGSTOP)
    try:
        wait(page, lambda d: text(d, "status-line") == "Redis down", "#status-line: Redis down")
        assert text(page, "redis-status") == "down"
    finally:
        os.kill(redis, signal.SIGCONT)
    wait(page, lambda d: text(d, "status-line") == "live", "#status-line live again")
    wait(page, lambda d: text(d, "redis-status") == "up", "#redis-status up again")
    # The 503s the page was answered meanwhile are the only thing its console may show.
    unexpected = [
        entry
        for entry in page.get_log("browser")
        if entry["level"] in ("SEVERE", "WARNING")
        and not ("/dashboard/api/" in entry["message"] and "status of 503" in entry["message"])
    ]
    assert not unexpected, f"the browser console logged: {unexpected}"


def test_sign_in_with_admin_token_then_read_only_shows_no_actions(
    browser: WebDriver, twistd: Callable[..., Twistd], marker: Path
) -> None:
    """ADMIN_TOKEN: the page sends a stranger to the form, whose cookie lets the right token in.
    DASHBOARD_READ_ONLY: the dead letters are listed, with no button that would change them.
    Sign out: the form again, and the page closed until the token is given again."""
    settings = {"WORKERS": "1", "ADMIN_TOKEN": ADMIN_TOKEN, "DASHBOARD_READ_ONLY": "true"}
    server = twistd(**{**CLUSTER_SETTINGS, **settings})
    server.wait_until_ready(1)
    task_id = post(server, "dashboard-read-only", {"fail_while": str(marker), "text": "ro"})
    browser.get(server.url + "/dashboard")
    try:
        assert browser.current_url == server.url + "/dashboard/login"
        sign_in(browser, "not the token")
        wait(browser, lambda d: text(d, "login-message") == "Wrong token.", "'Wrong token.'")
        # The one thing the console may show here: that the login page was answered 403.
        logged = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert all("/dashboard/login" in m and "status of 403" in m for m in logged), logged
        sign_in(browser, ADMIN_TOKEN)
        row = wait(browser, lambda d: dead_row(d, task_id), "the dead task's row")
        assert browser.current_url == server.url + "/dashboard"
        assert text(browser, "status-line") == "live"
        assert text(browser, "mode") == "read-only · access: cookie"
        assert not row.find_elements(By.CSS_SELECTOR, "button.requeue")
        for action in ("requeue-all", "purge"):
            assert not browser.find_element(By.ID, action).is_displayed(), action
        # Sign out (not an action on the queue: read-only mode keeps it) clears the cookie.
        browser.find_element(By.ID, "logout").click()
        wait(browser, lambda d: d.current_url == server.url + "/dashboard/login", "the login form")
        browser.get(server.url + "/dashboard")
        assert browser.current_url == server.url + "/dashboard/login"
    finally:
        entries = browser.get_log("browser")
        browser.get("about:blank")
        server.stop()
    problems = [entry for entry in entries if entry["level"] in ("SEVERE", "WARNING")]
    assert not problems, f"the browser console logged: {problems}"


COUNT_POLLS_JS = """
const counts = (window.__polls = { started: 0, active: 0, most: 0 });
const original = window.fetch;
window.fetch = function (resource, options) {
  const call = () => original.call(this, resource, options);
  if (!String(resource).includes("/dashboard/api/overview")) return call();
  counts.started += 1;
  counts.active += 1;
  counts.most = Math.max(counts.most, counts.active);
  return call().finally(() => { counts.active -= 1; });
};
"""


def wait(
    driver: WebDriver,
    condition: Callable[[WebDriver], T],
    what: str,
    timeout: float = UPDATE_DEADLINE_S,
) -> T:
    """Until ``condition`` is truthy (re-rendered elements are simply looked up again)."""
    waiter = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
    )
    try:
        return waiter.until(condition)
    except TimeoutException:
        raise AssertionError(f"{what}: not within {timeout} s") from None


def text(driver: WebDriver, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def number(driver: WebDriver, element_id: str) -> int:
    """A count as the page shows it (``1,234``); -1 while it shows none yet."""
    shown = text(driver, element_id).replace(",", "")
    return int(shown) if shown.isdigit() else -1


def worker_rows(driver: WebDriver) -> list[WebElement]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#workers tr")
    return [row for row in rows if len(row.find_elements(By.TAG_NAME, "td")) == 7]


def in_flight(driver: WebDriver) -> int:
    return sum(int(row.find_elements(By.TAG_NAME, "td")[5].text) for row in worker_rows(driver))


def dead_ids(driver: WebDriver) -> list[str]:
    rows = driver.find_elements(By.CSS_SELECTOR, "#dead-table tr[data-task-id]")
    return [str(row.get_attribute("data-task-id")) for row in rows]


def dead_row(driver: WebDriver, task_id: str) -> WebElement | None:
    rows = driver.find_elements(By.CSS_SELECTOR, f'#dead-table tr[data-task-id="{task_id}"]')
    return rows[0] if rows else None


def lookup_text(driver: WebDriver, task_id: str) -> str | None:
    shown = text(driver, "lookup-result")
    return shown if task_id in shown else None


def click(driver: WebDriver, selector: str) -> None:
    """Click what ``selector`` finds, looking it up again if a poll re-rendered it meanwhile."""

    def clicked(d: WebDriver) -> bool:
        d.find_element(By.CSS_SELECTOR, selector).click()
        return True

    wait(driver, clicked, f"click {selector}")


def sign_in(driver: WebDriver, token: str) -> None:
    field = driver.find_element(By.NAME, "token")
    field.clear()
    field.send_keys(token)
    field.submit()


def polls(driver: WebDriver) -> dict[str, int]:
    counts: dict[str, int] = driver.execute_script("return window.__polls")
    return counts


def post(cluster: Twistd, user_id: str, payload: Any) -> str:
    code, document = cluster.request(
        "POST", "/api/v1/task", {"user_id": user_id, "payload": payload}
    )
    assert code == 202, document
    return str(document["task_id"])
