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

Working memory (`--adapters`, on by default): two rank-4 adapters trained on that core for a few steps;
- swap: making the other adapter the applied one on the warm core (`workers/memory.py`: restore the
  touched weights, merge the other's deltas), p50 over alternating swaps, beside a cold load of core +
  adapter in this process (read the checkpoint, build the model, read the adapter, merge);
  goal: swap p50 under 5 % of the cold load;
- forward with an adapter merged against the core alone, in process, and through the warm worker
  (`_adapter` in the envelope, as `jbctl infer --adapter` sends it); goal: within 10 %.
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
from typing import Any

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
    parser.add_argument("--no-adapters", dest="adapters", action="store_false", help="skip the working-memory part")
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

        mem: dict[str, Any] = {}
        if args.adapters:
            mem = _adapters_in_process(Ctx, home, artifacts, data, ckpt, loaded, grid, args.requests)

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
            if args.adapters:
                # The same request with working memory (one adapter) and without, in alternating blocks of
                # 10 (the first of each block, which swaps, untimed), so the machine's drift hits both alike.
                plain = dict(params)
                with_memory = {"component": "reasoner", "puzzle": puzzle, "_adapter": mem["envelope"][0]}
                mem["warm_adapter"], mem["warm_plain_after"] = [], []
                for k in range(2 * max(1, args.requests // 10)):
                    params = with_memory if k % 2 == 0 else plain
                    request()
                    (mem["warm_adapter"] if k % 2 == 0 else mem["warm_plain_after"]).extend(
                        request() for _ in range(10)
                    )
                # Two adapters alternating: every request swaps.
                swapped = []
                for n in range(args.requests):
                    params = {"component": "reasoner", "puzzle": puzzle, "_adapter": mem["envelope"][n % 2]}
                    swapped.append(request())
                mem["warm_swapping"] = swapped
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
    if mem:
        _report_adapters(mem, args.requests)


def _adapters_in_process(
    Ctx: Any, home: Path, artifacts: Path, data: Any, ckpt: str, loaded: Any, grid: Any, n: int
) -> dict[str, Any]:
    """Train two small adapters on the core; time swaps, cold loads of core + adapter, forwards."""
    from schema.artifact_store import ArtifactStore
    from workers.inference import LOADERS, Loaded, solve_grids
    from workers.memory import apply_adapter, read_adapter
    from workers.ml_jobs import run_train

    store = ArtifactStore(artifacts)
    core = {"version": 1, "components": {"reasoner": {"checkpoint": ckpt}}}
    adapters = []
    for seed in (0, 1):
        done = run_train(
            Ctx(workdir=home / f"adapter{seed}"),
            {
                "model": "trm",
                "data": "p",
                "adapter": {"rank": 4},
                "max_steps": 5,
                "seed": seed,
                "_inputs": {"p": data.outputs},
                "_core": core,
            },
        )
        adapters.append(done.outputs["checkpoint"])
    files = [read_adapter(store.path(a)) for a in adapters]
    core_path = store.path(ckpt)

    cold = []
    for _ in range(max(5, n // 20)):
        t0 = time.perf_counter()
        model, info = LOADERS["reasoner"](core_path)
        fresh = Loaded(model, info, 0)
        apply_adapter(fresh, adapters[0], read_adapter(store.path(adapters[0])))
        cold.append(time.perf_counter() - t0)
    swaps = []
    apply_adapter(loaded, adapters[1], files[1])
    for k in range(n):
        t0 = time.perf_counter()
        apply_adapter(loaded, adapters[k % 2], files[k % 2])
        swaps.append(time.perf_counter() - t0)
    with_adapter: list[float] = []
    without: list[float] = []
    block = 10
    for k in range(2 * max(1, n // block)):  # alternating blocks: drift in the machine's load hits both alike
        apply_adapter(loaded, adapters[0] if k % 2 == 0 else None, files[0] if k % 2 == 0 else None)
        solve_grids(loaded, grid)  # the first forward after the weights changed is not timed
        for _ in range(block):
            t0 = time.perf_counter()
            solve_grids(loaded, grid)
            (with_adapter if k % 2 == 0 else without).append(time.perf_counter() - t0)
    envelope = [
        {"id": f"A-{k + 1}", "component": "reasoner", "checkpoint": a, "core_checkpoint": ckpt, "active": True}
        for k, a in enumerate(adapters)
    ]
    return {"cold": cold, "swaps": swaps, "with": with_adapter, "without": without, "envelope": envelope}


def _report_adapters(mem: dict[str, Any], n: int) -> None:
    ms = 1000.0
    swap, cold = statistics.median(mem["swaps"]) * ms, statistics.median(mem["cold"]) * ms
    print(f"  working memory: two rank-4 adapters on that core, {n} swaps")
    print(f"    swap on the warm core        p50 {swap:8.3f} ms  p99 {_pct(mem['swaps'], 0.99) * ms:8.3f} ms")
    print(f"    cold load core + adapter     p50 {cold:8.2f} ms over {len(mem['cold'])} loads (in process)")
    print(
        f"    swap / cold load: {100 * swap / cold:.2f} %  (goal < 5 %: {'met' if swap < 0.05 * cold else 'not met'})"
    )
    w, wo = statistics.median(mem["with"]) * ms, statistics.median(mem["without"]) * ms
    print(
        f"    forward with adapter p50 {w:8.2f} ms, without {wo:8.2f} ms: {100 * (w / wo - 1):+.1f} %"
        f"  (goal within 10 %: {'met' if abs(w / wo - 1) <= 0.10 else 'not met'})"
    )
    if "warm_adapter" in mem:
        a, p = statistics.median(mem["warm_adapter"]) * ms, statistics.median(mem["warm_plain_after"]) * ms
        sw = statistics.median(mem["warm_swapping"]) * ms
        print(
            f"    warm worker end to end p50, alternating blocks: core alone {p:8.2f} ms, with an adapter {a:8.2f} ms "
            f"({100 * (a / p - 1):+.1f} %), swapping adapters every request {sw:8.2f} ms"
        )


if __name__ == "__main__":
    main()
