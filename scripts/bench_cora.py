"""Training step time and peak memory of CoRA against plain LoRA and against a naive per-sample CoRA.

    python scripts/bench_cora.py [--preset tiny:qwen2-s] [--batch 16] [--length 64] [--rank 8] [--steps 20] \
        [--rounds 2]

Three ways to train on the same batch (forward, backward, AdamW step; the base model frozen):

* `lora`: PEFT LoRA with the same rank and target modules (every linear layer of every decoder block);
* `cora`: CoRA as llmrec implements it: per-sample A from the generator, the increment by one batched einsum;
* `naive`: the same CoRA model, but each target layer materialises ΔW_b = s·tanh(g)·B·A_b for every sample and
  runs the samples one by one through W0 + ΔW_b (what a straightforward implementation does).

Each variant runs in its own process (so peak memory is its own), in `--rounds` alternating rounds; the script
prints the median step time over rounds, the ratios, the peak resident memory above the process's state after
the model was built (ru_maxrss, so it includes activations, gradients and optimizer state), and the scoring
throughput of the trained model (forward only, the answer position's logits, rows per second).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time


def run_variant(variant: str, preset: str, batch: int, length: int, rank: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from llmrec.adapters.cora import CoRAConfig, CoRALinear, CoRAModel
    from llmrec.cf import CFModel
    from llmrec.models.tiny import build_tiny_model, train_tokenizer

    torch.manual_seed(0)
    tokenizer = train_tokenizer([f"Golden Jazz River {k} Silent Space Machine" for k in range(200)], 1024)
    base = build_tiny_model(preset, tokenizer, seed=0)
    users = [f"u{k}" for k in range(batch)]
    cf = CFModel(users, users, torch.randn(batch, 64), torch.randn(batch, 64))
    inputs = {"input_ids": torch.randint(0, len(tokenizer), (batch, length))}
    if variant == "lora":
        model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    else:
        model = CoRAModel(base, CoRAConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"), cf)
        inputs.update(model.cf_index(users, users))
        if variant == "naive":
            def per_sample(layer, x):
                weight_delta = layer.effective_B()
                rows = [torch.nn.functional.linear(x[b], layer.base_layer.weight + weight_delta @ layer.lora_A[b],
                                                   layer.base_layer.bias)
                        for b in range(x.shape[0])]
                return torch.stack(rows)

            CoRALinear.forward = per_sample
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 3):
        started = time.perf_counter()
        logits = model(**inputs, logits_to_keep=1).logits
        logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:  # warm-up steps are not timed
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.eval()
    scoring = []
    with torch.no_grad():  # serving: one forward per batch, the answer position's logits only
        for repeat in range(6):
            started = time.perf_counter()
            model(**inputs, logits_to_keep=1)
            if repeat:
                scoring.append(time.perf_counter() - started)
    return {"step_ms": 1000 * statistics.median(times), "peak_mib": (peak - baseline) / 1024,
            "rows_per_s": batch / statistics.median(scoring),
            "trainable": sum(p.numel() for p in trainable), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny:qwen2-s")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.preset, args.batch, args.length, args.rank, args.steps)))
        return

    results: dict[str, list[dict]] = {"lora": [], "cora": [], "naive": []}
    for _ in range(args.rounds):
        for variant in results:
            command = [sys.executable, __file__, "--variant", variant, "--preset", args.preset,
                       "--batch", str(args.batch), "--length", str(args.length), "--rank", str(args.rank),
                       "--steps", str(args.steps)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[variant].append(json.loads(output.strip().splitlines()[-1]))
    summary = {v: {"step_ms": statistics.median(r["step_ms"] for r in rows),
                   "peak_mib": max(r["peak_mib"] for r in rows),
                   "rows_per_s": statistics.median(r["rows_per_s"] for r in rows), "trainable": rows[0]["trainable"]}
               for v, rows in results.items()}
    print(f"{platform.machine()}, {results['lora'][0]['threads']} torch threads, {args.preset}, batch {args.batch}, "
          f"length {args.length}, rank {args.rank}, all linear layers, median of {args.rounds} x {args.steps} steps")
    print(f"{'variant':<8}{'step (ms)':>12}{'vs LoRA':>10}{'peak MiB':>10}{'scored rows/s':>15}{'trainable':>12}")
    for variant, row in summary.items():
        print(f"{variant:<8}{row['step_ms']:>12.1f}{row['step_ms'] / summary['lora']['step_ms']:>9.2f}x"
              f"{row['peak_mib']:>10.0f}{row['rows_per_s']:>15.0f}{row['trainable']:>12,}")
    print(f"CoRA is {summary['naive']['step_ms'] / summary['cora']['step_ms']:.1f}x faster than the per-sample loop")


if __name__ == "__main__":
    main()
