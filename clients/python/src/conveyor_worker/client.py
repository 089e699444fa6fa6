"""A small HTTP client for Conveyor's API: the remote-worker routes and enqueue.

Standard library only (``http.client``). One persistent connection per thread, so a worker's
claim loop, heartbeat thread and completion thread each keep their own connection open.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence

__all__ = ["ApiError", "LeaseLost", "Client", "EnqueuedJob", "TERMINAL_STATES"]

# The states a job ends in: what :meth:`EnqueuedJob.wait` waits for.
TERMINAL_STATES = frozenset({"completed", "cancelled", "dead"})

# The longest wait one ``GET /v1/jobs/{id}?wait=`` may ask for, in seconds (the server refuses
# longer); a longer wait asks again.
MAX_WAIT_STEP = 60.0


class EnqueuedJob(dict):  # type: ignore[type-arg]
    """The answer to :meth:`Client.enqueue` (``{"duplicate", "job", "warnings"}``, as a
    dict), with :attr:`id` and :meth:`wait`."""

    def __init__(self, answer: Mapping[str, Any], client: "Client") -> None:
        super().__init__(answer)
        self._client = client

    @property
    def id(self) -> str:
        """The job's id."""
        return str(self["job"]["id"])

    def wait(self, timeout: float = 60.0) -> Dict[str, Any]:
        """The job once it has finished (``completed``, ``cancelled`` or ``dead``; its
        ``result`` is what the handler returned), or as it is when ``timeout`` seconds have
        passed (check ``state``). See :meth:`Client.wait`."""
        return self._client.wait(self.id, timeout)



class ApiError(Exception):
    """The API refused a request: ``status`` is the HTTP status, ``problem`` the problem
    document (``type``, ``title``, ``detail``, ``code``, ``errors``) when the server sent one."""

    def __init__(self, status: int, problem: Mapping[str, Any], method: str, path: str) -> None:
        self.status = status
        self.problem: Dict[str, Any] = dict(problem)
        self.code: Optional[str] = self.problem.get("code")
        self.retry_after: Optional[float] = None
        detail = self.problem.get("detail") or self.problem.get("title") or "no detail"
        super().__init__(f"{method} {path}: {status} {detail}")


class LeaseLost(ApiError):
    """409 from a worker route: the job's lease is no longer this worker's (the job was
    rescued and perhaps leased again). Drop the job; do not retry the call."""


# Errors on a reused keep-alive connection that mean the server closed it while idle: the
# request is sent once more on a fresh connection.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.CannotSendRequest)


