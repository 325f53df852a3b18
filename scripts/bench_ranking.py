"""Time per user of whole-catalog ranking by constrained beam search, for catalogs of growing size.

    python scripts/bench_ranking.py [--sizes 1000 10000 100000] [--users 32] [--beams 20]

One tokenizer (trained on the largest catalog's titles) and one tiny model serve every catalog, which are nested
subsets of one another (1k inside 10k inside 100k), so only the trie changes between rows. For context the
script also times exhaustive scoring (every title teacher-forced after the prompt, in batches) on the catalogs up
to --exhaustive-max items: that is what ranking costs without the trie, and it grows with the catalog.
Prints a Markdown table; BENCHMARKS.md records it with the command line.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from llmrec.eval.ranking import rank_with_model
from llmrec.eval.trie import CatalogTrie
from llmrec.models.tiny import build_tiny_model, train_tokenizer

ANCHOR = "\nNext:\n"


def _words(n: int, seed: int = 1234) -> list[str]:
    """n distinct pronounceable words (three consonant-vowel syllables)."""
    rng, words = random.Random(seed), set()
    while len(words) < n:
        words.add("".join(rng.choice("bcdfghjklmnprstvwz") + rng.choice("aeiou") for _ in range(3)).capitalize())
    return sorted(words)


WORDS = _words(3000)


def synthetic_titles(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    titles: set[str] = set()
    ordered = []
    while len(ordered) < n:
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        if title not in titles:
            titles.add(title)
            ordered.append(title)
    return ordered


@torch.no_grad()
def exhaustive_scores(model, tokenizer, prompt: str, trie: CatalogTrie, batch: int = 512) -> None:
    """Score every catalog title by teacher forcing, the prompt's KV cache reused for each batch."""
    prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    cache = model(prompt_ids, use_cache=True).cache
    sequences = [_tokens(trie, path) for path in trie.paths.values()]
    for start in range(0, len(sequences), batch):
        chunk = sequences[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        expanded = _repeat_cache(cache, len(chunk))
        logits = model(ids, cache=expanded, use_cache=False).logits
        logits.log_softmax(-1)


def _repeat_cache(cache, n):
    from transformers import DynamicCache

    repeated = DynamicCache()
    for index, layer in enumerate(cache.layers):
        repeated.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), index)
    return repeated


def _tokens(trie: CatalogTrie, path: list[int]) -> list[int]:
    return [token for node, child in zip(path, path[1:]) for token, nxt in trie.children[node].items() if nxt == child]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--beams", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="tiny:qwen2-xs")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--exhaustive-max", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per catalog; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    titles = synthetic_titles(max(args.sizes), args.seed)
    history_text = "\n".join(titles[:3])
    tokenizer = train_tokenizer(titles + [f"History:\n{history_text}{ANCHOR}"] * 100, args.vocab)
    model = build_tiny_model(args.preset, tokenizer, args.seed).eval()
    rng = random.Random(args.seed)
    prompts = ["History:\n" + "\n".join(rng.sample(titles[:1000], 5)) + ANCHOR for _ in range(args.users)]
    warm_up = CatalogTrie.from_titles(tokenizer, {f"i{k}": t for k, t in enumerate(titles[:100])}, ANCHOR)
    rank_with_model(model, tokenizer, warm_up, prompts, None, args.beams, args.batch_size, False)

    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, model {args.preset} (vocabulary {len(tokenizer)}), "
          f"{args.users} users, {args.beams} beams, batch {args.batch_size}, median of {args.repeats} passes\n")
    print("| catalog items | trie nodes | longest title (tokens) | trie build (s) | beam ranking per user (ms) | "
          "exhaustive scoring per user (ms) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        catalog = {f"i{k}": title for k, title in enumerate(titles[:size])}
        start = time.perf_counter()
        trie = CatalogTrie.from_titles(tokenizer, catalog, ANCHOR)
        build = time.perf_counter() - start
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ranked = rank_with_model(model, tokenizer, trie, prompts, None, args.beams, args.batch_size,
                                     progress=False)
            timings.append((time.perf_counter() - start) / len(prompts))
            assert all(len(r) == args.beams for r in ranked)
        per_user = statistics.median(timings)
        exhaustive = "–"
        if size <= args.exhaustive_max:
            start = time.perf_counter()
            for prompt in prompts[:4]:
                exhaustive_scores(model, tokenizer, prompt, trie)
            exhaustive = f"{(time.perf_counter() - start) / 4 * 1000:.0f}"
        print(f"| {size:,} | {len(trie.children):,} | {trie.depth} | {build:.2f} | {per_user * 1000:.0f} | "
              f"{exhaustive} |", flush=True)


if __name__ == "__main__":
    main()
