"""Throughput of the Python worker: N no-op jobs enqueued in batches on a fresh
`conveyor serve` (SQLite, see harness.py), then timed from the worker's start until every
handler has run and the worker has stopped (every outcome recorded).

    CONVEYOR_BIN=target/debug/conveyor python3 clients/python/tests/throughput.py [N] [CONCURRENCY]
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from harness import Server

from conveyor_worker import Job, Worker


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 500
    server = Server()
    try:
        for start in range(0, n, 1000):
            jobs = [{"kind": "noop", "queue": "bench", "args": {"i": i}} for i in range(start, min(n, start + 1000))]
            server.admin.request("POST", "/v1/jobs/batch", {"jobs": jobs})
        worker = Worker(
            server.url,
            server.worker_key,
            queues=["bench"],
            concurrency=concurrency,
            wait_seconds=1,
            finish_batch=1000,
            finish_interval=0.05,
        )
        lock = threading.Lock()
        done = [0]
        finished = threading.Event()

        def noop(args: Any, job: Job) -> None:
            with lock:
                done[0] += 1
                if done[0] == n:
                    finished.set()

        worker.register("noop", noop)
        started = time.monotonic()
        runner = threading.Thread(target=worker.run, kwargs={"install_signal_handlers": False})
        runner.start()
        if not finished.wait(600):
            raise SystemExit(f"only {done[0]} of {n} jobs ran in 600 s")
        worker.stop()
        runner.join()
        elapsed = time.monotonic() - started
        left = server.admin.request("GET", "/v1/jobs?queue=bench&state=running,available&limit=1")
        assert not left["jobs"], f"jobs left unfinished: {left}"
        print(f"python worker: {n} jobs, concurrency {concurrency}: {elapsed:.2f} s, {n / elapsed:.0f} jobs/s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
