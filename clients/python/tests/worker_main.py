"""A worker process for the process-level tests (SIGKILL, SIGTERM).

    python worker_main.py URL KEY QUEUE LEASE_SECONDS SHUTDOWN_GRACE MARKER_DIR

Kind `test.sleep` writes MARKER_DIR/started-<job id>-<pid>, sleeps `args.seconds`, then
writes MARKER_DIR/done-<job id>-<pid> and completes.
"""

import logging
import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from conveyor_worker import Job, Worker  # noqa: E402


def main() -> None:
    url, key, queue, lease, grace, markers = sys.argv[1:7]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    worker = Worker(
        url,
        key,
        queues=[queue],
        concurrency=2,
        lease_seconds=int(lease),
        wait_seconds=1,
        shutdown_grace=float(grace),
        worker_id=f"py-{os.getpid()}",
    )

    @worker.handler("test.sleep")
    def sleep(args: Dict[str, Any], job: Job) -> None:
        open(os.path.join(markers, f"started-{job.id}-{os.getpid()}"), "w").close()
        time.sleep(float(args["seconds"]))
        open(os.path.join(markers, f"done-{job.id}-{os.getpid()}"), "w").close()

    worker.run()


if __name__ == "__main__":
    main()
