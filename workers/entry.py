"""The one function an RQ job may call: verify the envelope, look the kind up, run it, report.

Every outcome is a signed report on the stream; the RQ job itself never fails for an expected
reason (the event log, not RQ, says whether an attempt failed).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import redis
from pydantic import ValidationError
from rq import get_current_job

from schema.artifact_store import ArtifactStore
from schema.settings import load_settings
from schema.wire import REPORT_STREAM, Envelope, Report, load_secret, verify
from workers.context import JobCancelled
from workers.jobs import JobFailed, JobResult, job_function
from workers.netguard import NetworkDenied, network_denied
from workers.netns import JobNamespace, available, redis_client
from workers.runtime import Pulse, Reporter, RuntimeContext, pulse, worker_name


def _connection() -> redis.Redis:
    job = get_current_job()
    if job is not None:
        return job.connection
    settings = load_settings()
    if not settings.redis_url:
        raise RuntimeError("JETBOX_REDIS_URL is not set")
    return redis_client(settings.redis_url)


# Set on the RQ job by `JetboxWorker.prepare_job_execution`: whether the job's cancel key existed as it
# started (looked up in RQ's own round trip before the job).
CANCEL_SEEN = "jetbox_cancel_seen"


# Set beside it: whether the daemon's `BUNDLES_KEY` existed then (it reads bundled reports).
BUNDLES_SEEN = "jetbox_bundles_seen"


def _cancel_seen() -> bool | None:
    """What the worker saw of the running job's cancel key as it started; None when nobody looked (the
    job runs outside `JetboxWorker`: its first `cancelled()` asks Redis)."""
    job = get_current_job()
    found = getattr(job, CANCEL_SEEN, None) if job is not None else None
    return found if isinstance(found, bool) else None


def _bundles_seen() -> bool:
    """Whether the daemon read bundled reports as this job started (looked up in RQ's own round trip
    before the job); nobody looked (another RQ release, a job run outside `JetboxWorker`): one message
    per report, which every daemon reads."""
    job = get_current_job()
    return getattr(job, BUNDLES_SEEN, None) is True if job is not None else False


def report_violation(conn: redis.Redis, key: bytes, what: str, detail: str) -> None:
    """Tell the daemon something untrustworthy reached this worker."""
    report = Report(
        kind="violation",
        ticket="-",
        task="-",
        attempt=1,
        seq=1,
        worker=worker_name(),
        body={"what": what, "detail": detail[:2000]},
    )
    conn.xadd(REPORT_STREAM, report.signed(key))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=1)
def _settings_and_key() -> tuple[Any, bytes]:
    """Read once per worker process: loading settings costs about 2 ms, a no-op job about 5."""
    settings = load_settings()
    return settings, load_secret(settings.secret_path, create=False)


_STORES: dict[tuple[str, ...], ArtifactStore] = {}
_LAST_STORE: list[tuple[Any, ArtifactStore]] = []


def _store(settings: Any) -> ArtifactStore:
    """One per worker process and store settings: an object store's client (and its I/O thread) made per
    job cost no-op jobs 40 -> 5 jobs/s (bench/multihost.py). A failure to build it is not kept: the next
    job tries again."""
    last = _LAST_STORE[0] if _LAST_STORE else None
    if last is not None and last[0] is settings:
        return last[1]  # the same settings as the last job's (read once per process): no key to build
    key = tuple(
        str(getattr(settings, name, ""))
        for name in ("home", "artifacts_path", "artifacts_url", "artifacts_cache_path", "artifacts_cache_limit")
    )
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = ArtifactStore.from_settings(settings)
    _LAST_STORE[:] = [(settings, store)]
    return store


@contextlib.contextmanager
def _network_policy(network: str, settings: Any, ctx: RuntimeContext) -> Iterator[list[str]]:
    """`network: deny`: the in-process guard (clear errors for Python code) inside a kernel network
    namespace (for C code and child processes) when the worker can make one. Attempts the kernel
    refused turn the outcome into a network violation, whatever the job did with the error."""
    if network != "deny":
        yield []
        return
    kernel_ok, why = (False, "JETBOX_NETWORK_ISOLATION=guard") if settings.network_isolation == "guard" else available()
    if not kernel_ok:
        if settings.network_isolation == "required":
            raise JobFailed(f"this worker cannot isolate the network ({why}) and JETBOX_NETWORK_ISOLATION=required")
        ctx.log(f"network: deny enforced by the in-process guard only ({why})")
    ns = JobNamespace() if kernel_ok else None
    failure: BaseException | None = None
    # The artifact store's requests run on its own I/O thread, outside the job's namespace; the guard is
    # process-wide, so it lets the store's endpoint through as it does Redis. The guard goes up first: it
    # resolves the names it allows (a TCP Redis, the store's endpoint), which inside the namespace would
    # fail and count as refused attempts.
    store_endpoints: list[tuple[str, int]] = getattr(ctx.store.backend, "endpoints", list)()
    guard = network_denied(settings.redis_url, also=store_endpoints)
    with guard as denied, ns if ns is not None else contextlib.nullcontext():
        try:
            yield denied
        except BaseException as exc:  # judged below, once the namespace has been left and counted
            failure = exc
    if ns is not None and ns.blocked and not denied:
        raise NetworkDenied(
            f"network access denied by the ticket's policy (network: deny): {ns.blocked} attempt(s) "
            "outside the job's Python code (a child process or C code) were refused by the kernel"
        ) from failure
    if failure is not None:
        raise failure


def _lost_redis(exc: BaseException) -> bool:
    """Whether the job died of the worker losing Redis (a restart, a failover): the transport's fault,
    not the job's, whatever the job was doing when its report or heartbeat hit it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis.RedisError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


