"""Test-time RL on the arithmetic world: accuracy before and after flat TTRL and ECHO, over several seeds.

    python scripts/compare_echo.py --seeds 0 1 2 --benchmarks BENCHMARKS.md
    python scripts/compare_echo.py --seeds 0 1 2 3 4 5 6 7 --set data.reasoning.solution_order=any \
        --output runs/compare-echo-paths --title "..." --benchmarks BENCHMARKS.md
    python scripts/compare_echo.py --echo-recipe recipes/echo/arithmetic-smollm2.yaml \
        --ttrl-recipe recipes/ttrl/arithmetic-smollm2.yaml --seeds 0 --output runs/compare-echo-smollm2 --title "..."

For each seed: the SFT stage of the ECHO recipe is run alone and evaluated (the "before" row); then each
test-time RL recipe (flat TTRL, ECHO, and any --variant) starts from that same SFT model (its stage folder is copied
into the new run, which resumes after it) and is evaluated on the same questions with the same sampling. Results
accumulate in <output>/results.json (a rerun reloads finished runs and keeps their recorded times; `--table-only`
runs nothing); the table (mean ± std over seeds) is printed and, with --benchmarks, written into BENCHMARKS.md
between markers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from compare_alignment import reproducing_command, write_benchmarks

METHODS = {"ttrl": "recipes/ttrl/tiny.yaml", "echo": "recipes/echo/tiny.yaml"}


def _train(recipe: Path | str, overrides: list[str], log: Path) -> float:
    started = time.time()
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "llmrec", "train", str(recipe), *overrides], stdout=handle,
                                stderr=handle)
    if result.returncode != 0:
        raise SystemExit(f"{recipe} {overrides} failed; see {log}")
    return time.time() - started


def _row(run: Path, seconds: float) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    row = {k: metrics[f"test/{k}"] for k in ("mean_accuracy", "majority_accuracy", "pass_accuracy")}
    row["seconds"] = seconds  # the whole command: training and evaluation
    marker = run / "checkpoints" / "stage1-echo" / "result" / "llmrec_stage.json"
    if marker.is_file():
        history = json.loads(marker.read_text())["log_history"]
        for key in ("rollout/decoded_tokens_per_question", "ttrl/label_agreement", "rollout/forks_per_question",
                    "rollout/pruned_fraction", "ttrl/majority_share"):
            values = [entry[key] for entry in history if key in entry]
            if values:
                row[key] = sum(values) / len(values)
    return row


def run_seed(seed: int, methods: dict[str, tuple[str, list[str]]], output: Path, log: Path,
             common: list[str] = (), sft_source: str = METHODS["echo"]) -> dict[str, dict]:
    """The SFT model of `seed` (stage 0 of `sft_source`) and every method's test-time RL from it; `common` overrides
    apply to every run."""
    sft_name = f"sft-s{seed}"
    raw = yaml.safe_load(Path(sft_source).read_text())
    raw["stages"] = raw["stages"][:1]
    raw["run"].update(name=sft_name, seed=seed, output_dir=str(output))
    sft_recipe = output / f"{sft_name}.yaml"
    sft_recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    trained_before = (output / sft_name / "metrics.json").is_file()
    rows = {"sft": _row(output / sft_name, _train(sft_recipe, list(common), log))}
    if trained_before:  # it only reloaded the finished run
        del rows["sft"]["seconds"]
    print(f"seed {seed} sft: {rows['sft']}", flush=True)
    for label, (recipe, overrides) in methods.items():
        name = f"{label}-s{seed}"
        run = output / name
        finished_before = (run / "metrics.json").is_file()
        if not finished_before:
            for part in ("base", "checkpoints/stage0-sft"):
                if (output / sft_name / part).is_dir():
                    shutil.copytree(output / sft_name / part, run / part, dirs_exist_ok=True)
        seconds = _train(recipe, [f"run.seed={seed}", f"run.name={name}", f"run.output_dir={output}", *common,
                                  *overrides], log)
        rows[label] = _row(run, seconds)
        if finished_before:  # a reload's time is not the run's
            del rows[label]["seconds"]
        print(f"seed {seed} {label}: {rows[label]}", flush=True)
    return rows


# t quantiles t_{0.975, df}: the half-width of a 95% confidence interval is t * sd / sqrt(n), df = n - 1
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def confidence_interval(values: list[float], digits: int = 3) -> str:
    """The mean and its 95% confidence interval (Student's t over the seeds' paired differences)."""
    if len(values) < 2:
        return "–"
    mean, spread = statistics.mean(values), statistics.stdev(values)
    df = len(values) - 1
    t = T_975.get(df) or T_975[max(k for k in T_975 if k <= df)]
    half = t * spread / len(values) ** 0.5
    return f"{mean:+.{digits}f} [{mean - half:+.{digits}f}, {mean + half:+.{digits}f}]"


def _stat(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def table(results: dict[str, dict[str, dict]]) -> str:
    """mean ± std over seeds; the Δ columns are paired: each seed's row minus the SFT model of that seed."""
    labels = list(next(iter(results.values())))
    columns = [("mean@16", "mean_accuracy", 3), ("Δ mean@16", "delta_mean", 3), ("maj@16", "majority_accuracy", 3),
               ("Δ maj@16", "delta_majority", 3), ("pass@16", "pass_accuracy", 3),
               ("Δ mean@16, 95% CI", "ci_mean", 3), ("Δ maj@16, 95% CI", "ci_majority", 3),
               ("RL decoded tokens / question", "rollout/decoded_tokens_per_question", 1),
               ("pseudo-label = label", "ttrl/label_agreement", 3), ("majority share", "ttrl/majority_share", 3),
               ("forks / question", "rollout/forks_per_question", 2),
               ("pruned fraction", "rollout/pruned_fraction", 3), ("run time (s)", "seconds", 0)]
    for seed in results.values():
        for _label, row in seed.items():
            row["delta_mean"] = row["mean_accuracy"] - seed["sft"]["mean_accuracy"]
            row["delta_majority"] = row["majority_accuracy"] - seed["sft"]["majority_accuracy"]
    lines = ["| system | " + " | ".join(c[0] for c in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    paired = {"ci_mean": "delta_mean", "ci_majority": "delta_majority"}
    for label in labels:
        cells = []
        for _, key, digits in columns:
            source = paired.get(key, key)
            values = [seed[label][source] for seed in results.values() if source in seed[label]]
            cells.append((confidence_interval if key in paired else _stat)(values, digits))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nSeeds: {', '.join(map(str, results))} (mean ± standard deviation over seeds; the "
                               "CI columns: the mean paired change against the seed's SFT model and its 95% "
                               "confidence interval, Student's t).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/compare-echo"))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("LABEL[:METHOD]", "key=value"),
                        help="a recipe (METHOD: echo, the default, or ttrl) again with these overrides, as the "
                             "row LABEL")
    parser.add_argument("--only-variants", action="store_true", help="run the variants alone (not ttrl and echo)")
    parser.add_argument("--benchmarks", type=Path)
    parser.add_argument("--table-only", action="store_true", help="run nothing; build the table from results.json")
    parser.add_argument("--title", default="Test-time RL on the arithmetic world: flat TTRL vs ECHO")
    parser.add_argument("--set", dest="common", action="append", default=[], metavar="key=value",
                        help="an override for every run, the SFT model's too (e.g. data.reasoning.solution_order=any)")
    parser.add_argument("--echo-recipe", default=METHODS["echo"], help="the ECHO recipe (stage 0: the SFT model)")
    parser.add_argument("--ttrl-recipe", default=METHODS["ttrl"], help="the flat TTRL twin of the ECHO recipe")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    recipes = {"echo": args.echo_recipe, "ttrl": args.ttrl_recipe}
    methods = {label: (recipes[label], []) for label in ("ttrl", "echo")}
    for name, *overrides in args.variant:
        label, _, method = name.partition(":")
        methods[label] = (recipes[method or "echo"], overrides)
    if args.only_variants:
        methods = {label: methods[label] for label in methods if label not in ("ttrl", "echo")}
    store = args.output / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    for seed in [] if args.table_only else args.seeds:
        earlier = results.get(str(seed), {})
        fresh = run_seed(seed, methods, args.output, args.output / "log.txt", args.common, args.echo_recipe)
        for label, row in fresh.items():
            if "seconds" not in row and "seconds" in earlier.get(label, {}):
                row["seconds"] = earlier[label]["seconds"]
        results[str(seed)] = {**earlier, **fresh}
        store.write_text(json.dumps(results, indent=1))
    body = table({s: results[str(s)] for s in args.seeds})
    print(body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, args.title, reproducing_command("compare_echo.py"), body, tag="compare_echo")


if __name__ == "__main__":
    main()