class Client:
    """Calls one Conveyor API with one key.

    ``base_url`` is the API's address (``http://127.0.0.1:8080``), ``key`` an API key
    (``cvk_…``): scope ``worker`` for the worker routes, ``enqueue`` (or ``admin``) for
    :meth:`enqueue`, ``read`` for :meth:`get_job`.
    """

    def __init__(self, base_url: str, key: str, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(
                f"base_url: `{base_url}` is not an http(s) URL; use e.g. http://127.0.0.1:8080"
            )
        if not key:
            raise ValueError("key: empty; create one with `conveyor keys create --scope worker --name NAME`")
        self._scheme = parsed.scheme
        self._host = parsed.hostname
        self._port = parsed.port
        self._prefix = parsed.path.rstrip("/")
        self._key = key
        self.timeout = timeout
        self._local = threading.local()

    # -- transport -----------------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: Optional[float] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Any:
        """Sends one request and returns the decoded JSON answer (``None`` for an empty one).
        Raises :class:`LeaseLost` on 409 from a worker route, :class:`ApiError` on any other
        refusal, ``OSError`` when the server cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        if headers:
            hdrs.update(headers)
        full = self._prefix + path
        wait = self.timeout if timeout is None else timeout
        for attempt in (1, 2):
            conn = self._connection(wait)
            reused = conn.sock is not None
            try:
                conn.request(method, full, body=data, headers=hdrs)
                resp = conn.getresponse()
                raw = resp.read()
            except _STALE:
                self._drop_connection()
                if reused and attempt == 1:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self._drop_connection()
                raise
            if resp.getheader("Connection", "").lower() == "close":
                self._drop_connection()
            return self._answer(resp.status, resp.getheader("Retry-After"), raw, method, path)
        raise AssertionError("unreachable")

    @staticmethod
    def _answer(status: int, retry_after: Optional[str], raw: bytes, method: str, path: str) -> Any:
        if 200 <= status < 300:
            return json.loads(raw) if raw.strip() else None
        try:
            problem = json.loads(raw) if raw.strip() else {}
            if not isinstance(problem, dict):
                problem = {"detail": str(problem)}
        except ValueError:
            problem = {"detail": raw.decode("utf-8", "replace")[:500]}
        cls = LeaseLost if status == 409 and path.startswith("/v1/workers/") else ApiError
        err = cls(status, problem, method, path)
        if retry_after is not None:
            try:
                err.retry_after = float(retry_after)
            except ValueError:
                pass
        raise err

    def close(self) -> None:
        """Closes this thread's connection."""
        self._drop_connection()

    # -- application routes --------------------------------------------------------------

    def enqueue(
        self,
        kind: str,
        args: Any = None,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        max_attempts: Optional[int] = None,
        run_at: Optional[str] = None,
        delay_seconds: Optional[int] = None,
        idempotency_key: Optional[str] = None,
        tags: Optional[Sequence[str]] = None,
        metadata: Optional[Mapping[str, Any]] = None,
    ) -> EnqueuedJob:
        """``POST /v1/jobs``: enqueues one job and returns the answer
        (``{"duplicate": bool, "job": {...}, "warnings": [...]}``) as an
        :class:`EnqueuedJob`: ``client.enqueue("report.build", args).wait(30)`` waits for
        its outcome (which also needs the ``read`` scope: an ``admin`` key has both)."""
        body: Dict[str, Any] = {"kind": kind}
        optional = {
            "args": args,
            "queue": queue,
            "priority": priority,
            "max_attempts": max_attempts,
            "run_at": run_at,
            "delay_seconds": delay_seconds,
            "idempotency_key": idempotency_key,
            "tags": list(tags) if tags is not None else None,
            "metadata": dict(metadata) if metadata is not None else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return EnqueuedJob(self.request("POST", "/v1/jobs", body), self)

    def get_job(self, job_id: str) -> Dict[str, Any]:
        """``GET /v1/jobs/{id}``: the job with its attempt history (needs a ``read`` key)."""
        answer: Dict[str, Any] = self.request("GET", f"/v1/jobs/{urllib.parse.quote(job_id)}")
        return answer

    def wait(self, job_id: str, timeout: float = 60.0) -> Dict[str, Any]:
        """The job once it has finished (``completed``, ``cancelled`` or ``dead``), or as it
        is when ``timeout`` seconds have passed (check ``state``). Long-polls
        ``GET /v1/jobs/{id}?wait=`` (at most 60 s a request, asking again while the job runs),
        so the answer comes as soon as the job finishes, without polling. Needs a ``read``
        key; raises :class:`ApiError` (404) if the job does not exist."""
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"timeout: {timeout!r} is not a number of seconds >= 0")
        deadline = time.monotonic() + timeout
        path = f"/v1/jobs/{urllib.parse.quote(job_id)}"
        while True:
            step = max(0.0, min(deadline - time.monotonic(), MAX_WAIT_STEP))
            job: Dict[str, Any] = self.request(
                "GET",
                f"{path}?wait={int(step * 1000)}ms",
                # The server answers by the end of the wait; allow for the trip.
                timeout=step + self.timeout,
            )
            if job.get("state") in TERMINAL_STATES or time.monotonic() >= deadline:
                return job

    # -- worker routes -------------------------------------------------------------------

    def claim(
        self,
        worker_id: str,
        queues: Sequence[str],
        limit: int,
        lease_seconds: int,
        wait_seconds: int,
    ) -> List[Dict[str, Any]]:
        """``POST /v1/workers/claim``: up to ``limit`` jobs, waiting up to ``wait_seconds``
        for the first one."""
        answer = self.request(
            "POST",
            "/v1/workers/claim",
            {
                "worker_id": worker_id,
                "queues": list(queues),
                "limit": limit,
                "lease_seconds": lease_seconds,
                "wait_seconds": wait_seconds,
            },
            timeout=wait_seconds + self.timeout,
        )
        jobs: List[Dict[str, Any]] = answer.get("jobs", []) if answer else []
        return jobs

    def heartbeat(self, worker_id: str, job_ids: Sequence[str], lease_seconds: int) -> Dict[str, Any]:
        """``POST /v1/workers/heartbeat``: renews the leases; answers ``{renewed, lost}``."""
        answer: Dict[str, Any] = self.request(
            "POST",
            "/v1/workers/heartbeat",
            {"worker_id": worker_id, "job_ids": list(job_ids), "lease_seconds": lease_seconds},
        )
        return answer

    def report_progress(
        self, worker_id: str, job_id: str, attempt: int, percent: float, message: Optional[str] = None
    ) -> None:
        """``POST /v1/workers/jobs/{id}/progress``: a running attempt's progress. Raises
        :class:`LeaseLost` when the attempt is not this worker's lease."""
        body: Dict[str, Any] = {"worker_id": worker_id, "attempt": attempt, "percent": percent}
        if message is not None:
            body["message"] = message
        self.request("POST", f"/v1/workers/jobs/{urllib.parse.quote(job_id)}/progress", body)

    def finish(self, worker_id: str, items: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
        """``POST /v1/workers/finish``: records many outcomes in one call; answers one item
        per outcome (``{id, status, state?, error?}``)."""
        answer = self.request("POST", "/v1/workers/finish", {"worker_id": worker_id, "items": list(items)})
        result: List[Dict[str, Any]] = answer.get("items", []) if answer else []
        return result

