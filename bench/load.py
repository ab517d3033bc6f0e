"""Load on the whole pipeline: 20 clients submit a batch of 500 short requests each at once, through
the openai SDK, while 50 clients poll batch status; then a bare Celery round trip on the same Redis.

    .venv/bin/python bench/load.py [--batches 20] [--requests 500] [--pollers 50] [--poll-interval 0.5]

Runs on this machine's PostgreSQL (a fresh database, dropped after) and Redis (a db number of its
own), with a local-directory store, `genq api` (one uvicorn process) and one `genq worker -c 4` on the
tiny random model of the tests with max_tokens 1, so the model is not the bottleneck. Prints submit
latency, status-poll p50/p99, requests completed per second, the pipeline's overhead per request,
and the bare Celery figures beside them, then `poll_p99_ms=X overhead_ms_per_request=Y`.
Goals (issue 7): poll p99 under 100 ms on loopback, overhead under 5 ms per request.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import services  # noqa: E402
from tests.workers.runtime.tiny_checkpoints import random_hf_state, tiny_hf_config, write_hf_dir  # noqa: E402

MODEL = "tiny-load"
API_KEY = "sk-genq-load-" + "0" * 24
FINAL = ("completed", "failed", "expired", "cancelled")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def lines_for(batch: int, count: int) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"b{batch}-r{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"item {i}"}], "max_tokens": 1,
                 "temperature": 0}}).encode() + b"\n" for i in range(count))


def run_pipeline(base_url: str, args: argparse.Namespace) -> dict[str, float]:
    client = OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0, timeout=120)
    batch_ids: list[str] = []
    submit_ms: list[float] = []
    poll_ms: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    submits_done = threading.Event()
    poll_during_submit_ms: list[float] = []
    poll_after_submit_ms: list[float] = []
    barrier = threading.Barrier(args.batches)

    def submitter(index: int) -> None:
        content = lines_for(index, args.requests)
        barrier.wait()
        began = time.perf_counter()
        uploaded = client.files.create(file=(f"load-{index}.jsonl", content), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", extra_headers={"Idempotency-Key": uploaded.id})
        with lock:
            submit_ms.append((time.perf_counter() - began) * 1000)
            batch_ids.append(batch.id)

    def poller() -> None:
        # Pollers are independent clients: each at its own phase, with some jitter (50 in lockstep would
        # measure a thundering herd the bench made, not the service).
        http = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        done.wait(random.uniform(0, args.poll_interval))
        while not done.is_set():
            with lock:
                choice = random.choice(batch_ids) if batch_ids else None
            if choice is not None:
                began = time.perf_counter()
                http.get(f"/batches/{choice}").raise_for_status()
                with lock:
                    poll_ms.append((time.perf_counter() - began) * 1000)
                    (poll_after_submit_ms if submits_done.is_set() else poll_during_submit_ms).append(poll_ms[-1])
            done.wait(args.poll_interval * random.uniform(0.8, 1.2))

    pollers = [threading.Thread(target=poller, daemon=True) for _ in range(args.pollers)]
    for thread in pollers:
        thread.start()
    began = time.perf_counter()
    submitters = [threading.Thread(target=submitter, args=(i,)) for i in range(args.batches)]
    for thread in submitters:
        thread.start()
    for thread in submitters:
        thread.join()
    submits_done.set()
    submitted = time.perf_counter()
    ours = set(batch_ids)
    while True:  # one list call a second: the pollers are the load under test, not this loop
        statuses = [b.status for b in client.batches.list(limit=100).data if b.id in ours]
        if len(statuses) == len(ours) and all(s in FINAL for s in statuses):
            break
        time.sleep(1.0)
    finished = time.perf_counter()
    done.set()
    for thread in pollers:
        thread.join(timeout=10)
    total = args.batches * args.requests
    completed = sum(client.batches.retrieve(b).request_counts.completed for b in batch_ids)
    wall = finished - began
    return {"requests": total, "completed": completed, "wall_s": wall, "submit_all_s": submitted - began,
            "submit_p50_ms": percentile(submit_ms, 0.5), "submit_max_ms": max(submit_ms),
            "poll_p50_ms": percentile(poll_ms, 0.5), "poll_p99_ms": percentile(poll_ms, 0.99), "polls": len(poll_ms),
            "poll_during_p99_ms": percentile(poll_during_submit_ms, 0.99), "polls_during": len(poll_during_submit_ms),
            "poll_after_p50_ms": percentile(poll_after_submit_ms, 0.5),
            "poll_after_p99_ms": percentile(poll_after_submit_ms, 0.99),
            "polls_per_s": len(poll_ms) / wall, "requests_per_s": completed / wall,
            "overhead_ms_per_request": wall * 1000 / total}


CELERY_APP = '''
from celery import Celery
app = Celery("bare", broker="{broker}", backend="{broker}")
app.conf.update(task_acks_late=True, worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True)
@app.task(name="bare.noop")
def noop(i):
    return i
'''


def run_bare_celery(broker: str, root: Path, env: dict[str, str], count: int) -> dict[str, float]:
    """The same Redis, a no-op task, a threads-pool worker of 4: sequential round trips, then count at once."""
    (root / "bare_app.py").write_text(CELERY_APP.format(broker=broker))
    worker = start([sys.executable, "-m", "celery", "-A", "bare_app", "worker", "-P", "threads", "-c", "4",
                    "--without-mingle", "--without-gossip", "-Q", "celery", "--loglevel", "WARNING"],
                   {**env, "PYTHONPATH": str(root)}, root / "bare-worker.log")
    sys.path.insert(0, str(root))
    try:
        from bare_app import noop  # type: ignore[import-not-found]

        noop.delay(0).get(timeout=60)  # the worker is up
        rtt = []
        for i in range(200):
            began = time.perf_counter()
            noop.delay(i).get(timeout=30)
            rtt.append((time.perf_counter() - began) * 1000)
        began = time.perf_counter()
        results = [noop.delay(i) for i in range(count)]
        for result in results:
            result.get(timeout=300)
        wall = time.perf_counter() - began
    finally:
        services.stop(worker)
    return {"rtt_p50_ms": percentile(rtt, 0.5), "rtt_p99_ms": percentile(rtt, 0.99),
            "tasks_per_s": count / wall, "ms_per_task": wall * 1000 / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--poll-interval", type=float, default=0.5, help="seconds between one poller's polls")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads of the worker (OMP_NUM_THREADS)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="genq-load-"))
    config = tiny_hf_config(context=256)
    model_dir = write_hf_dir(root / "tiny", config, random_hf_state(config))
    (root / "models.json").write_text(json.dumps({MODEL: {"source": str(model_dir), "context_length": 256}}))
    database = services.create_database()
    broker = f"redis://127.0.0.1:6379/{13}"
    import redis

    redis.Redis.from_url(broker).flushdb()
    port = services.free_port()
    env = {**os.environ, "GENQ_DATABASE_URL": database, "GENQ_BROKER_URL": broker,
           "GENQ_STORAGE_URL": str(root / "store"), "GENQ_HOME": str(root / "home"),
           "GENQ_MODELS_FILE": str(root / "models.json"), "GENQ_DEVICE": "cpu", "GENQ_API_PORT": str(port),
           "GENQ_BOOTSTRAP_API_KEY": API_KEY, "GENQ_RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
           "GENQ_SHARD_SIZE": "250", "GENQ_MAX_BATCH_SIZE": "256", "GENQ_REAPER_INTERVAL_SECONDS": "5"}
    subprocess.run([sys.executable, "-m", "genq.cli", "migrate"], cwd=REPO, env=env, check=True,
                   capture_output=True)
    api = start([sys.executable, "-m", "genq.cli", "api"], env, root / "api.log")
    # One torch thread for the worker: the API keeps a core of this machine's two, as it would keep its
    # own machine in a deployment (the worker's host runs the model, the API's answers polls).
    worker = start([sys.executable, "-m", "genq.cli", "worker", "--models", MODEL, "-c", "4", "--loglevel",
                    "WARNING"], {**env, "OMP_NUM_THREADS": str(args.worker_threads)}, root / "worker.log")
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        if not services.wait_healthy(port, 90, (api,)):
            raise SystemExit(f"the API did not start; see {root / 'api.log'}")
        time.sleep(8)  # the worker loads its model
        pipeline = run_pipeline(base_url, args)
        services.stop(worker)  # before the bare Celery run: it gets the machine genq had
        services.stop(api)
        bare = run_bare_celery(broker, root, env, args.batches * args.requests)
    finally:
        services.stop(worker)
        services.stop(api)
        services.drop_database(database)

    print(f"\n{args.batches} batches x {args.requests} requests (max_tokens 1, tiny model), {args.pollers} pollers "
          f"each every {args.poll_interval} s; one API process, one worker -c 4 with {args.worker_threads} torch "
          "thread(s); PostgreSQL, Redis, local store; "
          f"{os.cpu_count()} CPUs\n")
    print("| measure | genq pipeline | bare Celery (no-op task, same Redis) |")
    print("|---|---|---|")
    print(f"| requests completed | {pipeline['completed']} of {pipeline['requests']} | {args.batches * args.requests} "
          "tasks |")
    print(f"| wall time | {pipeline['wall_s']:.1f} s (submits done at {pipeline['submit_all_s']:.1f} s) | "
          f"{args.batches * args.requests / bare['tasks_per_s']:.1f} s |")
    print(f"| throughput | {pipeline['requests_per_s']:.0f} requests/s | {bare['tasks_per_s']:.0f} tasks/s |")
    print(f"| wall time per request (bounds the overhead: the 1-token model step is in it) | "
          f"{pipeline['overhead_ms_per_request']:.2f} ms | {bare['ms_per_task']:.2f} ms |")
    print(f"| submit latency (upload + create) | p50 {pipeline['submit_p50_ms']:.0f} ms, max "
          f"{pipeline['submit_max_ms']:.0f} ms | - |")
    print(f"| status poll | p50 {pipeline['poll_p50_ms']:.1f} ms, p99 {pipeline['poll_p99_ms']:.1f} ms "
          f"({pipeline['polls']} polls, {pipeline['polls_per_s']:.0f}/s) | round trip p50 {bare['rtt_p50_ms']:.1f} "
          f"ms, p99 {bare['rtt_p99_ms']:.1f} ms |")
    print(f"| status poll while the batches are created | p99 {pipeline['poll_during_p99_ms']:.1f} ms "
          f"({pipeline['polls_during']} polls) | - |")
    print(f"| status poll once they are all created | p50 {pipeline['poll_after_p50_ms']:.1f} ms, p99 "
          f"{pipeline['poll_after_p99_ms']:.1f} ms | - |")
    ratio = pipeline["overhead_ms_per_request"] / bare["ms_per_task"]
    print(f"\npipeline ms per request / bare Celery ms per task = {ratio:.2f}")
    print(f"poll_p99_ms={pipeline['poll_p99_ms']:.1f} "
          f"overhead_ms_per_request={pipeline['overhead_ms_per_request']:.2f}")


if __name__ == "__main__":
    main()
