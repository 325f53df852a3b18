"""Merging use case "multi-task": a next-item ranking expert and a like-prediction (Yes/No) expert on one tiny base,
merged by each method, over several seeds.

    python scripts/compare_merging.py --seeds 0 1 2 --benchmarks BENCHMARKS.md

For each seed: `recipes/merging/ranking-tiny.yaml`, then `recipes/merging/ctr-tiny.yaml` on that run's base, then
`llmrec merge` of the two by every method in METHODS (each merged run is evaluated on both tasks). Results
accumulate in <output>/results.json; the table gives each task's metric for the experts and every method (mean ±
std over seeds), the normalised score (each task's merged metric over its expert's, above chance for AUC, averaged
over the two tasks) and the merge's wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compare_alignment import reproducing_command, write_benchmarks

RANKING, CTR = "merging-ranking-tiny", "merging-ctr-tiny"
ADAMERGING = ["--method", "adamerging", "--steps", "100", "--lr", "1e-2"]
METHODS = {  # the merged run's folder: (the table's row, `llmrec merge` options)
    "ta-1": ("task arithmetic (λ = 1)", ["--method", "task_arithmetic"]),
    "ta-0.5": ("task arithmetic (λ = 0.5)", ["--method", "task_arithmetic", "--weights", "0.5,0.5"]),
    "ties": ("TIES (d = 0.3)", ["--method", "ties", "--density", "0.3"]),
    "dare-ties": ("DARE-TIES (d = 0.3)", ["--method", "dare_ties", "--density", "0.3"]),
    "ada-task": ("AdaMerging, task-wise", ADAMERGING),
    "ada-layer": ("AdaMerging, layer-wise", [*ADAMERGING, "--granularity", "layer"]),
    "ada-layer-surgery": ("AdaMerging, layer-wise + Surgery", [*ADAMERGING, "--granularity", "layer",
                                                               "--surgery-steps", "200"]),
}
COLUMNS = [("HR@10 (ranking)", "test/hr@10"), ("NDCG@10 (ranking)", "test/ndcg@10"),
           ("AUC (like)", f"endpoint/{CTR}/test/auc"), ("UAUC (like)", f"endpoint/{CTR}/test/uauc")]


def _llmrec(args: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "a") as handle:
        done = subprocess.run([sys.executable, "-m", "llmrec", *args], stdout=handle, stderr=handle)
    if done.returncode:
        raise SystemExit(f"llmrec {' '.join(args)} failed; see {log}")
    return time.time() - started


def run_seed(seed: int, output: Path) -> dict:
    folder, log = output / f"s{seed}", output / "log.txt"
    common = [f"run.seed={seed}", f"run.output_dir={folder}"]
    if not (folder / RANKING / "metrics.json").is_file():
        _llmrec(["train", "recipes/merging/ranking-tiny.yaml", *common], log)
    if not (folder / CTR / "metrics.json").is_file():
        _llmrec(["train", "recipes/merging/ctr-tiny.yaml", *common, f"model.name={folder / RANKING / 'base'}"], log)
    ranking = json.loads((folder / RANKING / "metrics.json").read_text())
    like = json.loads((folder / CTR / "metrics.json").read_text())
    rows = {"experts": {"test/hr@10": ranking["test/hr@10"], "test/ndcg@10": ranking["test/ndcg@10"],
                        f"endpoint/{CTR}/test/auc": like["test/auc"], f"endpoint/{CTR}/test/uauc": like["test/uauc"]}}
    for key, (label, args) in METHODS.items():
        out = folder / key
        seconds = None
        if not (out / "metrics.json").is_file():
            seconds = _llmrec(["merge", str(folder / RANKING), str(folder / CTR), *args, "--seed", str(seed),
                               str(out)], log)
        metrics = json.loads((out / "metrics.json").read_text())
        rows[label] = {key: metrics.get(key) for _, key in COLUMNS} | ({"seconds": seconds} if seconds else {})
        print(f"seed {seed} {label}: " + ", ".join(f"{k} {rows[label][k]:.4f}" for _, k in COLUMNS), flush=True)
    return rows


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def table(results: dict) -> str:
    lines = ["| system | " + " | ".join(c for c, _ in COLUMNS) + " | normalised | merge time (s) |",
             "|---" + "|---:" * (len(COLUMNS) + 2) + "|"]
    for label in ["experts", *(label for label, _ in METHODS.values())]:
        cells = [_stat([seed[label][key] for seed in results.values() if label in seed]) for _, key in COLUMNS]
        normalised = [statistics.mean([seed[label]["test/hr@10"] / seed["experts"]["test/hr@10"],
                                       (seed[label][COLUMNS[2][1]] - 0.5) / (seed["experts"][COLUMNS[2][1]] - 0.5)])
                      for seed in results.values() if label in seed]
        seconds = [seed[label]["seconds"] for seed in results.values() if seed.get(label, {}).get("seconds")]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_stat(normalised)} | "
                     + (f"{statistics.mean(seconds):.0f}" if seconds else "–") + " |")
    return "\n".join(lines) + (f"\n\nSeeds: {', '.join(results)}. The experts' row: each task's own expert; "
                               "normalised: the mean of HR@10 / the expert's and (AUC − 0.5) / (the expert's − 0.5), "
                               "so 1 keeps both experts and 0 is chance on like prediction and no ranking.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/compare-merging"))
    parser.add_argument("--benchmarks", type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    store = args.output / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for seed in args.seeds:
        earlier = results.get(str(seed), {})  # keeps the merge times of runs that are only reloaded now
        fresh = run_seed(seed, args.output)
        results[str(seed)] = {label: {**earlier.get(label, {}), **row} for label, row in fresh.items()}
        store.write_text(json.dumps(results, indent=1))
    body = table({str(s): results[str(s)] for s in args.seeds})
    print(body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, "Merging: ranking and like-prediction experts on one tiny base",
                         reproducing_command("compare_merging.py"), body, tag="compare_merging")


if __name__ == "__main__":
    main()
