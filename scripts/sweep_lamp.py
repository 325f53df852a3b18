"""LAMP's learning rate and rank on the synthetic topic task, at the prompt-tuning benchmark's settings.

    python scripts/sweep_lamp.py --learning-rates 1e-3 3e-3 1e-2 3e-2 1e-1 --ranks 4 8 16 --seeds 0 \
        [--pool-sizes 2] [--benchmarks BENCHMARKS.md]

Each (learning rate, rank, pooling, seed) is one run of `scripts/bench_prompt_tuning.py`'s LAMP variant in its own
process (the same frozen tiny:qwen2-s, 2,000 training and 500 test rows, batch 16, 300 steps of AdamW at a constant
rate, label-word accuracy), so the numbers sit beside that benchmark's table. The table gives the test accuracy
(mean ± std over seeds) per learning rate (rows) and rank (columns), one table per pooling size, with the best cell
in bold.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent / "bench_prompt_tuning.py"
VARIANT = {1: "lamp_k1", 2: "lamp_k2", 4: "lamp_k4"}


def run(learning_rate: float, rank: int, pool: int, seed: int, task: str) -> dict:
    command = [sys.executable, str(BENCH), "--task", task, "--lr-prompt", str(learning_rate), "--lamp-rank",
               str(rank), "--variant", VARIANT[pool], "--seed", str(seed)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict, learning_rates: list[float], ranks: list[int], pool: int) -> str:
    cells = {(lr, r): [row["accuracy"] for row in results.get(f"{lr}/{r}/{pool}", [])] for lr in learning_rates
             for r in ranks}
    best = max((statistics.mean(v), key) for key, v in cells.items() if v)[1]
    lines = [f"**LAMP k={pool}** (test accuracy; rows: learning rate, columns: rank r)", "",
             "| lr | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---" + "|---:" * len(ranks) + "|"]
    for lr in learning_rates:
        row = []
        for r in ranks:
            values = cells[(lr, r)]
            text = "–" if not values else (f"{statistics.mean(values):.3f}" + (
                f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""))
            row.append(f"**{text}**" if (lr, r) == best else text)
        lines.append(f"| {lr:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--pool-sizes", type=int, nargs="+", default=[2], choices=sorted(VARIANT))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--task", default="topic", choices=["sentiment", "topic"])
    parser.add_argument("--output", type=Path, default=Path("runs/sweep-lamp"))
    parser.add_argument("--benchmarks", type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    store = args.output / f"{args.task}.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for seed in args.seeds:
        for pool in args.pool_sizes:
            for rank in args.ranks:
                for lr in args.learning_rates:
                    key = f"{lr}/{rank}/{pool}"
                    if any(row["seed"] == seed for row in results.get(key, [])):
                        continue
                    row = {**run(lr, rank, pool, seed, args.task), "seed": seed}
                    results.setdefault(key, []).append(row)
                    store.write_text(json.dumps(results, indent=1))
                    print(f"lr {lr:g} r {rank} k {pool} seed {seed}: accuracy {row['accuracy']:.3f}", flush=True)
    body = "\n\n".join(table(results, args.learning_rates, args.ranks, pool) for pool in args.pool_sizes)
    body += f"\n\nSeeds: {', '.join(map(str, args.seeds))}; task {args.task}; 300 steps, batch 16, tiny:qwen2-s."
    print(body)
    if args.benchmarks:
        sys.path.insert(0, str(Path(__file__).parent))
        from compare_alignment import reproducing_command, write_benchmarks

        write_benchmarks(args.benchmarks, f"LAMP: learning rate and rank (synthetic {args.task})",
                         reproducing_command("sweep_lamp.py"), body, tag="sweep_lamp")


if __name__ == "__main__":
    main()
