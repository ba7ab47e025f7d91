"""Inference benchmark: requests through Jetbox on a warm worker, beside the bare forward and a cold start.

    .venv/bin/python bench/infer.py              # 200 requests (the figures in docs/BENCHMARKS.md)
    .venv/bin/python bench/infer.py --requests 30 --cold 2

One run, one machine, one model (a small TRM reasoner on 6x6 sudoku, trained for a few steps here):
- warm: `infer` jobs through the queue (enqueue a signed envelope → JetboxWorker → result), end to
  end as a client sees it, after one warm-up request that loads the model into the worker's cache;
- bare: the same model's forward on the same puzzle, in this process;
- cold: a fresh process per request that imports torch, loads the checkpoint and runs one forward
  (what inference costs without a warm worker).
Goal: warm p50 within 2x the bare forward time plus 10 ms.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--cold", type=int, default=5, help="cold starts to time (each a fresh process)")
    args = parser.parse_args()

    import numpy as np
    import redis
    import torch
    from rq.job import Job
    from rq.serializers import JSONSerializer

    torch.set_num_threads(1)
    from cli.embedded import start_redis
    from daemon.dispatcher import enqueue
    from schema.artifact_store import ArtifactStore
    from schema.wire import Envelope, load_secret
    from workers.context import LocalContext
    from workers.inference import CACHE, LOADERS, solve_grids
    from workers.jobs import run_synthesize
    from workers.ml_jobs import run_train

    with tempfile.TemporaryDirectory(prefix="jetbox-infer-") as tmp_name:
        home = Path(tmp_name)
        artifacts = home / "artifacts"

        def Ctx(workdir: Path) -> LocalContext:  # every job of the bench shares one store
            return LocalContext(workdir=workdir, artifact_root=artifacts)

        data = run_synthesize(
            Ctx(workdir=home / "w1"), {"generator": "sudoku", "count": 200, "seed": 1, "params": {"n": 6}}
        )
        trained = run_train(
            Ctx(workdir=home / "w2"), {"model": "trm", "data": "p", "max_steps": 20, "_inputs": {"p": data.outputs}}
        )
        ckpt = trained.outputs["checkpoint"]
        from workers.synth.sudoku import make_puzzle

        puzzle = make_puzzle(6, None, np.random.default_rng(0))[0].tolist()

        # bare forward, in process
        loaded, _ = CACHE.get("bare", lambda: LOADERS["reasoner"](ArtifactStore(artifacts).path(ckpt)))
        grid = np.asarray([puzzle])
        solve_grids(loaded, grid)
        bare = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            solve_grids(loaded, grid)
            bare.append(time.perf_counter() - t0)

        # warm, through Jetbox
        server = start_redis(home / "run")
        env = {k: v for k, v in os.environ.items() if not k.startswith("JETBOX_")}
        env.update(JETBOX_HOME=str(home), JETBOX_REDIS_URL=server.url, OMP_NUM_THREADS="1")
        key = load_secret(home / "secret.key", create=True)
        with (home / "worker.log").open("ab") as log:
            worker = subprocess.Popen(
                [str(BIN / "jbctl"), "worker", "--queue", "gpu"],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        conn = redis.Redis.from_url(server.url)
        params = {"component": "reasoner", "checkpoint": f"sha256:{ckpt}", "puzzle": puzzle}

        def request() -> float:
            env_ = Envelope(kind="infer", ticket="ADHOC", task=f"i{uuid.uuid4().hex[:10]}", attempt=1, params=params)
            t0 = time.perf_counter()
            enqueue(conn, key, env_, "gpu")
            job = Job.fetch(env_.job_id, connection=conn, serializer=JSONSerializer)
            while job.get_status(refresh=True) != "finished":
                if job.get_status(refresh=False) == "failed":
                    raise RuntimeError(f"infer job failed: {job.latest_result()}")
                time.sleep(0.0005)
            result = job.return_value()
            if not isinstance(result, dict) or result.get("status") != "succeeded":
                raise RuntimeError(f"infer failed: {result}")
            return time.perf_counter() - t0

        try:
            first = request()  # loads the model into the worker's cache
            warm = [request() for _ in range(args.requests)]
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(20)
            server.stop()

        # cold: a fresh process per request
        code = (
            "import sys, time, numpy as np, torch; torch.set_num_threads(1);"
            "from pathlib import Path; from workers.inference import LOADERS, Loaded, solve_grids;"
            "m, info = LOADERS['reasoner'](Path(sys.argv[1]));"
            f"solve_grids(Loaded(m, info, 0), np.asarray([{puzzle}]))"
        )
        cold = []
        for _ in range(args.cold):
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", code, str(ArtifactStore(artifacts).path(ckpt))],
                check=True,
                cwd=ROOT,
                env={**env, "PYTHONPATH": str(ROOT)},
            )
            cold.append(time.perf_counter() - t0)

    ms = 1000.0
    bare_p50, warm_p50 = statistics.median(bare) * ms, statistics.median(warm) * ms
    print(f"jetbox bench/infer.py: TRM reasoner, 6x6 sudoku, {args.requests} requests, {os.cpu_count()} cores, CPU")
    print(f"  bare forward        p50 {bare_p50:8.2f} ms  p99 {_pct(bare, 0.99) * ms:8.2f} ms")
    print(
        f"  Jetbox warm worker  p50 {warm_p50:8.2f} ms  p99 {_pct(warm, 0.99) * ms:8.2f} ms"
        f"   (first request, loading the model: {first * ms:.1f} ms)"
    )
    print(f"  cold start          mean {statistics.mean(cold) * ms:8.1f} ms over {args.cold} fresh processes")
    goal = 2 * bare_p50 + 10
    print(f"  goal warm p50 <= 2 x bare + 10 ms = {goal:.2f} ms: {'met' if warm_p50 <= goal else 'not met'}")
    print(f"  cold/warm ratio: {statistics.mean(cold) * ms / warm_p50:.0f}x")


if __name__ == "__main__":
    main()
