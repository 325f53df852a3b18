"""Merging costs: an AdaMerging step against a LoRA SFT step on the same batch, and a merged adapter's forward
against one adapter's and against two adapters applied unmerged.

    python scripts/bench_merging.py [--preset tiny:qwen2-s] [--batch 16] [--length 96] [--steps 20]

Two random LoRA adapters (r 8, all linear layers) on a tiny base. "LoRA SFT step": forward with labels, backward,
AdamW step of one adapter. "AdaMerging step": both adapters active with their scalings s_k·λ (layer-wise λ), the
entropy of 8 answer tokens at the last position, backward to λ, Adam step. Forwards are under no_grad. Median of
`--steps` after 3 untimed; peak memory is the process's resident-set growth during each phase (coarse on CPU).
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import time


def _timed(step, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from llmrec.merging import AdaMergingConfig, MergeConfig, merge_loaded
    from llmrec.merging.adamerging import ScaledAdapters, answer_entropy, lora_layers
    from llmrec.models.tiny import build_tiny_model, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny:qwen2-s")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = train_tokenizer([f"item {i} of the catalog, a user history line" for i in range(200)], 512)
    base = build_tiny_model(args.preset, tokenizer, seed=0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), config, adapter_name="input0")
    model.add_adapter("input1", config)
    ids = torch.randint(5, tokenizer.vocab_size, (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    answers = list(range(5, 13))

    model.set_adapter("input0")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def sft_step() -> None:
        loss = model(**batch, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    before = _rss_mib()
    sft_ms = _timed(sft_step, args.steps)
    sft_mib = _rss_mib() - before

    with ScaledAdapters(model, ["input0", "input1"]) as scaled:
        lambdas = torch.nn.Parameter(torch.full((2, len(lora_layers(model))), AdaMergingConfig().init))
        adam = torch.optim.Adam([lambdas], lr=1e-3)

        def adamerging_step() -> None:
            scaled.apply(lambdas)
            logits = model(**batch, logits_to_keep=1, use_cache=False).logits[:, -1, answers]
            entropy = answer_entropy(logits)
            entropy.backward()
            adam.step()
            adam.zero_grad(set_to_none=True)
            with torch.no_grad():
                lambdas.clamp_(0, 1)

        before = _rss_mib()
        ada_ms = _timed(adamerging_step, args.steps)
        ada_mib = _rss_mib() - before

        def two_adapters() -> None:
            with torch.no_grad():
                model(**batch, use_cache=False)

        unmerged_ms = _timed(two_adapters, args.steps)

    model.set_adapter("input0")

    def one_adapter() -> None:
        with torch.no_grad():
            model(**batch, use_cache=False)

    single_ms = _timed(one_adapter, args.steps)
    merge_loaded(model, ["input0", "input1"], MergeConfig("cat"))
    merged_ms = _timed(one_adapter, args.steps)

    print(f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.preset}, "
          f"LoRA r 8 all linear, batch {args.batch} x {args.length} tokens, median of {args.steps} steps\n")
    print("| measure | time (ms) | ratio | memory growth (MiB) |\n|---|---:|---:|---:|")
    print(f"| LoRA SFT step (one adapter) | {sft_ms:.1f} | 1.00× | {sft_mib:.0f} |")
    print(f"| AdaMerging step (two adapters, layer-wise λ) | {ada_ms:.1f} | {ada_ms / sft_ms:.2f}× | {ada_mib:.0f} |")
    print(f"| forward, one adapter (r 8) | {single_ms:.1f} | 1.00× | – |")
    print(f"| forward, two adapters unmerged | {unmerged_ms:.1f} | {unmerged_ms / single_ms:.2f}× | – |")
    print(f"| forward, merged adapter (cat, r 16) | {merged_ms:.1f} | {merged_ms / single_ms:.2f}× | – |")


if __name__ == "__main__":
    main()
