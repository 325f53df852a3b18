"""Compare CoRA with its baselines by CTR AUC and UAUC over several seeds, on one world or dataset.

    python scripts/compare_cora.py recipes/cora/tiny.yaml --seeds 0 1 2 --title "CoRA, synthetic latent-taste world" \
        [--set key=value ...] [--benchmarks BENCHMARKS.md]

The recipe is a CoRA recipe (adapter.method: cora, one ctr stage, eval.task: ctr). For each seed the script runs:

* base zero-shot: the base model with no adapter and no training, scored on the same rows;
* CF alone: the frozen CF model inside the CoRA run, scored by the dot product of its embeddings;
* text-only LoRA: the same ctr stage (same rows, steps and learning rate) with a LoRA adapter of CoRA's rank and
  target modules instead of CoRA (TALLRec-style);
* CoRA: the recipe as it is.

Results accumulate in <output>/<title slug>/results.json; the table (mean ± std over seeds) is printed and, with
--benchmarks, written into BENCHMARKS.md between markers, so a rerun replaces its own table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compare_alignment import reproducing_command, write_benchmarks

from llmrec.recipe import load_recipe

SYSTEMS = {"base": "base model, zero-shot", "cf": "CF model alone", "lora": "text-only LoRA", "cora": "CoRA"}


def train(recipe: str, overrides: list[str], log: Path) -> dict:
    started = time.time()
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "llmrec", "train", recipe, *overrides], stdout=handle,
                                stderr=handle)
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
    if result.returncode != 0:
        raise SystemExit(f"{name} failed; see {log}")
    output = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir="))
    metrics = json.loads((Path(output) / name / "metrics.json").read_text())
    print(f"  {name}: {time.time() - started:.0f} s, test auc {metrics.get('test/auc', float('nan')):.4f}", flush=True)
    return metrics


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| system | AUC | UAUC |", "|---|---:|---:|"]
    for system, label in SYSTEMS.items():
        prefix = "baseline/cf/test/" if system == "cf" else "test/"
        rows = results.get("cora" if system == "cf" else system, [])
        cells = []
        for metric in ("auc", "uauc"):
            values = [r[prefix + metric] for r in rows if prefix + metric in r]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}" if values else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--title", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    parser.add_argument("--output", default="runs/compare")
    parser.add_argument("--benchmarks", type=Path, help="write the table into this Markdown file")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.adapter.method != "cora" or recipe.eval.task != "ctr":
        raise SystemExit("the recipe must use adapter.method: cora and eval.task: ctr")
    cora = recipe.adapter.args
    lora = {"r": cora.get("r", 8), "lora_alpha": cora.get("lora_alpha", 16),
            "target_modules": cora.get("target_modules", "all-linear")}
    slug = re.sub(r"[^a-z0-9]+", "-", args.title.lower()).strip("-")
    output = Path(args.output) / slug
    output.mkdir(parents=True, exist_ok=True)
    log = output / "runs.log"
    results: dict[str, list[dict]] = {"base": [], "lora": [], "cora": []}
    variants = {
        "base": ["adapter.method=none", "adapter.args={}", "stages=[]"],
        "lora": ["adapter.method=lora", f"adapter.args={json.dumps(lora)}"],
        "cora": [],
    }
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        for system, extra in variants.items():
            overrides = [*args.overrides, f"run.name={system}-seed{seed}", f"run.seed={seed}",
                         f"run.output_dir={output}", *extra]
            results[system].append(train(args.recipe, overrides, log))
    (output / "results.json").write_text(json.dumps(results, indent=2))
    body = table(results)
    print("\n" + body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, args.title, reproducing_command("compare_cora.py"), body, tag="compare_cora")


if __name__ == "__main__":
    main()
