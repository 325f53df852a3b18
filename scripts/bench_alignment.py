"""Step time of the preference trainers, side by side on one tiny model and batch.

    python scripts/bench_alignment.py [--preset tiny:qwen2-s] [--rows 16] [--negatives 4] [--repeats 20]

Two comparisons, each timing forward + backward of the policy (and the reference forward) on identical inputs:

1. CausalDPO (K = 2, MMD on the margin, λ = 0.001) against TRL's DPOTrainer on the same pairwise batch
   (one negative per row): the cost of the environment head, the backdoor adjustment and the penalty.
2. Softmax DPO with J negatives per row against TRL's DPO on the J pairwise rows those negatives make: one stacked
   forward of (1 + J) sequences per row against J forwards of 2 sequences (the chosen one repeated).

Prints the median times and their ratios; BENCHMARKS.md records them with this command line.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer

from llmrec.data import (
    DataConfig,
    NextItemTaskConfig,
    PreferenceDataConfig,
    load_data,
    pairwise_rows,
    preference_examples,
)
from llmrec.models.tiny import build_tiny_model, train_tokenizer
from llmrec.trainers.causal_dpo import CausalDPOConfig, CausalDPOTrainer
from llmrec.trainers.softmax_dpo import SoftmaxDPOConfig, SoftmaxDPOTrainer


def step_time(trainer, rows: list[int], repeats: int, warmup: int) -> float:
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    timings = []
    for attempt in range(warmup + repeats):
        trainer.model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        trainer.compute_loss(trainer.model, batch).backward()
        if attempt >= warmup:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny:qwen2-s")
    parser.add_argument("--rows", type=int, default=16, help="prompts per batch")
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    data = load_data(DataConfig(), 0)
    task = NextItemTaskConfig()
    rows = (preference_examples(data, "train", task, PreferenceDataConfig(negatives=args.negatives), 0)
            .select(range(args.rows)))
    rows = rows.select_columns(["prompt", "chosen", "rejected"])
    one_negative = Dataset.from_dict({"prompt": rows["prompt"], "chosen": rows["chosen"],
                                      "rejected": [[r[0]] for r in rows["rejected"]]})
    tokenizer = train_tokenizer([*data.titles.values(), *rows["prompt"]], 1024)

    def policy():  # the same weights every time (seeded), a fresh object for each trainer
        torch.manual_seed(0)
        base = build_tiny_model(args.preset, tokenizer, 0)
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                               task_type="CAUSAL_LM"))

    def config(cls, **extra):
        return cls(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
                   activation_checkpointing=False, max_length=256, save_strategy="no", **extra)

    def trainer(cls, config_cls, dataset, **extra):
        return cls(policy(), args=config(config_cls, **extra), train_dataset=dataset, processing_class=tokenizer)

    every = list(range(args.rows))
    expanded = pairwise_rows(rows)
    results = {
        "dpo_pairs": step_time(trainer(DPOTrainer, DPOConfig, pairwise_rows(one_negative)), every, args.repeats,
                               args.warmup),
        "causal_pairs": step_time(
            trainer(CausalDPOTrainer, CausalDPOConfig, one_negative, num_environments=2,
                    environment_init_samples=args.rows),
            every, args.repeats, args.warmup,
        ),
        "softmax_j": step_time(trainer(SoftmaxDPOTrainer, SoftmaxDPOConfig, rows), every, args.repeats, args.warmup),
        "dpo_j_pairs": step_time(trainer(DPOTrainer, DPOConfig, expanded), list(range(len(expanded))),
                                 args.repeats, args.warmup),
    }

    print(f"CPU threads: {torch.get_num_threads()}, torch {torch.__version__}, {platform.machine()}, "
          f"{args.preset} + LoRA r=16, {args.rows} prompts per batch, median of {args.repeats} steps "
          "(forward + backward, reference included)\n")
    print("| comparison | llmrec | TRL DPO | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| CausalDPO (K=2, MMD) vs DPO, same {args.rows} pairs | {results['causal_pairs'] * 1000:.0f} ms | "
          f"{results['dpo_pairs'] * 1000:.0f} ms | {results['causal_pairs'] / results['dpo_pairs']:.2f}× |")
    print(f"| softmax DPO, J={args.negatives}, {args.rows} rows vs DPO on the {len(expanded)} pairwise rows | "
          f"{results['softmax_j'] * 1000:.0f} ms | {results['dpo_j_pairs'] * 1000:.0f} ms | "
          f"{results['softmax_j'] / results['dpo_j_pairs']:.2f}× |")


if __name__ == "__main__":
    main()
