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

import redis
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


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _command(*args: bytes) -> bytes:
    """One command in Redis's protocol (RESP), as redis-py packs it."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


_MULTI = _command(b"MULTI")
_EXEC = _command(b"EXEC")
# The job hash's fields that are the same for every job the dispatcher writes, packed once.
_EMPTY = tuple(
    f.encode()
    for f in (
        "success_callback_name",
        "failure_callback_name",
        "stopped_callback_name",
        "started_at",
        "ended_at",
        "last_heartbeat",
        "worker_name",
        "group_id",
    )
)
_HSET_ARGS = 2 + 2 * 17  # HSET, key, 17 fields with their values
_HSET_HEAD = b"*%d\r\n" % _HSET_ARGS + _bulk(b"HSET")
_HSET_EMPTY = b"".join(_bulk(f) + _bulk(b"") for f in _EMPTY)


class JobWriter:
    """Queues RQ jobs for one `MULTI`/`EXEC` transaction on `conn` (RQ's own enqueue uses one too);
    `execute` sends it. The commands are packed here, in Redis's protocol: redis-py's packing of the
    job hash's 36 arguments cost ~40 us a job, more than building them. `at` is the jobs' `created_at`
    and `enqueued_at`: RQ takes two clocks a few microseconds apart, a transaction here takes one."""

    def __init__(self, conn: Any, at: str | None = None) -> None:
        self.conn = conn
        self.at = at or rq_time()
        self._queues: set[str] = set()
        self._parts: list[bytes] = []
        self.commands: list[bytes] = []  # the name of each command queued (tests look)

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
        key = (QUEUE_PREFIX + queue).encode()
        name = queue.encode()
        jid = job_id.encode()
        at = self.at.encode()
        parts = self._parts
        if queue not in self._queues:
            parts.append(_command(b"SADD", QUEUES_KEY.encode(), key))
            self.commands.append(b"SADD")
            self._queues.add(queue)
        # The fields and values are `Job.to_dict`'s for such a job (rq 3.0), `status` first as RQ's
        # separate HSET of it comes first (a hash has no order to speak of once `data` makes it a real
        # hash table).
        parts.append(
            b"".join(
                (
                    _HSET_HEAD,
                    _bulk(JOB_PREFIX.encode() + jid),
                    _bulk(b"status"),
                    _bulk(b"queued"),
                    _bulk(b"created_at"),
                    _bulk(at),
                    _bulk(b"data"),
                    _bulk(job_data(func, args)),
                    _HSET_EMPTY,
                    _bulk(b"origin"),
                    _bulk(name),
                    _bulk(b"description"),
                    _bulk(description.encode()),
                    _bulk(b"enqueued_at"),
                    _bulk(at),
                    _bulk(b"timeout"),
                    _bulk(b"%d" % timeout),
                    _bulk(b"result_ttl"),
                    _bulk(b"%d" % result_ttl),
                    _bulk(b"failure_ttl"),
                    _bulk(b"%d" % failure_ttl),
                )
            )
        )
        parts.append(_command(b"RPUSH", key, jid))
        self.commands += [b"HSET", b"RPUSH"]

    def execute(self) -> None:
        """Send the transaction and read its replies: a reply that is an error is raised (after every
        reply was read, or with the connection dropped: a pooled connection never holds unread replies).
        Not retried here: after a failure the caller does not know what Redis applied (the dispatcher
        asks RQ which jobs exist on its next go)."""
        if not self._parts:
            return
        payload = b"".join((_MULTI, *self._parts, _EXEC))
        n = len(self._parts)
        self._parts = []
        self.commands = []
        self._queues.clear()  # the next transaction adds them again
        pool = self.conn.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([payload])
            for _ in range(n + 1):  # +OK, then +QUEUED for each (an error reply is raised)
                connection.read_response()
            replies = connection.read_response()
        except BaseException:
            connection.disconnect()  # replies may be left unread: never hand it back to the pool as is
            raise
        finally:
            pool.release(connection)
        self.at = rq_time()
        if not isinstance(replies, list) or len(replies) != n:
            raise redis.ResponseError(f"unexpected reply to EXEC: {replies!r}")
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
