"""A Conveyor worker in Python: claims jobs from a Conveyor server over HTTP and runs them.

    from conveyor_worker import Worker

    worker = Worker("http://127.0.0.1:8080", key, queues=["default"], concurrency=8)

    @worker.handler("email.send")
    def send(args, job):
        ...

    worker.run()
"""

from .client import ApiError, Client, EnqueuedJob, LeaseLost
from .outcome import PermanentFailure, RetryAfter, Snooze, describe_error
from .worker import Job, Worker

__all__ = [
    "ApiError",
    "Client",
    "EnqueuedJob",
    "Job",
    "LeaseLost",
    "PermanentFailure",
    "RetryAfter",
    "Snooze",
    "Worker",
    "describe_error",
]
__version__ = "0.1.0"
