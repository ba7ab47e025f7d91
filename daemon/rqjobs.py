"""RQ jobs written as rq 3.0 writes them, without building RQ's `Job` for each.

`Queue.enqueue_call` costs the daemon ~150 us of Python per job (a `Job` object, its setters, a
`Protocol` check of the serializer, `to_dict`'s twenty fields, a uuid and two timestamps formatted,
and four commands packed: `SADD rq:queues`, `HSET status`, the job hash, `RPUSH`). A dispatcher of a
wide ticket enqueues hundreds of jobs a second on the two cores its worker uses, so this module
queues the same job with the same commands RQ's `_enqueue_async_job` sends, less two that change
nothing: the separate `HSET ... status queued` (the hash that follows sets `status` again) and the
`SADD` of a queue already added in the same transaction. What lands in Redis is the hash RQ writes,
field for field (tested against `enqueue_call`: `tests/test_rqjobs.py`), so RQ's worker, `Job.fetch`
and `rq info` see a job RQ itself enqueued.

Only for the RQ release whose layout this repeats (`RQ_LAYOUT_KNOWN`, checked: 3.0.0, which the
project pins); with another release the dispatcher calls RQ's own `enqueue_call`.
"""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from typing import Any

from rq.version import VERSION as RQ_VERSION

RQ_LAYOUT_KNOWN = RQ_VERSION.split(".")[:2] == ["3", "0"]
QUEUES_KEY = "rq:queues"  # rq 3.0: Queue.redis_queues_keys
QUEUE_PREFIX = "rq:queue:"  # Queue.redis_queue_namespace_prefix
JOB_PREFIX = "rq:job:"  # Job.redis_job_namespace_prefix
_TIMESTAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # rq.utils._TIMESTAMP_FORMAT


def rq_time(at: datetime | None = None) -> str:
    """A timestamp as RQ stores it (`rq.utils.utcformat` of an aware UTC time)."""
    return (at or datetime.now(UTC)).strftime(_TIMESTAMP)


def job_data(func: str, args: tuple[Any, ...]) -> bytes:
    """The job's `data` field: RQ's `JSONSerializer.dumps((func, instance, args, kwargs))`, compressed."""
    return zlib.compress(json.dumps((func, None, args, {})).encode("utf-8"))


class JobWriter:
    """Queues RQ jobs on one pipeline (a `MULTI` one, as RQ's own enqueue uses); `execute` sends them.
    `at` is the jobs' `created_at` and `enqueued_at`: RQ takes two clocks a few microseconds apart, a
    batch here takes one."""

    def __init__(self, pipe: Any, at: str | None = None) -> None:
        self.pipe = pipe
        self.at = at or rq_time()
        self._queues: set[str] = set()

    def add(
        self,
        queue: str,
        job_id: str,
        func: str,
        args: tuple[Any, ...],
        *,
        timeout: int,
        result_ttl: int,
        failure_ttl: int,
        description: str,
    ) -> None:
        """The commands of `Queue(queue).enqueue_call(func, args, job_id=..., timeout=..., result_ttl=...,
        failure_ttl=..., description=..., pipeline=pipe)` with a JSONSerializer queue (no ttl, meta,
        dependencies, retries or callbacks: the dispatcher sets none)."""
        key = QUEUE_PREFIX + queue
        if queue not in self._queues:
            self.pipe.sadd(QUEUES_KEY, key)
            self._queues.add(queue)
        at = self.at
        # The fields are `Job.to_dict`'s for such a job (rq 3.0); `status` first, as RQ's separate HSET of it
        # comes first (a hash has no order to speak of once its `data` makes it a real hash table).
        self.pipe.hset(
            JOB_PREFIX + job_id,
            mapping={
                "status": "queued",
                "created_at": at,
                "data": job_data(func, args),
                "success_callback_name": "",
                "failure_callback_name": "",
                "stopped_callback_name": "",
                "started_at": "",
                "ended_at": "",
                "last_heartbeat": "",
                "worker_name": "",
                "group_id": "",
                "origin": queue,
                "description": description,
                "enqueued_at": at,
                "timeout": timeout,
                "result_ttl": result_ttl,
                "failure_ttl": failure_ttl,
            },
        )
        self.pipe.rpush(key, job_id)

    def execute(self) -> None:
        self.pipe.execute()
        self._queues.clear()  # a pipeline is empty after execute: the next transaction adds them again
        self.at = rq_time()
