"""The Python worker against a real `conveyor serve` (see harness.py for how it is started).

    CONVEYOR_BIN=target/debug/conveyor python3 -m unittest discover -s clients/python/tests -v
"""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import subprocess
import sys
import threading
import time
import unittest
from typing import Any, Dict, List, Tuple

from harness import HERE, Server, wait_until

from conveyor_worker import ApiError, Job, PermanentFailure, RetryAfter, Snooze, Worker


class WorkerTests(unittest.TestCase):
    server: Server

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = Server()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.close()

    def setUp(self) -> None:
        # Each test has its own queue, so no test's worker claims another's jobs.
        self.queue = f"py-{self._testMethodName[5:]}"[:100]
        self.threads: List[threading.Thread] = []
        self.workers: List[Worker] = []
        self.procs: List["subprocess.Popen[bytes]"] = []
        self.logs: Dict[int, str] = {}

    def tearDown(self) -> None:
        for w in self.workers:
            w.stop(hurry=True)
        for t in self.threads:
            t.join(15)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def worker(self, **kw: Any) -> Worker:
        kw.setdefault("queues", [self.queue])
        kw.setdefault("wait_seconds", 1)
        w = Worker(self.server.url, self.server.worker_key, **kw)
        self.workers.append(w)
        return w

    def start(self, w: Worker) -> None:
        t = threading.Thread(target=w.run, kwargs={"install_signal_handlers": False}, daemon=True)
        t.start()
        self.threads.append(t)

    def enqueue(self, kind: str, args: Any = None, **kw: Any) -> str:
        answer = self.server.admin.enqueue(kind, args, queue=self.queue, **kw)
        return str(answer["job"]["id"])

    def spawn(self, lease: int, grace: float, markers: str) -> "subprocess.Popen[bytes]":
        log_path = os.path.join(markers, f"worker-{self.queue}-{len(self.procs)}.log")
        log = open(log_path, "wb")
        p = subprocess.Popen(
            [
                sys.executable,
                os.path.join(HERE, "worker_main.py"),
                self.server.url,
                self.server.worker_key,
                self.queue,
                str(lease),
                str(grace),
                markers,
            ],
            stderr=log,
        )
        log.close()
        self.procs.append(p)
        self.logs[p.pid] = log_path
        return p

    def log_of(self, p: "subprocess.Popen[bytes]") -> str:
        with open(self.logs[p.pid], encoding="utf-8", errors="replace") as f:
            return f.read()

    # -- tests ---------------------------------------------------------------------------

    def test_runs_jobs_concurrently_up_to_the_limit(self) -> None:
        w = self.worker(concurrency=3)
        lock = threading.Lock()
        now = {"running": 0, "max": 0}

        @w.handler("test.sleep")
        def sleep(args: Dict[str, Any], job: Job) -> None:
            with lock:
                now["running"] += 1
                now["max"] = max(now["max"], now["running"])
            time.sleep(args["seconds"])
            with lock:
                now["running"] -= 1

        ids = [self.enqueue("test.sleep", {"seconds": 0.6}) for _ in range(7)]
        started = time.monotonic()
        self.start(w)
        for i in ids:
            self.server.wait_job(i, lambda j: j["state"] == "completed")
        elapsed = time.monotonic() - started
        self.assertEqual(now["max"], 3, "three jobs at once, never more")
        # 7 jobs of 0.6 s, 3 at a time: 3 rounds (1.8 s), far below 7 × 0.6 s one by one.
        self.assertLess(elapsed, 3.5)

    def test_the_return_value_is_the_result_progress_shows_and_wait_returns_the_outcome(self) -> None:
        w = self.worker()
        reported = threading.Event()
        go_on = threading.Event()

        @w.handler("test.report")
        def report(args: Dict[str, Any], job: Job) -> Dict[str, Any]:
            self.assertTrue(job.report_progress(40, "reading rows"))
            reported.set()
            go_on.wait(10)
            return {"rows": args["rows"], "ok": True}

        @w.handler("test.unencodable")
        def unencodable(args: Any, job: Job) -> Any:
            return {1, 2}  # a set is not JSON: the attempt fails, saying so

        handle = self.server.admin.enqueue("test.report", {"rows": 12}, queue=self.queue)
        self.start(w)
        self.assertTrue(reported.wait(10), "the handler ran")
        running = self.server.job(handle.id)
        self.assertEqual(running["progress"]["percent"], 40.0, running)
        self.assertEqual(running["progress"]["message"], "reading rows", running)
        # The wait runs out while the job is still running: the job as it is.
        early = handle.wait(0.3)
        self.assertEqual(early["state"], "running", early)
        go_on.set()
        started = time.monotonic()
        done = handle.wait(30)
        self.assertEqual(done["state"], "completed", done)
        self.assertEqual(done["result"], {"rows": 12, "ok": True})
        self.assertLess(time.monotonic() - started, 5, "the wait answers when the job ends")
        # A finished job's wait answers at once.
        self.assertEqual(self.server.admin.wait(handle.id, 30)["result"], {"rows": 12, "ok": True})

        bad = self.server.admin.enqueue("test.unencodable", queue=self.queue, max_attempts=1)
        dead = bad.wait(30)
        self.assertEqual(dead["state"], "dead", dead)
        self.assertIn("JSON serializable", dead["attempts"][0]["error"])
        with self.assertRaises(ApiError) as missing:
            self.server.admin.wait("0193f5a2-0000-7000-8000-000000000000", 1)
        self.assertEqual(missing.exception.status, 404)

    def test_a_handler_exception_retries_with_its_message_and_traceback(self) -> None:
        w = self.worker()

        def charge(amount: int) -> None:
            raise ValueError(f"card declined for {amount}")

        @w.handler("test.flaky")
        def flaky(args: Dict[str, Any], job: Job) -> None:
            if job.attempt == 1:
                try:
                    charge(args["amount"])
                except ValueError as e:
                    raise RuntimeError("payment step failed") from e

        job_id = self.enqueue("test.flaky", {"amount": 42}, max_attempts=3)
        self.start(w)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "completed")
        self.assertEqual(job["attempt"], 2)
        first, second = job["attempts"]
        self.assertEqual(first["outcome"], "failed")
        self.assertEqual(first["error"], "RuntimeError: payment step failed")
        self.assertEqual(first.get("causes"), ["ValueError: card declined for 42"])
        tb = first.get("traceback") or ""
        self.assertIn("Traceback (most recent call last)", tb)
        self.assertIn("in charge", tb, "the frame that raised")
        self.assertIn("ValueError: card declined for 42", tb)
        self.assertEqual(second["outcome"], "completed")
        self.assertEqual(first["worker"], w.worker_id)

    def test_an_async_handler_runs_and_its_failure_is_recorded(self) -> None:
        w = self.worker()

        @w.handler("test.async")
        async def run(args: Dict[str, Any], job: Job) -> None:
            await asyncio.sleep(0.05)
            if job.attempt == 1:
                raise KeyError(args["missing"])

        job_id = self.enqueue("test.async", {"missing": "field"}, max_attempts=2)
        self.start(w)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "completed")
        self.assertEqual([a["outcome"] for a in job["attempts"]], ["failed", "completed"])
        self.assertEqual(job["attempts"][0]["error"], "KeyError: 'field'")
        self.assertIn("in run", job["attempts"][0].get("traceback") or "")

    def test_permanent_failure_makes_the_job_dead_at_once(self) -> None:
        w = self.worker()

        @w.handler("test.bad")
        def bad(args: Any, job: Job) -> None:
            raise PermanentFailure("no such account")

        job_id = self.enqueue("test.bad", {}, max_attempts=5)
        self.start(w)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "dead")
        self.assertEqual(job["attempt"], 1, "no retry after a permanent failure")
        self.assertEqual(job["attempts"][0]["error"], "PermanentFailure: no such account")

    def test_retry_after_and_snooze(self) -> None:
        w = self.worker()
        seen: List[int] = []

        @w.handler("test.later")
        def later(args: Any, job: Job) -> Any:
            seen.append(job.attempt)
            if len(seen) == 1:
                return Snooze(1)  # a return value works as well as a raise
            if len(seen) == 2:
                raise RetryAfter(1, "rate limited upstream")
            return None

        job_id = self.enqueue("test.later", {})
        self.start(w)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "completed", timeout=20)
        self.assertEqual([a["outcome"] for a in job["attempts"]], ["snoozed", "failed", "completed"])
        self.assertEqual(job["attempts"][1]["error"], "RetryAfter: rate limited upstream")
        # A snooze does not use an attempt: the run after it is attempt 1 again.
        self.assertEqual(seen, [1, 1, 2])

    def test_heartbeats_keep_a_job_longer_than_its_lease(self) -> None:
        w = self.worker(lease_seconds=2, heartbeat_seconds=0.5)

        @w.handler("test.sleep")
        def sleep(args: Dict[str, Any], job: Job) -> None:
            time.sleep(args["seconds"])

        job_id = self.enqueue("test.sleep", {"seconds": 5})
        self.start(w)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "completed", timeout=20)
        self.assertEqual([a["outcome"] for a in job["attempts"]], ["completed"], "never rescued")

    def test_an_outcome_after_the_lease_was_lost_changes_nothing(self) -> None:
        # Worker A's heartbeats fail (as in a network partition: the calls raise before they
        # reach the server), so its lease runs out while its handler still runs; worker B
        # gets the job and completes it. A's late outcome is refused (409 for its item) and
        # dropped, and A goes on working.
        # Concurrency 1: busy with its handler, A cannot claim the rescued job again itself.
        a = self.worker(concurrency=1, lease_seconds=1, heartbeat_seconds=0.3, worker_id=f"a-{self.queue}")

        def partitioned(*args: Any, **kw: Any) -> Any:
            raise OSError("network unreachable (test)")

        a.client.heartbeat = partitioned  # type: ignore[method-assign]
        a_started = threading.Event()
        runs: List[str] = []

        @a.handler("test.slow")
        def slow_a(args: Dict[str, Any], job: Job) -> None:
            runs.append(f"a:{job.id}")
            a_started.set()
            time.sleep(args["seconds"])

        job_id = self.enqueue("test.slow", {"seconds": 4})
        self.start(a)
        self.assertTrue(a_started.wait(20))
        b = self.worker(worker_id=f"b-{self.queue}")
        b.register("test.slow", lambda args, job: runs.append(f"b:{job.id}"))
        self.start(b)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "completed", timeout=20)
        b.stop()
        time.sleep(4)  # A's handler ends and its outcome is refused
        job = self.server.job(job_id)
        self.assertEqual(
            [(x["outcome"], x["worker"]) for x in job["attempts"]],
            [("lease_expired", a.worker_id), ("completed", b.worker_id)],
        )
        self.assertEqual(runs, [f"a:{job_id}", f"b:{job_id}"])
        # A is not wedged: it runs the next job.
        next_id = self.enqueue("test.slow", {"seconds": 0})
        self.server.wait_job(next_id, lambda j: j["state"] == "completed", timeout=20)
        self.assertEqual(runs[-1], f"a:{next_id}")

    def test_a_worker_killed_mid_job_loses_it_to_another_worker(self) -> None:
        markers = self.server.dir
        job_id = self.enqueue("test.sleep", {"seconds": 2})
        first = self.spawn(lease=2, grace=5, markers=markers)
        wait_until(lambda: glob.glob(f"{markers}/started-{job_id}-{first.pid}"), 20, "the first worker starts the job")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = self.spawn(lease=2, grace=5, markers=markers)
        job = self.server.wait_job(job_id, lambda j: j["state"] == "completed", timeout=30)
        self.assertFalse(glob.glob(f"{markers}/done-{job_id}-{first.pid}"))
        self.assertTrue(glob.glob(f"{markers}/done-{job_id}-{second.pid}"))
        outcomes = [(a["outcome"], a["worker"]) for a in job["attempts"]]
        self.assertEqual(outcomes, [("lease_expired", f"py-{first.pid}"), ("completed", f"py-{second.pid}")])

    def test_sigterm_lets_the_running_job_finish_and_exits_zero(self) -> None:
        markers = self.server.dir
        job_id = self.enqueue("test.sleep", {"seconds": 1.5})
        proc = self.spawn(lease=10, grace=20, markers=markers)
        wait_until(lambda: glob.glob(f"{markers}/started-{job_id}-{proc.pid}"), 20, "the worker starts the job")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: "SIGTERM: claiming no more jobs" in self.log_of(proc), 10, "the worker takes the signal")
        # Enqueued once the worker has taken SIGTERM: it must not run it.
        later = self.enqueue("test.sleep", {"seconds": 0})
        self.assertEqual(proc.wait(30), 0, self.log_of(proc))
        self.assertTrue(glob.glob(f"{markers}/done-{job_id}-{proc.pid}"))
        self.assertEqual(self.server.job(job_id)["state"], "completed")
        after = self.server.job(later)
        self.assertIn(after["state"], ("available", "scheduled"), after)
        self.assertNotIn("completed", [a["outcome"] for a in after["attempts"]])

    def test_sigterm_hands_back_a_job_that_outlives_the_grace(self) -> None:
        markers = self.server.dir
        job_id = self.enqueue("test.sleep", {"seconds": 30})
        proc = self.spawn(lease=10, grace=0.5, markers=markers)
        wait_until(lambda: glob.glob(f"{markers}/started-{job_id}-{proc.pid}"), 20, "the worker starts the job")
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(30), 0, self.log_of(proc))
        # The grace (0.5 s) and a last long poll (1 s), not the handler's 30 s.
        self.assertLess(time.monotonic() - stopped, 10)
        job = self.server.job(job_id)
        self.assertIn(job["state"], ("available", "scheduled"), job)
        self.assertEqual([a["outcome"] for a in job["attempts"]], ["snoozed"], "handed back, no attempt used")
        self.assertEqual(job["attempt"], 0)

    def test_outcomes_are_sent_in_batches(self) -> None:
        w = self.worker(concurrency=40, finish_interval=0.2)
        sizes: List[int] = []
        send = w.client.finish

        def counting(worker_id: str, items: Any) -> Any:
            sizes.append(len(items))
            return send(worker_id, items)

        w.client.finish = counting  # type: ignore[method-assign]
        w.register("test.quick", lambda args, job: None)
        ids = [self.enqueue("test.quick", {"n": n}) for n in range(40)]
        self.start(w)
        for i in ids:
            self.server.wait_job(i, lambda j: j["state"] == "completed")
        self.assertEqual(sum(sizes), 40, "one outcome per job")
        self.assertLess(len(sizes), 40, f"batched, not one call per job: {sizes}")

    def test_a_cancel_request_reaches_the_running_handler(self) -> None:
        w = self.worker(lease_seconds=2, heartbeat_seconds=0.3)
        started = threading.Event()
        seen = threading.Event()

        @w.handler("test.long")
        def long(args: Any, job: Job) -> None:
            if job.attempt > 1:
                return
            started.set()
            if job.cancel_requested.wait(20):
                seen.set()
                raise RuntimeError("stopped: cancel requested")

        job_id = self.enqueue("test.long", {})
        self.start(w)
        self.assertTrue(started.wait(20))
        answer = self.server.admin.request("POST", f"/v1/jobs/{job_id}/cancel", {})
        self.assertEqual(answer["result"], "requested")
        # The next heartbeat (every 0.3 s) carries the request to the handler.
        self.assertTrue(seen.wait(5), "job.cancel_requested was set")
        job = self.server.wait_job(job_id, lambda j: len(j["attempts"]) >= 1, timeout=10)
        self.assertEqual(job["attempts"][0]["error"], "RuntimeError: stopped: cancel requested")

    def test_a_key_restricted_to_other_queues_is_refused(self) -> None:
        key = self.server.create_key("worker", f"other-{self.queue}", queues=["elsewhere"])
        w = Worker(self.server.url, key, queues=[self.queue], wait_seconds=0)
        w.register("test.sleep", lambda args, job: None)
        with self.assertRaises(ApiError) as caught:
            w.run(install_signal_handlers=False)
        self.assertEqual(caught.exception.status, 403)

    def test_a_key_without_the_worker_scope_is_refused(self) -> None:
        read_key = self.server.create_key("read", f"read-{self.queue}")
        w = Worker(self.server.url, read_key, queues=[self.queue], wait_seconds=0)
        w.register("test.sleep", lambda args, job: None)
        with self.assertRaises(ApiError) as caught:
            w.run(install_signal_handlers=False)
        self.assertEqual(caught.exception.status, 403)

    def test_bad_settings_are_refused_with_the_setting_named(self) -> None:
        cases: List[Tuple[Dict[str, Any], str]] = [
            ({"concurrency": 0}, "concurrency"),
            ({"lease_seconds": 0}, "lease_seconds"),
            ({"wait_seconds": 31}, "wait_seconds"),
            ({"lease_seconds": 10, "heartbeat_seconds": 6}, "heartbeat_seconds"),
            ({"queues": []}, "queues"),
        ]
        for kw, word in cases:
            with self.assertRaises(ValueError) as caught:
                Worker(self.server.url, self.server.worker_key, **kw)
            self.assertIn(word, str(caught.exception))
        with self.assertRaises(ValueError):
            Worker("ftp://example.com", self.server.worker_key)
        w = self.worker()
        w.register("a.kind", lambda args, job: None)
        with self.assertRaises(ValueError):
            w.register("a.kind", lambda args, job: None)


if __name__ == "__main__":
    unittest.main()
