"""AlignXplore+ on the persona world over several seeds: judge accuracy with no summary, the SFT model's summary
and the RL model's summary, in domain, streaming, out of domain (MovieLens-100K users) and read by a second judge.

    python scripts/compare_alignxplore.py --seeds 0 1 2 --benchmarks BENCHMARKS.md
    python scripts/compare_alignxplore.py --sft recipes/alignxplore/ml100k-smollm2_sft.yaml \
        --rl recipes/alignxplore/ml100k-smollm2_rl.yaml --seeds 0 --output runs/compare-alignxplore-smollm2

For each seed: the SFT recipe (default `recipes/alignxplore/tiny_sft.yaml`), then the RL recipe (default
`recipes/alignxplore/tiny_rl.yaml`) from that SFT run. A one-stage RL recipe starts from the SFT run's final model
(`model.name`, full weights); an RL recipe whose first stage is the SFT recipe's stage (a LoRA adapter that both
stages train) gets the finished SFT stage copied into its run folder and resumes after it. Results accumulate in
<output>/results.json; the table (mean ± std over seeds) is printed and, with --benchmarks, written into
BENCHMARKS.md between markers.
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

from compare_alignment import reproducing_command, write_benchmarks

from llmrec.recipe import load_recipe

SFT, RL = "recipes/alignxplore/tiny_sft.yaml", "recipes/alignxplore/tiny_rl.yaml"


def _train(recipe: str, overrides: list[str], log: Path) -> tuple[dict, float | None]:
    """The run's metrics and its wall time (None when the run had finished before and was only reloaded)."""
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.name="))
    output = next(o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir="))
    finished_before = (Path(output) / name / "metrics.json").is_file()
    started = time.time()
    with open(log, "a") as handle:
        result = subprocess.run([sys.executable, "-m", "llmrec", "train", recipe, *overrides], stdout=handle,
                                stderr=handle, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{recipe} {overrides} failed; see {log}")
    seconds = None if finished_before else time.time() - started
    return json.loads((Path(output) / name / "metrics.json").read_text()), seconds


def run_seed(seed: int, output: Path, extra: list[str], variants: dict[str, list[str]], sft_recipe: str = SFT,
             rl_recipe: str = RL) -> dict:
    """The SFT run, the RL run from it, and each RL variant (RL overrides) from the same SFT model."""
    log = output / "log.txt"
    common = [f"run.seed={seed}", f"run.output_dir={output}", *extra]
    sft_run = output / f"sft-s{seed}"
    sft, sft_seconds = _train(sft_recipe, [f"run.name={sft_run.name}", *common], log)
    row = {"sft": sft} | ({"sft_seconds": sft_seconds} if sft_seconds is not None else {})
    stages = load_recipe(sft_recipe).stages
    continues_sft = len(load_recipe(rl_recipe).stages) > len(stages)
    for label, overrides in {"rl": [], **variants}.items():
        run = output / f"{label}-s{seed}"
        if continues_sft and not (run / "metrics.json").is_file():
            for part in ("base", *(f"checkpoints/stage{i}-{stage.trainer}" for i, stage in enumerate(stages))):
                if (sft_run / part).is_dir():
                    shutil.copytree(sft_run / part, run / part, dirs_exist_ok=True)
        start = [] if continues_sft else [f"model.name={sft_run}/final"]
        metrics, seconds = _train(rl_recipe, [f"run.name={run.name}", *start, *common, *overrides], log)
        row[label] = metrics
        if seconds is not None:
            row[f"{label}_seconds"] = seconds
        print(f"seed {seed}: sft {sft.get('test/model'):.3f} {label} {metrics.get('test/model'):.3f}", flush=True)
    return row


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _columns(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(header, key pattern) for the populations and judges the runs report."""
    keys = {key for seed in results.values() for run in seed.values() if isinstance(run, dict) for key in run}
    columns = [("in domain", "test/{}"), ("streaming update", "test/streaming")]
    if "ood/model" in keys:
        columns.append(("out of domain (ml-100k)", "ood/{}"))
    for judge in sorted({k.split("/")[2] for k in keys if k.startswith("test/transfer/")}):
        columns.append((f"second judge ({judge})", f"test/transfer/{judge}/{{}}"))
    return columns


def table(results: dict[str, dict], variants: list[str]) -> str:
    systems = [("no summary", "sft", "no_summary"), ("SFT summary", "sft", "model"), ("RL summary", "rl", "model"),
               *((f"RL summary, {label}", label, "model") for label in variants),
               ("template teacher", "sft", "teacher"), ("oracle (hidden persona)", "sft", "oracle")]
    columns = _columns(results)
    lines = ["| summary | " + " | ".join(c for c, _ in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for label, run, kind in systems:
        cells = []
        for _, pattern in columns:
            key = pattern.format(kind) if "{}" in pattern else (pattern if kind == "model" else None)
            cells.append(_stat([seed[run].get(key) for seed in results.values()]) if key else "–")
        if any(cell != "–" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    formats = [f"{seed[run].get('test/format_ok', 0):.2f}" for run in ("sft", "rl") for seed in results.values()]
    # a run that was only reloaded has no wall time here (e.g. an SFT model reused from an earlier run)
    seconds = [seed["sft_seconds"] + seed["rl_seconds"] for seed in results.values()
               if "sft_seconds" in seed and "rl_seconds" in seed]
    return ("\n".join(lines) + f"\n\nSeeds: {', '.join(results)} (mean ± standard deviation over seeds). Well-formed "
            f"outputs (SFT seeds, then RL seeds): {', '.join(formats)}. Wall time per seed (SFT + RL, with "
            f"evaluations): {f'{statistics.mean(seconds):.0f} s' if seconds else 'not measured (reloaded runs)'}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("runs/compare-alignxplore"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value")
    parser.add_argument("--rl-variant", nargs="+", action="append", default=[], metavar=("LABEL", "key=value"),
                        help="the RL recipe again, from the same SFT model, with these overrides, as the row LABEL")
    parser.add_argument("--benchmarks", type=Path)
    parser.add_argument("--title", default="AlignXplore+ on the persona world: judge accuracy of preference summaries")
    parser.add_argument("--sft", default=SFT, help="the SFT recipe")
    parser.add_argument("--rl", default=RL, help="the RL recipe (one stage from the SFT model, or its stage, then RL)")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    store = args.output / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    variants = {label: overrides for label, *overrides in args.rl_variant}
    for seed in args.seeds:
        results[str(seed)] = {**results.get(str(seed), {}), **run_seed(seed, args.output, args.overrides, variants,
                                                                           args.sft, args.rl)}
        store.write_text(json.dumps(results, indent=1))
    body = table({str(s): results[str(s)] for s in args.seeds}, list(variants))
    print(body)
    if args.benchmarks:
        write_benchmarks(args.benchmarks, args.title,
                         reproducing_command("compare_alignxplore.py"), body,
                         tag="compare_alignxplore")


if __name__ == "__main__":
    main()
