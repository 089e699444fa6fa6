"""The dashboard in a real headless Chromium, driven through WebDriver (selenium), against a
real `conveyor serve` (SQLite in a temporary folder, a free port; `CONVEYOR_BIN`).

Jobs are run by this test through the remote-worker API (claim, then fail or complete), so
every state change happens at a moment the test chooses. Each page is scanned by axe-core
(`CONVEYOR_AXE`: the path of `axe.min.js`); a serious or critical violation fails the test.
With `CONVEYOR_DASHBOARD_SCREENSHOTS` set to a folder, each page is photographed into it
(docs/dashboard/*.png come from here).

Run by `cli/tests/dashboard.rs`, which checks the tools first; `scripts/test-deps.sh`
installs them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import unittest
import urllib.error
import urllib.request
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, os.path.join(ROOT, "clients", "python", "tests"))

from harness import Server  # noqa: E402

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WORKER = "browser-test-worker"
SHOTS = os.environ.get("CONVEYOR_DASHBOARD_SCREENSHOTS")


class Dashboard(unittest.TestCase):
    server: Server
    driver: webdriver.Chrome
    axe: str

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = Server()
        try:
            s = cls.server
            cls.operate_key = s.create_key("operate", "ops-alice")
            cls.read_key = s.create_key("read", "viewer-bob")
            with open(os.environ["CONVEYOR_AXE"], encoding="utf-8") as f:
                cls.axe = f.read()
            options = webdriver.ChromeOptions()
            options.binary_location = os.environ.get("CONVEYOR_CHROMIUM", "/usr/bin/chromium")
            for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
                options.add_argument(arg)
            service = Service(executable_path=os.environ.get("CONVEYOR_CHROMEDRIVER", "/usr/bin/chromedriver"))
            cls.driver = webdriver.Chrome(service=service, options=options)
            cls.driver.set_page_load_timeout(20)
        except BaseException:
            cls.server.close()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            cls.driver.quit()
        finally:
            cls.server.close()

    def setUp(self) -> None:
        self.driver.delete_all_cookies()

    # -- helpers ---------------------------------------------------------------------------

    def url(self, path: str) -> str:
        return self.server.url + path

    def dead_job(self, kind: str, queue: str, message: str, cause: str, args: Any = None) -> str:
        """A job that ran once and failed for good, through the worker API. Each test uses its
        own queues, so a claim takes the job just enqueued."""
        s = self.server
        job = s.admin.enqueue(kind, args or {}, queue=queue, max_attempts=1)
        claimed = s.admin.claim(WORKER, [queue], 1, 30, 5)
        self.assertEqual([j["id"] for j in claimed], [job.id])
        s.admin.finish(WORKER, [{
            "id": job.id, "attempt": claimed[0]["attempt"], "outcome": "fail",
            "error": {"message": message, "causes": [cause], "traceback": "Traceback: charge()\n  at gateway.py:12"},
            "retryable": True,
        }])
        s.wait_job(job.id, lambda j: j["state"] == "dead")
        return job.id

    def complete(self, queue: str, job_id: str) -> None:
        claimed = self.server.admin.claim(WORKER, [queue], 1, 30, 5)
        self.assertEqual([j["id"] for j in claimed], [job_id])
        self.server.admin.finish(WORKER, [{"id": job_id, "attempt": claimed[0]["attempt"], "outcome": "complete"}])

    def sign_in(self, key: str) -> None:
        d = self.driver
        d.get(self.url("/dashboard"))
        self.assertIn("/dashboard/login", d.current_url, "signed out, the dashboard asks to sign in")
        d.find_element(By.ID, "key").send_keys(key)
        d.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
        self.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "h1") and d.find_element(By.CSS_SELECTOR, "h1").text == "Overview", "the overview after signing in")
        cookie = d.get_cookie("conveyor_session")
        self.assertIsNotNone(cookie)
        self.assertTrue(cookie["httpOnly"])
        self.assertEqual(cookie["sameSite"], "Strict")

    def wait_for(self, pred: Any, what: str, timeout: float = 10) -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: self._quietly(pred))
        except Exception as e:
            raise AssertionError(f"timed out waiting for {what}; page: {self.driver.current_url}\n{self.driver.find_element(By.TAG_NAME, 'body').text[:2000]}") from e

    @staticmethod
    def _quietly(pred: Any) -> Any:
        # The page may be replaced while it is read (a navigation, a live refresh): try again.
        try:
            return pred()
        except Exception:
            return False

    def text(self, css: str) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def check_page(self, name: str) -> None:
        """axe-core finds no serious or critical violation; with screenshots on, saves one."""
        d = self.driver
        d.execute_script(self.axe)
        result = d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations)).catch(e => done([{id: 'axe-error', impact: 'critical', description: String(e), nodes: []}]));"
        )
        bad: List[Dict[str, Any]] = [v for v in result if v.get("impact") in ("serious", "critical")]
        self.assertEqual(
            bad, [],
            f"accessibility violations on {name}: " + json.dumps([{"id": v["id"], "impact": v["impact"], "help": v.get("help"), "nodes": [n.get("html") for n in v.get("nodes", [])][:3]} for v in bad], indent=1),
        )
        if SHOTS:
            os.makedirs(SHOTS, exist_ok=True)
            d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))

    def post_from_page(self, path: str, body: str) -> int:
        """A POST made by script from the open page (as a forged request would be): its status."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0], {method: 'POST', headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: arguments[1], redirect: 'manual'})"
            ".then(r => done(r.status)).catch(e => done(String(e)));",
            path, body,
        )

    def csrf(self) -> str:
        return self.driver.find_element(By.CSS_SELECTOR, "form.signout input[name=csrf]").get_attribute("value")

    # -- tests -----------------------------------------------------------------------------

    def test_find_a_dead_job_by_its_error_read_its_attempts_retry_it_and_watch_it_complete(self) -> None:
        d = self.driver
        job_id = self.dead_job(
            "billing.charge", "billing", "card declined: insufficient funds", "gateway answered 402",
            args={"customer": "c-42", "card_token": "tok_live_abc123", "amount": 1299},
        )
        self.sign_in(self.operate_key)
        self.wait_for(lambda: int(self.text(".n[data-state=dead]")) >= 1, "the dead count on the overview")
        self.check_page("overview")

        d.find_element(By.LINK_TEXT, "Jobs").click()
        d.find_element(By.NAME, "error").send_keys("CARD DECLINED")
        d.find_element(By.CSS_SELECTOR, "form.filters button[type=submit]").click()
        self.wait_for(lambda: "error=CARD+DECLINED" in d.current_url, "the filtered list")
        rows = d.find_elements(By.CSS_SELECTOR, "table.jobs tbody tr")
        self.assertEqual([r.get_attribute("data-job") for r in rows], [job_id], "the error search finds exactly the job")
        self.assertIn("card declined", rows[0].text)
        self.check_page("jobs")

        rows[0].find_element(By.CSS_SELECTOR, "a").click()
        self.wait_for(lambda: self.text("#job-state") == "dead", "the job page")
        history = self.text("#job-history")
        self.assertIn("Attempt 1", history)
        self.assertIn("card declined: insufficient funds", history)
        self.assertIn("gateway answered 402", history, "the cause chain is shown")
        args = self.text("pre[aria-label=Arguments]")
        self.assertIn("c-42", args)
        self.assertNotIn("tok_live_abc123", args, "a secret-named argument is redacted")
        self.assertIn("[redacted]", args)
        self.check_page("job")

        d.find_element(By.XPATH, "//button[normalize-space()='Retry']").click()
        self.wait_for(lambda: "1 job retried." in self.text("main"), "the retry notice")
        self.assertEqual(self.text("#job-state"), "available")
        self.wait_for(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-live-mode") == "events", "the live stream")
        d.execute_script("window.notReloaded = true;")
        self.complete("billing", job_id)
        self.wait_for(lambda: self.text("#job-state") == "completed", "the job turning completed on screen, live")
        self.assertTrue(d.execute_script("return window.notReloaded === true;"), "the page was not reloaded")
        history = self.text("#job-history")
        self.assertIn("Attempt 1: completed", history, "the new attempt is listed too")
        self.assertIn("Attempt 1: failed", history, "the history before the retry is kept")
        audit = self.server.admin.request("GET", "/v1/audit?limit=20")
        retry = [e for e in audit["entries"] if e["action"] == "job.retry"]
        self.assertEqual(retry[0]["actor"]["name"], "ops-alice", "audited as the signed-in key, through the admin layer")

    def test_bulk_purge_of_dead_jobs_shows_the_count_then_asks_to_confirm(self) -> None:
        d = self.driver
        ids = [self.dead_job("report.build", "reports", "warehouse timed out after 30s", "connect: timed out") for _ in range(3)]
        keep = self.dead_job("report.build", "reports", "schema mismatch", "column missing")
        self.sign_in(self.operate_key)
        d.get(self.url("/dashboard/dead?queue=reports&error=warehouse"))
        self.assertEqual(self.text("#dead-total"), "3")
        self.check_page("dead-letters")
        d.find_element(By.XPATH, "//button[normalize-space()='Purge all matching…']").click()
        self.wait_for(lambda: self.text("h1") == "Purge dead jobs?", "the confirmation")
        self.assertEqual(self.text("#matched"), "3", "the dry run's count")
        for i in ids:
            self.assertEqual(self.server.job(i)["state"], "dead", "nothing purged before confirming")
        self.check_page("dead-letters-confirm")
        d.find_element(By.XPATH, "//button[starts-with(normalize-space(), 'Yes, purge 3 jobs')]").click()
        self.wait_for(lambda: "3 jobs purged." in self.text("main"), "the purge notice")
        for i in ids:
            with self.assertRaises(Exception):
                self.server.job(i)
        self.assertEqual(self.server.job(keep)["state"], "dead", "a job outside the filter is kept")

    def test_bulk_select_in_the_job_list(self) -> None:
        d = self.driver
        ids = [self.dead_job("thumb.render", "thumbs", "image too large", "decoder: 12000px") for _ in range(3)]
        self.sign_in(self.operate_key)
        d.get(self.url("/dashboard/jobs?queue=thumbs&since=2000-01-01&until=2999-12-31"))
        boxes = {b.get_attribute("value"): b for b in d.find_elements(By.CSS_SELECTOR, "input[type=checkbox][name=id]")}
        self.assertEqual(set(boxes), set(ids))
        d.get(self.url("/dashboard/jobs?queue=thumbs&until=2000-01-01"))
        self.assertIn("No jobs match.", self.text("main"), "the day filter applies")
        d.get(self.url("/dashboard/jobs?queue=thumbs&since=yesterday"))
        self.assertIn("is not a day; use YYYY-MM-DD", self.text("main"), "a bad day is named with the fix")
        d.get(self.url("/dashboard/jobs?queue=thumbs"))
        boxes = {b.get_attribute("value"): b for b in d.find_elements(By.CSS_SELECTOR, "input[type=checkbox][name=id]")}
        for i in ids[:2]:
            boxes[i].click()
        d.find_element(By.XPATH, "//button[normalize-space()='Discard selected']").click()
        self.wait_for(lambda: "2 jobs discarded." in self.text("main"), "the discard notice")
        for i in ids[:2]:
            with self.assertRaises(Exception):
                self.server.job(i)
        self.assertEqual(self.server.job(ids[2])["state"], "dead", "the job not selected is kept")
        d.get(self.url("/dashboard/jobs?queue=thumbs"))
        d.find_element(By.CSS_SELECTOR, f"input[value='{ids[2]}']").click()
        d.find_element(By.XPATH, "//button[normalize-space()='Retry selected']").click()
        self.wait_for(lambda: "1 job retried." in self.text("main"), "the retry notice")
        self.assertEqual(self.server.job(ids[2])["state"], "available")

    def test_pausing_a_queue(self) -> None:
        d = self.driver
        self.server.admin.enqueue("mail.digest", {}, queue="digests")
        self.sign_in(self.operate_key)
        d.find_element(By.LINK_TEXT, "Queues").click()
        row = self.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "tr[data-queue=digests]"), "the queue row")[0]
        row.find_element(By.XPATH, ".//button[normalize-space()='Pause']").click()
        self.wait_for(lambda: "Queue paused" in self.text("main"), "the pause notice")
        self.assertIn("paused", self.text("tr[data-queue=digests] .queue-status"))
        queues = self.server.admin.request("GET", "/v1/queues")
        entry = [q for q in (queues["queues"] if isinstance(queues, dict) else queues) if q["name"] == "digests"][0]
        self.assertTrue(entry["paused"], "the API sees the queue paused")
        self.check_page("queues")
        d.find_element(By.XPATH, "//tr[@data-queue='digests']//button[normalize-space()='Resume']").click()
        self.wait_for(lambda: "Queue resumed" in self.text("main"), "the resume notice")

    def test_a_read_key_sees_no_actions_and_a_forged_action_is_refused(self) -> None:
        d = self.driver
        job_id = self.dead_job("billing.charge", "payouts", "card expired", "gateway answered 402")
        self.sign_in(self.read_key)
        d.get(self.url(f"/dashboard/jobs/{job_id}"))
        self.wait_for(lambda: self.text("#job-state") == "dead", "the job page")
        self.assertEqual(d.find_elements(By.CSS_SELECTOR, "main form[method=post]"), [], "no action on the job page")
        d.get(self.url("/dashboard/queues"))
        self.assertEqual(d.find_elements(By.CSS_SELECTOR, "main form[method=post]"), [], "no pause or resume")
        d.get(self.url("/dashboard/dead"))
        self.assertEqual(d.find_elements(By.CSS_SELECTOR, "main button"), [d.find_element(By.CSS_SELECTOR, "form.filters button")], "only the filter button")
        status = self.post_from_page(f"/dashboard/jobs/{job_id}/retry", f"csrf={self.csrf()}")
        self.assertEqual(status, 403, "a read key's forged retry, with a valid CSRF token, is refused")
        self.assertEqual(self.server.job(job_id)["state"], "dead")
        status = self.post_from_page("/dashboard/queues/billing/pause", f"csrf={self.csrf()}")
        self.assertEqual(status, 403)

    def test_an_action_without_the_csrf_token_is_refused(self) -> None:
        job_id = self.dead_job("billing.charge", "refunds", "card lost", "gateway answered 402")
        self.sign_in(self.operate_key)
        self.driver.get(self.url(f"/dashboard/jobs/{job_id}"))
        self.assertEqual(self.post_from_page(f"/dashboard/jobs/{job_id}/retry", ""), 403)
        self.assertEqual(self.post_from_page(f"/dashboard/jobs/{job_id}/retry", "csrf=" + "0" * 64), 403)
        self.assertEqual(self.server.job(job_id)["state"], "dead", "nothing retried")
        # The right token from another site's page: refused by the Origin check.
        session = self.driver.get_cookie("conveyor_session")["value"]
        forged = urllib.request.Request(
            self.url(f"/dashboard/jobs/{job_id}/retry"), data=f"csrf={self.csrf()}".encode(), method="POST",
            headers={"Cookie": f"conveyor_session={session}", "Origin": "http://evil.example",
                     "Content-Type": "application/x-www-form-urlencoded"},
        )
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(forged)
        self.assertEqual(caught.exception.code, 403)
        self.assertEqual(self.server.job(job_id)["state"], "dead", "nothing retried")
        self.assertEqual(self.post_from_page(f"/dashboard/jobs/{job_id}/retry", f"csrf={self.csrf()}"), 0, "with the token it goes through (a redirect, opaque to a manual fetch)")
        self.server.wait_job(job_id, lambda j: j["state"] == "available")

    def test_sign_out_ends_the_session(self) -> None:
        d = self.driver
        self.sign_in(self.operate_key)
        session = d.get_cookie("conveyor_session")["value"]
        d.find_element(By.XPATH, "//button[normalize-space()='Sign out']").click()
        self.wait_for(lambda: "/dashboard/login" in d.current_url, "the sign-in page")
        self.check_page("sign-in")
        self.assertIsNone(d.get_cookie("conveyor_session"))
        # The old cookie replayed: the session is gone on the server, not just in the browser.
        request = urllib.request.Request(self.url("/dashboard/queues"), headers={"Cookie": f"conveyor_session={session}"})

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.build_opener(NoRedirect).open(request)
        self.assertEqual(caught.exception.code, 303)
        self.assertEqual(caught.exception.headers["Location"], "/dashboard/login")

    def test_schedules_show_next_fires_in_their_zone_and_pause_and_trigger(self) -> None:
        d = self.driver
        self.server.admin.request("POST", "/v1/schedules", {
            "name": "tokyo-morning", "cron": "0 9 * * *", "timezone": "Asia/Tokyo",
            "kind": "report.build", "queue": "sched-reports",
        })
        self.sign_in(self.operate_key)
        d.find_element(By.LINK_TEXT, "Schedules").click()
        row = "tr[data-schedule=tokyo-morning]"
        nexts = self.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, f"{row} .next time"), "the next fires")
        self.assertEqual(len(nexts), 3)
        for t in nexts:
            self.assertRegex(t.text, r"^\d{4}-\d\d-\d\d 09:00 \+09:00$", "09:00 in the schedule's own zone")
        self.check_page("schedules")
        d.find_element(By.CSS_SELECTOR, f"{row} button[aria-label='Trigger now: schedule tokyo-morning']").click()
        self.wait_for(lambda: "one job enqueued now" in self.text("main"), "the trigger notice")
        jobs = self.server.admin.request("GET", "/v1/jobs?queue=sched-reports")["jobs"]
        self.assertEqual(len(jobs), 1, "the trigger enqueued one job")
        d.find_element(By.CSS_SELECTOR, f"{row} button[aria-label='Pause schedule tokyo-morning']").click()
        self.wait_for(lambda: "Schedule paused" in self.text("main"), "the pause notice")
        self.assertIn("paused", self.text(f"{row} .schedule-status"))
        self.assertEqual(d.find_elements(By.CSS_SELECTOR, f"{row} .next time"), [], "a paused schedule has no next fire")
        self.assertFalse(self.server.admin.request("GET", "/v1/schedules/tokyo-morning")["spec"]["enabled"])

    def test_without_events_the_page_polls_and_still_updates(self) -> None:
        d = self.driver
        job_id = self.dead_job("billing.charge", "polling", "card declined", "gateway answered 402")
        self.sign_in(self.operate_key)
        # A browser whose events cannot get through (as behind a buffering proxy).
        d.execute_cdp_cmd("Network.enable", {})
        d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/dashboard/events*"]})
        try:
            d.get(self.url(f"/dashboard/jobs/{job_id}"))
            self.wait_for(lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-live-mode") == "polling", "the fallback to polling", timeout=30)
            self.assertIn("refreshing every few seconds", self.text("#live-status"))
            d.execute_script("window.notReloaded = true;")
            self.server.admin.request("POST", f"/v1/jobs/{job_id}/retry", {})
            self.wait_for(lambda: self.text("#job-state") == "available", "the retry seen by polling", timeout=15)
            self.assertTrue(d.execute_script("return window.notReloaded === true;"))
        finally:
            d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})

    def test_phone_width_and_dark_mode(self) -> None:
        d = self.driver
        self.sign_in(self.operate_key)
        d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
        d.set_window_size(390, 844)
        try:
            d.get(self.url("/dashboard/queues"))
            background = d.execute_script("return getComputedStyle(document.body).backgroundColor;")
            self.assertEqual(background, "rgb(13, 17, 23)", "the dark palette")
            width = d.execute_script("return document.documentElement.scrollWidth;")
            viewport = d.execute_script("return window.innerWidth;")
            self.assertLessEqual(width, viewport, "nothing overflows the phone's width (tables scroll inside their region)")
            self.check_page("queues-phone-dark")
        finally:
            d.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
            d.set_window_size(1280, 900)

    def test_workers_show_what_each_runs_and_the_audit_log_is_for_admin_keys(self) -> None:
        d = self.driver
        s = self.server
        job = s.admin.enqueue("video.encode", {}, queue="encoding")
        claimed = s.admin.claim("encoder-1", ["encoding"], 1, 60, 5)
        self.assertEqual([j["id"] for j in claimed], [job.id])
        try:
            self.sign_in(self.operate_key)
            self.assertEqual(d.find_elements(By.LINK_TEXT, "Audit log"), [], "no audit link for an operate key")
            d.get(self.url("/dashboard/audit"))
            self.assertIn("needs a key with the `admin` scope", self.text("main"))
            d.find_element(By.LINK_TEXT, "Workers").click()
            section = self.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "section[data-worker=encoder-1]"), "the worker")[0]
            self.assertIn(job.id, [r.get_attribute("data-job") for r in section.find_elements(By.CSS_SELECTOR, "tr[data-job]")], "the job it runs")
            self.check_page("workers")
            d.delete_all_cookies()
            self.sign_in(s.admin_key)
            d.find_element(By.LINK_TEXT, "Audit log").click()
            self.wait_for(lambda: "dashboard.sign_in" in self.text("main"), "the audit log")
            self.assertIn("py-admin", self.text("main"))
            self.check_page("audit")
        finally:
            s.admin.finish("encoder-1", [{"id": job.id, "attempt": claimed[0]["attempt"], "outcome": "complete"}])

    def test_webhook_endpoints_show_their_health_and_are_disabled(self) -> None:
        d = self.driver
        ep = self.server.admin.request("POST", "/v1/webhooks/endpoints", {"url": "https://hooks.example.com/conveyor", "description": "billing events"})
        secret = ep["secrets"][0]["secret"]
        self.sign_in(self.operate_key)
        d.find_element(By.LINK_TEXT, "Webhooks").click()
        row = f"tr[data-endpoint='{ep['id']}']"
        self.wait_for(lambda: d.find_elements(By.CSS_SELECTOR, row), "the endpoint")
        self.assertEqual(self.text(f"{row} .circuit"), "closed")
        self.assertNotIn(secret, d.page_source, "the signing secret is never on the page")
        self.check_page("webhooks")
        d.find_element(By.CSS_SELECTOR, f"{row} button").click()
        self.wait_for(lambda: "Endpoint disabled" in self.text("main"), "the disable notice")
        self.assertIn("disabled", self.text(f"{row} .endpoint-status"))
        self.assertFalse(self.server.admin.request("GET", f"/v1/webhooks/endpoints/{ep['id']}")["enabled"])

    def test_revoking_the_key_ends_its_sessions(self) -> None:
        d = self.driver
        key = self.server.create_key("operate", "carol-temp")
        self.sign_in(key)
        d.get(self.url("/dashboard/queues"))
        self.assertEqual(self.text("h1"), "Queues")
        self.server._cli("keys", "revoke", key)
        d.get(self.url("/dashboard/queues"))
        self.assertIn("/dashboard/login", d.current_url, "the revoked key's session is over at once")

    def test_a_wrong_key_is_refused_with_a_clear_message(self) -> None:
        d = self.driver
        d.get(self.url("/dashboard/login"))
        d.find_element(By.ID, "key").send_keys("cvk_0000000000000000_" + "0" * 64)
        d.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
        self.wait_for(lambda: d.find_elements(By.ID, "login-error"), "the error")
        self.assertIn("the key is not valid", self.text("#login-error"))
        self.assertIsNone(d.get_cookie("conveyor_session"))


if __name__ == "__main__":
    unittest.main()
