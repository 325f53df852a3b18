"""LoRA training step of the packaged real model (SmolLM2-135M-Instruct): time, tokens/s and peak memory.

    python scripts/bench_real_model.py [--lengths 128 512] [--batch 8] [--steps 6] [--dtype float32]

Each sequence length runs in a fresh process (so its peak resident memory is its own): the model is loaded from
the llmrec cache, a LoRA adapter (r 8, α 16, every linear layer) is attached, and `--steps` optimizer steps of
forward + backward + AdamW on random token sequences of that length are timed after one untimed warm-up step.
Prints a Markdown table: median step time, training tokens per second, and the process's peak resident memory
(model, adapter, optimizer state and activations).
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
from pathlib import Path


def measure(length: int, batch: int, steps: int, dtype: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from llmrec.models import ModelConfig, load_base

    model, _ = load_base(ModelConfig(name="smollm2-135m-instruct", dtype=dtype), Path("unused"), lambda: [], 0, True)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up allocations
            times.append(time.perf_counter() - started)
    step_time = statistics.median(times)
    return {"length": length, "step_s": step_time, "tokens_per_s": batch * length / step_time,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="auto", help="auto: the packaged model's choice for this machine")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure this length and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.steps, args.dtype)))
        return
    rows = []
    for length in args.lengths:
        result = subprocess.run([sys.executable, __file__, "--one", str(length), "--batch", str(args.batch),
                                 "--steps", str(args.steps), "--dtype", args.dtype],
                                capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{platform.machine()} CPU, {rows[0]['threads']} torch threads, SmolLM2-135M-Instruct in "
          f"{rows[0]['dtype']}, LoRA r 8 on every linear layer, batch {args.batch}, median of {args.steps} steps "
          "after one warm-up\n")
    print("| sequence length | step (s) | training tokens / s | peak memory (MiB) |\n|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['length']} | {row['step_s']:.2f} | {row['tokens_per_s']:.0f} | {row['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
