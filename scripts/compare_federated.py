"""Federated LoRA on the tiny instruction world: every aggregation rule, several seeds and learning rates.

    python scripts/compare_federated.py --seeds 0 1 2 --learning-rates 1e-3 3e-3 --benchmarks BENCHMARKS.md
    python scripts/compare_federated.py --rules fedlora_opt --label offset --set adapter.args.init_offset=true ...

Runs `llmrec federate recipes/fedlora/<rule>-tiny.yaml` (FedLoRA-Optimizer: tiny.yaml) for each rule, seed and
learning rate, one process each (`--label` names a variant made by `--set` overrides: its rows are
`<rule>+<label>`), after the shared base model (`recipes/fedlora/pretrain-tiny.yaml`). With `--recipe R` (a
FedLoRA-Optimizer recipe such as recipes/fedlora/instructions-smollm2.yaml) every rule runs R with
`adapter.method=lora federated.rule=<rule>` (the tiny twins differ from tiny.yaml in exactly those two keys) and
no base-model recipe comes first. A seed changes the world's facts and rows, the Dirichlet partition, the
adapter's initialisation and the data order; the base model stays the same. Results accumulate in
<output>/results.json; the tables (mean ± std over seeds of the last round's pooled global and local exact match
and loss, and bytes per round) are printed and, with --benchmarks, written into BENCHMARKS.md between markers.
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

RECIPES = {
    "fedlora_opt": "recipes/fedlora/tiny.yaml",
    "fedit": "recipes/fedlora/fedit-tiny.yaml",
    "ffa": "recipes/fedlora/ffa-tiny.yaml",
    "fedsa": "recipes/fedlora/fedsa-tiny.yaml",
    "flora": "recipes/fedlora/flora-tiny.yaml",
    "local": "recipes/fedlora/local-tiny.yaml",
}
METRICS = ("global_exact_match", "local_exact_match", "global_loss", "local_loss")


def _run(command: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "llmrec", *command], stdout=handle, stderr=handle)
    if result.returncode != 0:
        raise SystemExit(f"llmrec {' '.join(command)} failed; see {log}")
    return time.time() - started


def _row(run: Path, seconds: float) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    row = {name: metrics[f"test/{name}"] for name in METRICS}
    row.update(initial_exact_match=metrics["initial/global_exact_match"], initial_loss=metrics["initial/global_loss"],
               bytes_up=metrics["federated/bytes_up_per_round"], bytes_down=metrics["federated/bytes_down_per_round"],
               seconds=seconds)
    return row


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: dict) -> str:
    lines = ["| rule | lr | global EM | local EM | global loss | local loss | MB up / round | "
             "MB down / round | s / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    def order(key: str):
        rule, lr = key.split("@")
        return list(RECIPES).index(rule.split("+")[0]), rule, float(lr)

    for key in sorted(results, key=order):
        rule, lr = key.split("@")
        seeds = results[key]
        column = {name: [row[name] for row in seeds.values()] for name in next(iter(seeds.values()))}
        lines.append(f"| {rule} | {lr} | " + " | ".join(_mean_std(column[m]) for m in METRICS)
                     + f" | {statistics.mean(column['bytes_up']) / 1e6:.3f}"
                     f" | {statistics.mean(column['bytes_down']) / 1e6:.3f}"
                     f" | {statistics.mean(column['seconds']):.0f} |")
    first = next(iter(results.values()))
    initial = [row["initial_exact_match"] for row in first.values()]
    initial_loss = [row["initial_loss"] for row in first.values()]
    lines.append(f"\nBase model before federated training (round 0): exact match {_mean_std(initial)}, loss "
                 f"{_mean_std(initial_loss)}. Seeds: {', '.join(sorted(first))}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--learning-rates", nargs="+", default=["1e-3", "3e-3"])
    parser.add_argument("--rules", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    parser.add_argument("--label", help="the variant the --set overrides make: its rows are <rule>+<label>")
    parser.add_argument("--output", type=Path, default=Path("runs/compare-federated"))
    parser.add_argument("--benchmarks", type=Path, help="write the table into this Markdown file")
    parser.add_argument("--table-only", action="store_true", help="run nothing: print (and write) the table")
    parser.add_argument("--recipe", help="one FedLoRA-Optimizer recipe for every rule (the others as LoRA twins)")
    parser.add_argument("--title", default="Federated LoRA rules on the tiny instruction world",
                        help="the BENCHMARKS.md section")
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    results_file, log = args.output / "results.json", args.output / "log.txt"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    if not args.table_only:
        if not args.recipe and not Path("runs/fedlora-pretrain-tiny/metrics.json").is_file():
            _run(["train", "recipes/fedlora/pretrain-tiny.yaml"], log)
        for seed in args.seeds:
            for rule in args.rules:
                for lr in args.learning_rates:
                    row = f"{rule}+{args.label}" if args.label else rule
                    key, name = f"{row}@{lr}", f"{row.replace('+', '-')}-lr{lr}-s{seed}"
                    if str(seed) in results.get(key, {}):
                        continue
                    overrides = [f"run.name={name}", f"run.seed={seed}", f"run.output_dir={args.output}",
                                 f"stages.0.args.learning_rate={lr}", *args.overrides]
                    if args.recipe:
                        recipe = args.recipe
                        if rule != "fedlora_opt":
                            overrides += ["adapter.method=lora", f"federated.rule={rule}"]
                    else:
                        recipe = RECIPES[rule]
                    seconds = _run(["federate", recipe, *overrides], log)
                    results.setdefault(key, {})[str(seed)] = _row(args.output / name, seconds)
                    results_file.write_text(json.dumps(results, indent=2))
                    print(f"{key} seed {seed}: " + ", ".join(f"{m} {results[key][str(seed)][m]:.4f}" for m in METRICS),
                          flush=True)
    body = table(results)
    print(body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, args.title, reproducing_command("compare_federated.py"), body,
                         tag="compare_federated")


if __name__ == "__main__":
    main()
