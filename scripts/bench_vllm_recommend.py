"""Whole-catalog ranking per user: vLLM (its CPU build, in-process engine) against transformers, side by side.

For the first `--users` test targets of a finished ranking run, each user is ranked alone, as `llmrec recommend`
ranks one user: by transformers' constrained beam search on the trained model (`rank_with_model`) and by the same
search driven on a vLLM engine with the run's adapter (`rank_with_vllm`). Reported: seconds per user for each (the
engine's start once, apart), their ratio, how many top-10 lists are identical, the mean top-10 overlap, the largest
log-probability difference on shared items, and HR@10 of both on these targets.

    python scripts/bench_vllm_recommend.py runs/quickstart --users 50
    python scripts/bench_vllm_recommend.py runs/compare-smollm2/sft-seed0 --users 10 --beams 20

Needs vLLM (the README's test command installs its CPU build).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished ranking run")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--beams", type=int, help="default: the run's eval.beams")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine and search in one process, as measured

    import torch

    from llmrec.eval.ranking import build_trie, rank_with_model
    from llmrec.eval.vllm_ranking import rank_with_vllm
    from llmrec.rundir import load_trained
    from llmrec.serve.engine import offline_engine
    from llmrec.tasks import task_of

    torch.set_num_threads(args.threads)
    recipe, data, model, tokenizer, run = load_trained(args.run)
    task = task_of(recipe)
    targets = task.targets(data, "test")[: args.users]
    trie = build_trie(tokenizer, data, recipe.data.task)
    beams = args.beams or recipe.eval.beams
    excluded = [[t.history] if recipe.eval.exclude_history else None for t in targets]

    def per_user(rank) -> tuple[list, list[float]]:
        ranked, seconds = [], []
        for target, banned in zip(targets, excluded):
            start = time.perf_counter()
            ranked.append(rank(target.prompt, banned))
            seconds.append(time.perf_counter() - start)
        return ranked, seconds

    hf, hf_seconds = per_user(lambda prompt, banned: rank_with_model(model, tokenizer, trie, [prompt], banned, beams,
                                                                      1, progress=False)[0])
    start = time.perf_counter()
    llm, lora = offline_engine(run.path)
    engine_start = time.perf_counter() - start
    rank_with_vllm(llm, tokenizer, trie, [targets[0].prompt], excluded[0], beams, lora, progress=False)  # warm-up
    vl, vl_seconds = per_user(lambda prompt, banned: rank_with_vllm(llm, tokenizer, trie, [prompt], banned, beams,
                                                                     lora, progress=False)[0])

    def top10(row):
        return [item for item, _ in row[:10]]

    identical = sum(top10(a) == top10(b) for a, b in zip(hf, vl))
    overlap = statistics.mean(len(set(top10(a)) & set(top10(b))) / 10 for a, b in zip(hf, vl))
    gaps = [abs(dict(a)[item] - score) for a, b in zip(hf, vl) for item, score in b[:10] if item in dict(a)]
    hits = [sum(t.item_id in top10(row) for t, row in zip(targets, ranked)) / len(targets) for ranked in (hf, vl)]
    hf_mean, vl_mean = statistics.mean(hf_seconds), statistics.mean(vl_seconds)
    print(f"run {args.run}: {len(targets)} users, {len(trie)} items, {beams} beams, {args.threads} threads")
    print("| engine | s per user (mean) | s per user (p50) | HR@10 |")
    print("|---|---:|---:|---:|")
    print(f"| transformers | {hf_mean:.3f} | {statistics.median(hf_seconds):.3f} | {hits[0]:.3f} |")
    print(f"| vLLM | {vl_mean:.3f} | {statistics.median(vl_seconds):.3f} | {hits[1]:.3f} |")
    print(f"vLLM / transformers speed: {hf_mean / vl_mean:.2f}x; engine start {engine_start:.0f} s (once)")
    print(f"identical top-10 lists: {identical}/{len(targets)}; mean top-10 overlap {overlap:.3f}; largest "
          f"log-probability gap {max(gaps, default=0.0):.1e}")


if __name__ == "__main__":
    main()
