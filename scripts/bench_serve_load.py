"""Load and fault test of `llmrec serve`'s /v1/recommend on loopback, against `llmrec recommend` with transformers.

Starts `llmrec serve RUN` on a free loopback port, then `--clients` threads each send `--requests` POST
/v1/recommend requests (the run's test users in turn, k 10) one after another, stopping early when `--max-seconds`
have passed. Reported: requests/s, p50 and p99 latency and the errors (non-200 answers and failed connections).
Then the same users, one after another, through what `llmrec recommend` runs per request (the task's `recommend`
with transformers on the model loaded once; process start excluded), for `--baseline-requests` requests. Faults,
before the load: clients that close the connection mid-request, after which the server must still answer (a user
whose adapter cannot load is tested in tests/test_serve.py).

    python scripts/bench_serve_load.py runs/quickstart --clients 16 --requests 50

Needs vLLM (the README's test command installs its CPU build).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished ranking run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this long")
    parser.add_argument("--baseline-requests", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the transformers baseline")
    parser.add_argument("--log", default="serve-load.log", help="the server's output")
    args = parser.parse_args()

    from llmrec.rundir import load_trained
    from llmrec.serve.local import abandoned_post, local_server, post_json
    from llmrec.tasks import task_of

    recipe, data, model, tokenizer, run = load_trained(args.run)
    task = task_of(recipe)
    users = [t.user_id for t in task.targets(data, "test")]
    name = run.path.name
    with local_server([run.path], Path(args.log)) as (url, server):
        print(f"server up ({args.log})")
        post_json(f"{url}/v1/recommend", {"model": name, "user": users[0], "k": 10})  # warm-up
        for user in users[:3]:
            abandoned_post(url, "/v1/recommend", {"model": name, "user": user, "k": 10})
        assert server.poll() is None, "the server stopped after clients disconnected"

        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        deadline = time.time() + args.max_seconds

        def client(index: int) -> None:
            for request in range(args.requests):
                if time.time() > deadline:
                    return
                user = users[(index * args.requests + request) % len(users)]
                began = time.perf_counter()
                try:
                    answer = post_json(f"{url}/v1/recommend", {"model": name, "user": user, "k": 10})
                    ok = len(answer["ranked"]) == 10
                except (OSError, urllib.error.HTTPError) as error:
                    ok, answer = False, str(error)
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - began)
                    else:
                        errors.append(str(answer)[:200])

        began = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        alive = server.poll() is None

    import torch

    torch.set_num_threads(args.threads)
    baseline = []
    for request in range(args.baseline_requests):
        start = time.perf_counter()
        task.recommend(model, tokenizer, data, 10, users[request % len(users)])
        baseline.append(time.perf_counter() - start)

    served = len(latencies)
    print(f"run {args.run}: {args.clients} clients x {args.requests} requests (sent {served + len(errors)} in "
          f"{wall:.0f} s), server alive after the load and the faults: {alive}")
    print("| engine | requests | requests/s | p50 (s) | p99 (s) | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    if served:
        print(f"| vLLM server, {args.clients} concurrent clients | {served} | {served / wall:.2f} | "
              f"{statistics.median(latencies):.2f} | {_percentile(latencies, 0.99):.2f} | {len(errors)} |")
    print(f"| transformers (`llmrec recommend`'s ranking), one at a time | {len(baseline)} | "
          f"{len(baseline) / sum(baseline):.2f} | {statistics.median(baseline):.2f} | "
          f"{_percentile(baseline, 0.99):.2f} | 0 |")
    if errors:
        print("first errors:", *errors[:3], sep="\n  ")


if __name__ == "__main__":
    main()
