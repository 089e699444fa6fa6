"""The worker: claims jobs over HTTP, runs the registered handlers on a pool of threads,
renews the leases it holds, and sends outcomes in batches."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .client import ApiError, Client
from .outcome import PermanentFailure, RetryAfter, Snooze, describe_error

__all__ = ["Job", "Worker", "Handler"]

log = logging.getLogger("conveyor_worker")

# How long a job whose kind has no handler here waits before it is claimed again (a snooze:
# the attempt does not count), so a worker with the kind can pick it up.
NO_HANDLER_SNOOZE = 60


@dataclass
class Job:
    """One claimed job, as the handler sees it."""

    id: str
    queue: str
    kind: str
    args: Any
    attempt: int
    max_attempts: int
    priority: int = 0
    tags: List[str] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)
    created_at: Optional[str] = None
    lease_expires_at: Optional[str] = None
    lease_lost: threading.Event = field(default_factory=threading.Event, repr=False)
    """Set when the server says this worker no longer holds the lease (the job was rescued):
    a long handler may check it and stop early; its outcome is dropped either way."""
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    """Set when someone asked to cancel the job (carried by the next heartbeat): the handler
    should stop early and raise."""
    _reporter: Optional[Callable[["Job", float, Optional[str]], bool]] = field(default=None, repr=False)

    def report_progress(self, percent: float, message: Optional[str] = None) -> bool:
        """Reports how far the attempt has got: ``percent`` (0 to 100) and an optional
        message (at most 1024 bytes are kept), shown as the job's ``progress`` by
        ``GET /v1/jobs/{id}`` while it runs. One request per call: report at most a few
        times a second. Returns whether the server recorded it (``False`` when the lease
        was lost, or the server could not be reached; the job carries on either way)."""
        if not isinstance(percent, (int, float)) or not 0 <= percent <= 100:
            raise ValueError(f"percent: {percent!r} is not a number from 0 to 100")
        if self._reporter is None:
            return False
        return self._reporter(self, float(percent), message)

    @classmethod
    def from_api(cls, raw: Mapping[str, Any]) -> "Job":
        return cls(
            id=str(raw["id"]),
            queue=str(raw.get("queue", "")),
            kind=str(raw["kind"]),
            args=raw.get("args"),
            attempt=int(raw.get("attempt", 1)),
            max_attempts=int(raw.get("max_attempts", 1)),
            priority=int(raw.get("priority", 0)),
            tags=list(raw.get("tags") or []),
            metadata=dict(raw.get("metadata") or {}),
            created_at=raw.get("created_at"),
            lease_expires_at=raw.get("lease_expires_at"),
        )


Handler = Callable[[Any, Job], Any]


class Worker:
    """Runs handlers for jobs claimed from ``queues`` of the Conveyor API at ``url``.

    ``key`` needs scope ``worker`` (``conveyor keys create --scope worker --name NAME``).
    ``concurrency`` jobs run at once, each on its own thread; a handler may also be an
    ``async def`` (run with :func:`asyncio.run` on that thread). Leases last
    ``lease_seconds`` and are renewed every ``heartbeat_seconds`` (a third of the lease by
    default) while the job runs; a worker that stops heartbeating (killed, hung) loses its jobs
    to the server's rescuer. On SIGTERM or SIGINT (or :meth:`stop`) the worker claims no more
    and gives running jobs ``shutdown_grace`` seconds to finish; jobs still running then are
    handed back (snoozed for 0 s, the attempt does not count).
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        queues: Sequence[str] = ("default",),
        concurrency: int = 10,
        lease_seconds: int = 30,
        heartbeat_seconds: Optional[float] = None,
        wait_seconds: int = 10,
        shutdown_grace: float = 30.0,
        finish_batch: int = 100,
        finish_interval: float = 0.02,
        worker_id: Optional[str] = None,
    ) -> None:
        if not queues:
            raise ValueError("queues: empty; name at least one queue, e.g. queues=['default']")
        if not 1 <= concurrency <= 1000:
            raise ValueError(f"concurrency: {concurrency} is out of range; use 1 to 1000")
        if not 1 <= lease_seconds <= 3600:
            raise ValueError(f"lease_seconds: {lease_seconds} is out of range; use 1 to 3600")
        if not 0 <= wait_seconds <= 30:
            raise ValueError(f"wait_seconds: {wait_seconds} is out of range; use 0 to 30")
        if heartbeat_seconds is None:
            heartbeat_seconds = lease_seconds / 3
        if not 0 < heartbeat_seconds <= lease_seconds / 2:
            raise ValueError(
                f"heartbeat_seconds: {heartbeat_seconds} must be above 0 and at most half of lease_seconds ({lease_seconds})"
            )
        if not 1 <= finish_batch <= 1000:
            raise ValueError(f"finish_batch: {finish_batch} is out of range; use 1 to 1000")
        self.client = Client(url, key)
        self.queues = list(queues)
        self.concurrency = concurrency
        self.lease_seconds = int(lease_seconds)
        self.heartbeat_seconds = float(heartbeat_seconds)
        self.wait_seconds = int(wait_seconds)
        self.shutdown_grace = float(shutdown_grace)
        self.finish_batch = finish_batch
        self.finish_interval = finish_interval
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._handlers: Dict[str, Handler] = {}
        self._lock = threading.Condition()
        self._running: Dict[str, Job] = {}  # handler still running
        self._held: Dict[str, Job] = {}  # leased: running or outcome not yet recorded
        self._outcomes: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._closed = threading.Event()
        self._fatal: Optional[BaseException] = None

    # -- registration --------------------------------------------------------------------

    def handler(self, kind: str) -> Callable[[Handler], Handler]:
        """Decorator: ``@worker.handler("email.send")`` registers ``fn(args, job)``."""

        def register(fn: Handler) -> Handler:
            self.register(kind, fn)
            return fn

        return register

    def register(self, kind: str, fn: Handler) -> None:
        """Registers ``fn(args, job)`` as the handler of ``kind``."""
        if not kind:
            raise ValueError("kind: empty; name the job kind, e.g. 'email.send'")
        if kind in self._handlers:
            raise ValueError(f"kind: `{kind}` already has a handler")
        self._handlers[kind] = fn

    # -- lifecycle -----------------------------------------------------------------------

    def stop(self, hurry: bool = False) -> None:
        """Stops claiming; running jobs get the grace period (none with ``hurry``)."""
        self._stopping.set()
        if hurry:
            self._hurry.set()
        with self._lock:
            self._lock.notify_all()

    def run(self, install_signal_handlers: bool = True) -> None:
        """Runs until :meth:`stop`, SIGTERM or SIGINT (a second signal skips the grace
        period), then shuts down gracefully and returns. Raises :class:`ApiError` if the
        server refuses the worker for good (a bad key, a queue outside the key's scope)."""
        if not self._handlers:
            raise ValueError("no handlers registered; add one with @worker.handler('kind')")
        previous: Dict[int, Any] = {}
        if install_signal_handlers and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        threads = [
            threading.Thread(target=self._closing(self._claim_loop), name="conveyor-claim", daemon=True),
            threading.Thread(target=self._closing(self._heartbeat_loop), name="conveyor-heartbeat", daemon=True),
            threading.Thread(target=self._closing(self._finish_loop), name="conveyor-finish", daemon=True),
        ]
        for t in threads:
            t.start()
        self._claimer = threads[0]
        log.info("worker %s started on queues %s (concurrency %d)", self.worker_id, self.queues, self.concurrency)
        try:
            while not self._stopping.wait(0.2):
                pass
            self._drain()
        finally:
            for signum, before in previous.items():
                signal.signal(signum, before)
        if self._fatal is not None:
            raise self._fatal

    def _closing(self, loop: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                loop()
            finally:
                self.client.close()  # this thread's connection

        return run

    def _on_signal(self, signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if self._stopping.is_set():
            log.warning("%s again: not waiting for running jobs", name)
            self.stop(hurry=True)
        else:
            log.info("%s: claiming no more jobs; running jobs have %.0fs to finish", name, self.shutdown_grace)
            self.stop()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.shutdown_grace
        with self._lock:
            while self._running and not self._hurry.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(min(left, 0.2))
            unfinished = list(self._running.values())
            self._running.clear()
        if not self._hurry.is_set():
            # A long poll under way at the stop hands back what it claims; wait for it.
            self._claimer.join(self.wait_seconds + self.client.timeout)
        for job in unfinished:
            log.warning("job %s (%s) still running at shutdown: handing it back", job.id, job.kind)
            self._outcomes.put({"id": job.id, "attempt": job.attempt, "outcome": "snooze", "seconds": 0})
        # Wait for the outcomes to be recorded (the heartbeat keeps their leases meanwhile).
        flush_deadline = time.monotonic() + max(5.0, self.heartbeat_seconds)
        with self._lock:
            while self._held and time.monotonic() < flush_deadline:
                self._lock.wait(0.05)
            if self._held:
                log.warning("%d outcomes not recorded at exit; their leases will expire", len(self._held))
        self._closed.set()
        log.info("worker %s stopped", self.worker_id)

    # -- claiming and running ------------------------------------------------------------

    def _claim_loop(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            with self._lock:
                while len(self._running) >= self.concurrency and not self._stopping.is_set():
                    self._lock.wait(0.5)
                free = self.concurrency - len(self._running)
            if self._stopping.is_set():
                return
            try:
                raw_jobs = self.client.claim(self.worker_id, self.queues, free, self.lease_seconds, self.wait_seconds)
                backoff = 0.0
            except ApiError as e:
                if e.status in (400, 401, 403, 404, 422):
                    log.error("claim refused, stopping: %s", e)
                    self._fatal = e
                    self.stop(hurry=True)
                    return
                backoff = e.retry_after if e.retry_after is not None else min(max(backoff * 2, 0.5), 10.0)
                log.warning("claim failed (%s); again in %.1fs", e, backoff)
                self._stopping.wait(backoff)
                continue
            except (OSError, ValueError) as e:
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("claim failed (%s); again in %.1fs", e, backoff)
                self._stopping.wait(backoff)
                continue
            for raw in raw_jobs:
                job = Job.from_api(raw)
                if self._stopping.is_set():
                    # Claimed by a long poll that was under way when the stop came: handed
                    # back at once, without running and without using an attempt.
                    with self._lock:
                        self._held[job.id] = job
                    self._outcomes.put({"id": job.id, "attempt": job.attempt, "outcome": "snooze", "seconds": 0})
                    continue
                job._reporter = self._report_progress
                with self._lock:
                    self._running[job.id] = job
                    self._held[job.id] = job
                threading.Thread(target=self._execute, args=(job,), name=f"conveyor-job-{job.id}", daemon=True).start()

    def _execute(self, job: Job) -> None:
        fn = self._handlers.get(job.kind)
        item: Dict[str, Any] = {"id": job.id, "attempt": job.attempt}
        if fn is None:
            log.warning("no handler for kind `%s` (job %s): snoozed %ds", job.kind, job.id, NO_HANDLER_SNOOZE)
            item.update(outcome="snooze", seconds=NO_HANDLER_SNOOZE)
        else:
            try:
                value = fn(job.args, job)
                if inspect.isawaitable(value):
                    value = asyncio.run(_await(value))
                if isinstance(value, (Snooze, RetryAfter, PermanentFailure)):
                    raise value
                item["outcome"] = "complete"
                if value is not None:
                    # The result travels as JSON: a value that is not is the handler's error.
                    json.dumps(value)
                    item["result"] = value
            except Snooze as s:
                item.update(outcome="snooze", seconds=s.seconds)
            except RetryAfter as r:
                item.update(outcome="fail", error=describe_error(r), retryable=True, retry_after_seconds=r.seconds)
            except PermanentFailure as p:
                item.update(outcome="fail", error=describe_error(p), retryable=False)
            except BaseException as e:  # noqa: BLE001 - a handler's failure of any kind is the job's
                item.update(outcome="fail", error=describe_error(e), retryable=True)
        with self._lock:
            still_ours = self._running.pop(job.id, None) is not None
            self._lock.notify_all()
        if not still_ours:
            return  # handed back at shutdown after the grace period
        if job.lease_lost.is_set():
            # Rescued meanwhile (perhaps running elsewhere now): the outcome would be refused.
            log.warning("job %s finished after its lease was lost; outcome dropped", job.id)
            with self._lock:
                self._held.pop(job.id, None)
                self._lock.notify_all()
            return
        self._outcomes.put(item)

    def _report_progress(self, job: Job, percent: float, message: Optional[str]) -> bool:
        if job.lease_lost.is_set():
            return False
        try:
            self.client.report_progress(self.worker_id, job.id, job.attempt, percent, message)
            return True
        except ApiError as e:
            log.warning("job %s: progress not recorded: %s", job.id, e)
        except (OSError, ValueError) as e:
            log.warning("job %s: progress not sent: %s", job.id, e)
        return False

    # -- outcomes ------------------------------------------------------------------------

    def _finish_loop(self) -> None:
        while not self._closed.is_set():
            try:
                batch = [self._outcomes.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.finish_interval
            while len(batch) < self.finish_batch:
                try:
                    batch.append(self._outcomes.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            with self._lock:
                batch = [i for i in batch if i["id"] in self._held and not self._held[i["id"]].lease_lost.is_set()]
            if batch:
                self._send(batch)

    def _send(self, batch: List[Dict[str, Any]]) -> None:
        delay = 0.2
        while True:
            try:
                answers = self.client.finish(self.worker_id, batch)
                break
            except ApiError as e:
                if e.status in (429,) or e.status >= 500:
                    delay = e.retry_after if e.retry_after is not None else min(delay * 2, 5.0)
                else:
                    log.error("outcomes refused (%s); dropped: %s", e, [i["id"] for i in batch])
                    answers = []
                    break
            except (OSError, ValueError) as e:
                delay = min(delay * 2, 5.0)
                log.warning("sending outcomes failed (%s); again in %.1fs", e, delay)
            if self._closed.is_set():
                return
            time.sleep(delay)
        for answer in answers:
            status = answer.get("status")
            if status == 409 or status == "conflict":
                log.warning("job %s: lease lost before its outcome arrived; dropped", answer.get("id"))
            elif isinstance(status, int) and not 200 <= status < 300:
                log.error("job %s: outcome refused: %s", answer.get("id"), answer.get("error"))
        with self._lock:
            for item in batch:
                self._held.pop(item["id"], None)
            self._lock.notify_all()

    # -- leases --------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(self.heartbeat_seconds):
            with self._lock:
                ids = list(self._held)
            # The route takes at most 1000 ids a call.
            for start in range(0, len(ids), 1000):
                self._heartbeat(ids[start : start + 1000])

    def _heartbeat(self, ids: List[str]) -> None:
        try:
            answer = self.client.heartbeat(self.worker_id, ids, self.lease_seconds)
        except (ApiError, OSError, ValueError) as e:
            log.warning("heartbeat failed: %s", e)
            return
        lost = [str(i) for i in answer.get("lost", [])]
        if lost:
            log.warning("leases lost (jobs rescued): %s", lost)
        with self._lock:
            for job_id in lost:
                job = self._held.pop(job_id, None)
                if job is not None:
                    job.lease_lost.set()
            for job_id in answer.get("cancel_requested", []):
                job = self._held.get(str(job_id))
                if job is not None and not job.cancel_requested.is_set():
                    log.info("job %s: cancel requested", job_id)
                    job.cancel_requested.set()
            self._lock.notify_all()


async def _await(value: Any) -> Any:
    return await value

