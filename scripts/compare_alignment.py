"""Compare SFT, DPO, softmax DPO and CausalDPO on one world or dataset, over several seeds.

    python scripts/compare_alignment.py recipes/causal_dpo/tiny.yaml --seeds 0 1 2 \
        --title "Synthetic exposure-shift world" [--set key=value ...] [--benchmarks BENCHMARKS.md]
    python scripts/compare_alignment.py ... --methods causal_dpo --variant known-env \
        stages.1.args.environment_mode=known

The recipe is a two-stage CausalDPO recipe (SFT, then causal_dpo). For each seed the script trains the SFT stage
once (an SFT-only run: the SFT row of the table), then runs the second stage with each preference trainer from a
copy of that SFT stage's result, so every method starts from the same model and sees the same rows. The SFT runs
live in <output>/sft-seed<N>, shared by every title under one --output (another sampler reuses them; a --set that
changes the SFT stage needs its own --output, or llmrec refuses to resume a run of a different recipe). Pairwise DPO
expands a target's J negatives into J rows; its batch is J times larger, so it takes the same number of optimizer
steps as softmax DPO and CausalDPO and each step sees the same negatives. Arguments
that only one trainer's config has (CausalDPO's environment settings, softmax DPO's clamp) are dropped for the
others. A `--variant LABEL key=value ...` runs CausalDPO again with overrides (another λ, known environments) as the
row `causal_dpo[LABEL]`, reusing the SFT runs. Results accumulate by method and seed in
<output>/<title slug>/results.json across invocations (one seed per invocation is fine); the script prints and (with
--benchmarks) writes into BENCHMARKS.md one table per evaluated split (IID test and the OOD ones) of mean ± std over
seeds of HR@10, NDCG@10, HR@20, NDCG@20 and the over-recommendation ratio @10, between markers, so a rerun replaces
its own tables; `--table-only` runs nothing and only rewrites them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from llmrec.recipe import apply_override, load_recipe
from llmrec.trainers import get_stage


class _NoPlaces:
    """apply_override records where each key came from; the script has no file to point at."""

    overrides: dict = {}

METHODS = ("sft", "dpo", "softmax_dpo", "causal_dpo")
METRICS = ("hr@10", "ndcg@10", "hr@20", "ndcg@20", "over_rec@10")
SPLIT_NAMES = {"test": "IID test", "ood_popularity": "popularity shift", "ood_temporal": "temporal shift",
               "ood_environment": "environment shift"}


def method_recipe(resolved: dict, method: str, seed: int, name: str, output: Path, variant: list[str] = ()) -> dict:
    recipe = json.loads(json.dumps(resolved))
    for override in variant:
        apply_override(recipe, override, _NoPlaces())
    recipe["run"].update(name=name, seed=seed, output_dir=str(output))
    sft, preference = recipe["stages"][0], recipe["stages"][1]
    for stage in (sft, preference):
        stage["args"].pop("seed", None)  # the run seed applies
    if method == "sft":
        recipe["stages"] = [sft]
        return recipe
    fields = {f.name for f in dataclasses.fields(get_stage(method, "method").config_class)}
    preference["trainer"] = method
    preference["args"] = {k: v for k, v in preference["args"].items() if k in fields}
    if method == "dpo":
        # pairwise DPO sees each of a target's J negatives as its own row: J times the rows per batch keeps the number
        # of optimizer steps (and the negatives each step sees) equal to the multi-negative trainers'
        negatives = preference.get("data", {}).get("negatives", 1)
        preference["args"]["per_device_train_batch_size"] = preference["args"].get("per_device_train_batch_size", 8) \
            * negatives
    return recipe


def run(recipe: dict, folder: Path, log: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{recipe['run']['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    started = time.time()
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "llmrec", "train", str(path)], stdout=handle, stderr=handle)
    if result.returncode != 0:
        raise SystemExit(f"{recipe['run']['name']} failed; see {log}")
    metrics = json.loads((Path(recipe["run"]["output_dir"]) / recipe["run"]["name"] / "metrics.json").read_text())
    print(f"  {recipe['run']['name']}: {time.time() - started:.0f} s, "
          f"test hr@10 {metrics.get('test/hr@10', float('nan')):.4f}", flush=True)
    return metrics


def table(results: dict[str, dict[str, dict]], splits: list[str]) -> str:
    """One Markdown table per split: methods down, metrics across, mean ± standard deviation over seeds (`results`:
    method -> seed -> metrics)."""
    tables = []
    for split in splits:
        header = f"**{SPLIT_NAMES.get(split, split)}**\n\n| method | " + " | ".join(
            m.upper().replace("OVER_REC", "over-rec.") for m in METRICS
        ) + " |"
        lines = [header, "|---|" + "---:|" * len(METRICS)]
        for method in results:
            cells = []
            for metric in METRICS:
                values = [r[f"{split}/{metric}"] for r in results[method].values() if f"{split}/{metric}" in r]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}" if values else "–")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    seeds = sorted({int(seed) for rows in results.values() for seed in rows})
    return "\n\n".join(tables) + f"\n\nSeeds: {', '.join(map(str, seeds))} (mean ± standard deviation over seeds)."


def reproducing_command(script: str) -> str:
    """The command line of this invocation as it reproduces the results: shell-quoted, without `--benchmarks FILE`
    and `--table-only` (which only rewrite the table)."""
    argv, kept = sys.argv[1:], []
    for index, arg in enumerate(argv):
        if arg in ("--benchmarks", "--table-only") or (index and argv[index - 1] == "--benchmarks"):
            continue
        kept.append(arg)
    return f"python scripts/{script} {shlex.join(kept)}"


def write_benchmarks(path: Path, title: str, command: str, body: str, tag: str = "compare_alignment") -> None:
    """Put `body` under a heading into the Markdown file at `path`, replacing the section an earlier run wrote."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    start, end = f"<!-- {tag}:{slug} -->", f"<!-- /{tag}:{slug} -->"
    section = f"{start}\n### {title}\n\n```bash\n{command}\n```\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--title", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--output", default="runs/compare")
    parser.add_argument("--benchmarks", type=Path, help="write the table into this Markdown file")
    parser.add_argument("--table-only", action="store_true",
                        help="run nothing: print (and write) the tables from results.json")
    parser.add_argument("--variant", nargs="+", metavar=("LABEL", "key=value"),
                        help="run causal_dpo again with these overrides, as the row causal_dpo[LABEL]")
    args = parser.parse_args()

    base = load_recipe(args.recipe, args.overrides)
    if [s.trainer for s in base.stages] != ["sft", "causal_dpo"]:
        raise SystemExit("the recipe must have two stages: sft, then causal_dpo")
    resolved = base.to_dict()
    slug = re.sub(r"[^a-z0-9]+", "-", args.title.lower()).strip("-")
    output = Path(args.output) / slug
    log = output / "runs.log"
    output.mkdir(parents=True, exist_ok=True)
    variant = args.variant[1:] if args.variant else []
    labels = {m: (f"{m}[{args.variant[0]}]" if args.variant and m == "causal_dpo" else m) for m in args.methods}
    results: dict[str, dict[str, dict]] = {labels[m]: {} for m in args.methods}
    for seed in [] if args.table_only else args.seeds:
        print(f"seed {seed}", flush=True)
        sft_name = f"sft-seed{seed}"
        sft_metrics = run(method_recipe(resolved, "sft", seed, sft_name, Path(args.output)), output / "recipes", log)
        if "sft" in args.methods:
            results["sft"][str(seed)] = sft_metrics
        for method in [m for m in args.methods if m != "sft"]:
            name = f"{labels[method]}-seed{seed}".replace("[", "-").replace("]", "")
            target = output / name
            if not (target / "metrics.json").exists():
                # start from the SFT stage already trained for this seed: llmrec resumes after a finished stage
                shutil.rmtree(target, ignore_errors=True)
                for part in ("base", "checkpoints/stage0-sft"):
                    source = Path(args.output) / sft_name / part
                    if source.exists():
                        shutil.copytree(source, target / part)
            recipe = method_recipe(resolved, method, seed, name, output, variant if method == "causal_dpo" else [])
            results[labels[method]][str(seed)] = run(recipe, output / "recipes", log)
    splits = [s for s in base.eval.splits if s != "valid"]
    # read now, not at start: another invocation (another seed) may have written its results meanwhile
    previous = json.loads((output / "results.json").read_text()) if (output / "results.json").exists() else {}
    merged = {method: {**previous.get(method, {}), **results.get(method, {})} for method in {*previous, *results}}
    merged = {method: rows for method, rows in merged.items() if rows}
    order = [m for m in METHODS if m in merged] + sorted(m for m in merged if m not in METHODS)
    merged = {m: merged[m] for m in order}
    (output / "results.json").write_text(json.dumps(merged, indent=2))
    body = table(merged, splits)
    print("\n" + body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, args.title, reproducing_command("compare_alignment.py"), body)


if __name__ == "__main__":
    main()