MODEL_KINDS = frozenset({"train", "evaluate", "infer"})


def use_card(envelope: Envelope) -> None:
    """The decider placed the attempt on this worker's card N (`device: cuda:N`): make it CUDA's current
    device, so that the job's `cuda` means that card. torch is imported only for the kinds that load it
    anyway (or where a job already did): a placed diag or check job never pays for it."""
    if not envelope.device.startswith("cuda:"):
        return
    if envelope.kind not in MODEL_KINDS and "torch" not in sys.modules:
        return
    import torch  # the model jobs import it right after; see the docstring

    if torch.cuda.is_available():
        torch.cuda.set_device(int(envelope.device.partition(":")[2]))


def run_job(signed: dict[str, Any]) -> dict[str, Any]:
    """RQ entry point (see schema.wire.ENTRY_POINT). The outcome goes to the report stream; the
    return value (RQ's job result) repeats it for callers that wait on the job (`jbctl infer`)."""
    settings, key = _settings_and_key()
    conn = _connection()
    body = signed.get("body") if isinstance(signed, dict) else None
    if not isinstance(body, dict) or not verify(body, str(signed.get("sig", "")), key):
        report_violation(conn, key, "forged_envelope", f"envelope signature does not verify: {str(signed)[:300]}")
        return {"status": "refused", "error": "bad signature"}
    envelope = Envelope.model_validate(body)
    reporter = Reporter(conn, key, envelope, worker_name(), bundles=_bundles_seen())
    fn = job_function(envelope.kind)
    if fn is None:
        reporter.send(
            "failed",
            error=f"job kind {envelope.kind!r} is not in the worker's allowlist",
            retryable=False,
            violation="job_not_allowed",
        )
        return {"status": "refused", "error": f"job kind {envelope.kind!r} is not allowed"}
    workdir = settings.home.joinpath("work", envelope.ticket, envelope.task, f"attempt-{envelope.attempt}")
    ctx = RuntimeContext(envelope, reporter, conn, workdir, _store(settings), cancel_seen=_cancel_seen())
    beats = pulse()
    beats.begin(reporter, envelope.job_id, settings.heartbeat_seconds, settings.heartbeat_timeout_seconds)
    reporter.hold("started")  # goes out with the first beat, or with the result of a short job
    ending = _Ending(beats, conn, envelope.job_id)
    try:
        if ctx.resume_error is not None:
            raise ctx.resume_error
        use_card(envelope)
        with _network_policy(envelope.network, settings, ctx) as denied:
            result = fn(ctx, envelope.params)
        if denied:  # the job caught NetworkDenied and went on: still a violation
            raise NetworkDenied(f"network access denied by the ticket's policy (network: deny): {denied[0]}")
        if not isinstance(result, JobResult):
            result = JobResult.model_validate(result)
        ending.send(reporter, "succeeded", metrics=result.metrics, outputs=result.outputs)
        return {"status": "succeeded", "metrics": result.metrics, "outputs": result.outputs}
    except JobCancelled as exc:
        ending.send(reporter, "failed", error=str(exc), retryable=False)
        return {"status": "cancelled", "error": str(exc)}
    except JobFailed as exc:
        ending.send(reporter, "failed", error=f"{type(exc).__name__}: {exc}", retryable=False)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    except ValidationError as exc:  # bad `with:` parameters: retrying cannot help
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'with'}: {e['msg']}" for e in exc.errors())
        ending.send(reporter, "failed", error=f"invalid parameters for {envelope.kind}: {problems}", retryable=False)
        return {"status": "failed", "error": f"invalid parameters for {envelope.kind}: {problems}"}
    except Exception as exc:
        violation = getattr(exc, "violation", None)
        ending.send(
            reporter,
            "failed",
            error=traceback.format_exc(limit=20)[-4000:],
            retryable=violation is None,
            violation=violation,
            cause="infrastructure" if violation is None and _lost_redis(exc) else "job",
        )
        last = traceback.format_exception_only(exc)[-1].strip()
        del exc
        return {"status": "failed", "error": last}
    finally:
        ending.close()
        ctx.close()


class _Ending:
    """A job's last report: the beats stop first, and the heartbeat key (if a beat ever set one) is
    deleted in the same pipeline as the report."""

    def __init__(self, beats: Pulse, conn: redis.Redis, jid: str) -> None:
        self.beats, self.conn, self.jid = beats, conn, jid
        self.key: str | None = None
        self.ended = False

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.key = self.beats.end(self.jid)

    def send(self, reporter: Reporter, kind: str, /, **body: Any) -> None:
        self._end()
        key = self.key
        reporter.send_with(kind, (lambda pipe: pipe.delete(key)) if key else None, **body)
        self.key = None  # deleted with the report

    def close(self) -> None:
        """After the job: stop the beats (if no report did) and drop a key no report deleted."""
        self._end()
        if self.key is not None:
            with contextlib.suppress(redis.RedisError):
                self.conn.delete(self.key)
            self.key = None
