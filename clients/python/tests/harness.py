"""Starts a real `conveyor serve` (SQLite in a temporary folder, a free port) for the tests.

The binary is `$CONVEYOR_BIN`. Without it the tests are skipped with the reason printed,
unless `CI=true`, where a missing binary fails them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)

from conveyor_worker import Client  # noqa: E402

# The tests check outcomes through the API; the worker's own log stays quiet unless asked for
# (CONVEYOR_TEST_LOG=1).
logging.getLogger("conveyor_worker").addHandler(logging.NullHandler())
if os.environ.get("CONVEYOR_TEST_LOG") == "1":
    logging.basicConfig(level=logging.INFO)

# Short leases and a fast rescuer, so a killed worker's job is back within seconds.
SERVER_ENV = {
    "CONVEYOR_MAINTENANCE__RESCUER__INTERVAL": "200ms",
    "CONVEYOR_MAINTENANCE__RESCUER__RETRY__BASE": "100ms",
    "CONVEYOR_MAINTENANCE__RESCUER__RETRY__JITTER": "0",
    "CONVEYOR_MAINTENANCE__PROMOTER__INTERVAL": "100ms",
    "CONVEYOR_API__RATE_LIMIT__PER_SECOND": "100000",
    "CONVEYOR_API__RATE_LIMIT__BURST": "100000",
}


def binary() -> str:
    path = os.environ.get("CONVEYOR_BIN")
    if path and os.access(path, os.X_OK):
        return path
    reason = f"CONVEYOR_BIN is {'not set' if not path else repr(path) + ', not an executable'}; set it to a built `conveyor`"
    if os.environ.get("CI") == "true":
        raise RuntimeError(reason)
    raise unittest.SkipTest(reason)


class Server:
    """One `conveyor serve --roles api,scheduler` on a fresh SQLite store: the API and the
    maintenance (promoter, rescuer) run; no native worker, so only the workers under test
    run jobs."""

    def __init__(self) -> None:
        self.bin = binary()
        self.dir = tempfile.mkdtemp(prefix="conveyor-py-")
        self.db = f"sqlite://{self.dir}/conveyor.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CONVEYOR_") and k != "RUST_LOG"}
        self.env.update(SERVER_ENV)
        self._cli("migrate")
        self.worker_key = self.create_key("worker", "py-worker")
        self.admin_key = self.create_key("admin", "py-admin")
        self.log_path = os.path.join(self.dir, "serve.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.bin, "serve", "--roles", "api,scheduler", "--database-url", self.db, "--listen", "127.0.0.1:0"],
            cwd=self.dir,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = self._wait_listening()
        self.admin = Client(self.url, self.admin_key)

    def _cli(self, *args: str) -> str:
        out = subprocess.run(
            [self.bin, *args, "--database-url", self.db],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise RuntimeError(f"conveyor {' '.join(args)} exited {out.returncode}: {out.stderr}")
        return out.stdout

    def create_key(self, scope: str, name: str, queues: Optional[List[str]] = None) -> str:
        args = ["keys", "create", "--scope", scope, "--name", name, "--json"]
        for q in queues or []:
            args += ["--queue", q]
        key: str = json.loads(self._cli(*args))["key"]
        return key

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as f:
                m = re.search(rb"listening on (http://[0-9.:]+)", f.read())
            if m:
                return m.group(1).decode()
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"conveyor serve did not start listening:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")[-8000:]

    def job(self, job_id: str) -> Dict[str, Any]:
        return self.admin.get_job(job_id)

    def wait_job(self, job_id: str, pred: Callable[[Dict[str, Any]], bool], timeout: float = 30) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while not pred(job):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} did not reach the expected state in {timeout}s: {json.dumps(job, indent=1)}")
            time.sleep(0.05)
            job = self.job(job_id)
        return job

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self.admin.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.02)
