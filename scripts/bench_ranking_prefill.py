"""Whole-catalog ranking with a real model: the prompt's KV cache shared by the beams vs recomputed per beam.

    python scripts/bench_ranking_prefill.py [--recipe recipes/sft/ml100k-smollm2.yaml] [--users 8] [--beams 20]

Loads the recipe's base model (no adapter) and data, takes the first --users test targets' prompts, and ranks the
catalog with `rank_with_model` twice: as it runs (`shared_prompt_cache`: each prompt computed once, its cache
repeated for the beams) and with generate() given no cache (it copies each prompt `beams` times and runs them all).
Prints seconds per user for both, their ratio, and whether the rankings agree (same items in the same order, the
largest log-probability difference). Timings are wall clock on whatever else shares the machine: run both in one
invocation and compare the ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from llmrec.data import load_data, next_item_examples
from llmrec.eval import ranking
from llmrec.models import load_base
from llmrec.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="recipes/sft/ml100k-smollm2.yaml")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    data = load_data(recipe.data, recipe.run.seed)
    model, tokenizer = load_base(recipe.model, Path("unused"), lambda: [], recipe.run.seed, True)
    rows = next_item_examples(data, "test", recipe.data.task).select(range(args.users))
    prompts, excluded = rows["prompt"], rows["history"]
    trie = ranking.build_trie(tokenizer, data, recipe.data.task)
    tokens = sum(len(tokenizer(p).input_ids) for p in prompts) // len(prompts)
    print(f"{recipe.model.name}, {len(trie)} items, {args.users} users, {args.beams} beams, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {tokens} prompt tokens on average")

    timings, results = {}, {}
    for label in ("shared", "per-beam"):
        original = ranking.shared_prompt_cache
        if label == "per-beam":
            ranking.shared_prompt_cache = lambda *a: {}
        try:
            started = time.perf_counter()
            results[label] = ranking.rank_with_model(model, tokenizer, trie, prompts, excluded, args.beams,
                                                     args.batch_size, progress=False)
            timings[label] = (time.perf_counter() - started) / args.users
        finally:
            ranking.shared_prompt_cache = original
        print(f"{label}: {timings[label]:.2f} s per user", flush=True)
    same = all([i for i, _ in a] == [i for i, _ in b] for a, b in zip(results["shared"], results["per-beam"]))
    gap = max(abs(x - y) for a, b in zip(results["shared"], results["per-beam"]) for (_, x), (_, y) in zip(a, b))
    print(f"per-beam / shared: {timings['per-beam'] / timings['shared']:.1f}x; rankings identical: {same}; "
          f"largest log-prob difference {gap:.2e}")


if __name__ == "__main__":
    main()
