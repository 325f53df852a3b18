"""Prompt tuning at one parameter budget: vanilla PT, DePT, EPT, LAMP (pooling 1, 2, 4) and LoRA on a synthetic task.

    python scripts/bench_prompt_tuning.py [--task sentiment|topic] [--preset tiny:qwen2-s] [--tokens 100] \
        [--steps 300] [--seeds 0 1 2] [--batch 16] [--train-size 2000] [--test-size 500] [--benchmarks BENCHMARKS.md]
    python scripts/bench_prompt_tuning.py --quick          # a smoke run: tiny sizes, one seed, a few steps
    python scripts/bench_prompt_tuning.py ... --threads 1  # on a busy CPU

The budget is that of an l-token prompt (l = `--tokens`, l·d parameters for embedding width d), the comparison of
the EPT and LAMP papers:

* `prompt tuning`: stock PEFT prompt tuning with l tokens (SAMPLE_VOCAB initialisation, as EPT and LAMP use);
* `DePT`: m = `--short-tokens` prompt tokens and position offsets of rank r over the n positions of the longest
  input, r chosen so that m·d + n·r + r·d ≈ l·d;
* `EPT`: the same with prompt fusion and the gated multi-space projection (small: fusion width 4, 2 spaces of rank
  2), whose parameters come out of the offsets' rank so the total stays ≈ l·d;
* `LAMP k=1, 2, 4`: an l-token prompt as rank-`--lamp-rank` SVD factors, r(l + d + 1) parameters, average-pooled to
  l/k tokens (LAMP is cheaper than the budget by design);
* `LoRA`: every linear layer of the decoder, at the rank whose parameter count is closest to l·d.

Every variant trains on the same rows of a synthetic task (`llmrec.data.classification`, seed 0: `sentiment` by
default, or `topic`) with the same frozen tiny base model (seed 0), by SFT's loss (the label word and EOS after the
prompt; right-padded batches), AdamW at a constant rate: `--lr-prompt` for prompts and LAMP's factors, `--lr-low-rank`
for DePT/EPT's offsets, fusion and projections (DePT's two rates), `--lr-lora` for LoRA. The seed changes the adapter's
initialisation and the batch order. After `--steps` steps, accuracy is measured on the test rows by label-word
scoring (`llmrec.eval.classification`). The base model is random, so only what the adapter learns counts. The
sentiment task needs its negations and clause structure: in a check on tiny:qwen2-xs (batch 16), full fine-tuning
reached 0.99 test accuracy in 600 steps while LoRA (r = 8, rate 1e-2) stayed at chance after 1,500 steps. The topic
task needs only which words occur: LoRA (r = 8) and 100-token prompt tuning both reached about 0.95 in 400–600
steps. So `--task topic` separates the methods where the sentiment task may leave every adapter at chance.

Each (variant, seed) runs in its own process, seeds in alternating rounds, so peak memory is the variant's own:
on a GPU, the peak allocated memory above the state after the model was built; on a CPU, the peak resident memory
(ru_maxrss) above it (activations, gradients and optimizer state). Step time is the median over the timed steps
(forward, backward, optimizer step; the first `--warmup` steps are not timed), then the median over seeds. The
table reports accuracy as mean ± standard deviation over seeds; `--benchmarks FILE` also writes it into FILE
between markers, so a rerun replaces its own table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("prompt_tuning", "dept", "ept", "lamp_k1", "lamp_k2", "lamp_k4", "lora")
LABELS = {"prompt_tuning": "prompt tuning", "dept": "DePT", "ept": "EPT", "lamp_k1": "LAMP k=1", "lamp_k2": "LAMP k=2",
          "lamp_k4": "LAMP k=4", "lora": "LoRA"}
EPT_EXTRAS = {"fusion_dim": 4, "num_spaces": 2, "projection_rank": 2}


def offsets_rank(budget: int, short_tokens: int, d: int, n: int, extra: int = 0) -> int:
    """The rank r with m·d + n·r + r·d + extra closest to the budget (at least 1)."""
    return max(1, round((budget - short_tokens * d - extra) / (n + d)))


def adapter_for(variant: str, args, d: int, n: int, linear_widths: int, seed: int) -> tuple[str, dict, str]:
    """(adapter method, adapter args, a short description of the setting)."""
    budget = args.tokens * d
    m = args.short_tokens
    if variant == "prompt_tuning":
        return ("prompt_tuning", {"num_virtual_tokens": args.tokens, "prompt_tuning_init": "SAMPLE_VOCAB"},
                f"l={args.tokens}")
    if variant in ("dept", "ept"):
        ept = variant == "ept"
        f, spaces, q = EPT_EXTRAS.values()
        extra = 4 * d * f + spaces * (2 * d * q + d + 1) if ept else 0
        r = offsets_rank(budget, m, d, n, extra)
        settings = {"num_virtual_tokens": m, "max_length": n, "r": r, "fusion": ept, "projection": ept,
                    "prompt_learning_rate": args.lr_prompt, "low_rank_learning_rate": args.lr_low_rank,
                    "init_seed": seed}
        return "ept", {**settings, **(EPT_EXTRAS if ept else {})}, f"m={m}, r={r}, n={n}"
    if variant.startswith("lamp"):
        k = int(variant.removeprefix("lamp_k"))
        return "lamp", {"num_virtual_tokens": args.tokens, "r": args.lamp_rank, "pool_size": k, "init_seed": seed}, \
            f"l={args.tokens}, r={args.lamp_rank}, k={k}"
    rank = max(1, round(budget / linear_widths))
    return "lora", {"r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}, f"r={rank}, all linear layers"


def run_variant(variant: str, seed: int, args) -> dict:
    import torch
    from torch import nn

    from llmrec.adapters import get_adapter
    from llmrec.adapters.soft_prompt import SoftPromptModel
    from llmrec.answers import prompt_answer_logits
    from llmrec.data import ClassificationTaskConfig, classification_examples, classification_tokenizer_texts
    from llmrec.eval.classification import accuracy, label_token_ids, predict
    from llmrec.models.tiny import build_tiny_model, train_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = ClassificationTaskConfig(task=args.task, train_size=args.train_size, valid_size=1, test_size=args.test_size)
    train, test = (classification_examples(task, split, 0) for split in ("train", "test"))
    tokenizer = train_tokenizer(classification_tokenizer_texts(task, 0), 1024)
    base = build_tiny_model(args.preset, tokenizer, seed=0)
    d = base.get_input_embeddings().weight.shape[1]
    linear_widths = sum(module.in_features + module.out_features for module in base.modules()
                        if isinstance(module, nn.Linear) and module is not base.get_output_embeddings())

    prompts = tokenizer(list(train["prompt"]))["input_ids"]
    completions = tokenizer(list(train["completion"]), add_special_tokens=False)["input_ids"]
    sequences = [p + c + [tokenizer.eos_token_id] for p, c in zip(prompts, completions)]
    n = max(map(len, sequences + tokenizer(list(test["prompt"]))["input_ids"]))
    method, adapter_args, setting = adapter_for(variant, args, d, n, linear_widths, seed)

    torch.manual_seed(seed)
    model = get_adapter(method).attach(base, adapter_args).to(device)
    if isinstance(model, SoftPromptModel):
        groups = model.parameter_groups(args.lr_prompt)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "lr": args.lr_lora if method == "lora" else args.lr_prompt}]
    trainable = sum(p.numel() for group in groups for p in group["params"])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    virtual = {"prompt_tuning": args.tokens, "ept": adapter_args.get("num_virtual_tokens"), "lamp":
               args.tokens // adapter_args.get("pool_size", 1), "lora": 0}[method]

    def batch(indices) -> dict:
        longest = max(len(sequences[i]) for i in indices)
        ids = torch.full((len(indices), longest), tokenizer.pad_token_id)
        labels = torch.full((len(indices), longest), -100)
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, :len(sequences[i])] = 1
            labels[row, len(prompts[i]):len(sequences[i])] = torch.tensor(sequences[i][len(prompts[i]):])
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    total = args.warmup + args.steps
    while len(order) < total * args.batch:
        order += torch.randperm(len(sequences), generator=generator).tolist()
    batches = [batch(order[k * args.batch:(k + 1) * args.batch]) for k in range(total)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times, losses = [], []
    for step, inputs in enumerate(batches):
        started = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
        losses.append(loss.item())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline

    logits = prompt_answer_logits(model, tokenizer, test, 64, label_token_ids(tokenizer, task.label_words))
    return {"variant": variant, "seed": seed, "setting": setting, "trainable": trainable, "virtual_tokens": virtual,
            "d": d, "step_ms": 1000 * statistics.median(times), "peak_mib": peak / 2**20,
            "accuracy": accuracy(list(test["label"]), predict(logits)), "final_loss": statistics.fmean(losses[-5:]),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU",
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def table(rows: dict[str, list[dict]], args) -> str:
    first = next(iter(rows.values()))[0]
    reference = statistics.median(r["step_ms"] for r in rows["prompt_tuning"]) if rows.get("prompt_tuning") else None
    lines = [f"{first['device']}, {first['threads']} torch threads, torch {first['torch']}, `{args.preset}` "
             f"(d = {first['d']}), synthetic {args.task} task ({args.train_size} training rows, "
             f"{args.test_size} test rows), budget l = {args.tokens} tokens = {args.tokens * first['d']:,} "
             f"parameters, batch {args.batch}, {args.steps} steps after {args.warmup} untimed, seeds "
             f"{' '.join(map(str, args.seeds))}; accuracy is mean ± std over seeds.",
             "",
             "| method | setting | prompt tokens | trainable | step (ms) | vs PT | peak memory (MiB) | accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, results in rows.items():
        step = statistics.median(r["step_ms"] for r in results)
        accuracies = [r["accuracy"] for r in results]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        ratio = f"{step / reference:.2f}×" if reference else "–"
        lines.append(f"| {LABELS[variant]} | {results[0]['setting']} | {results[0]['virtual_tokens']} | "
                     f"{results[0]['trainable']:,} | {step:.1f} | {ratio} | "
                     f"{max(r['peak_mib'] for r in results):.0f} | "
                     f"{statistics.fmean(accuracies):.3f} ± {spread:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sentiment", choices=["sentiment", "topic"], help="the synthetic task")
    parser.add_argument("--preset", default="tiny:qwen2-s", help="the frozen base model (a tiny preset)")
    parser.add_argument("--tokens", type=int, default=100, help="l: the budget, in prompt tokens")
    parser.add_argument("--short-tokens", type=int, default=40, help="m: DePT/EPT's prompt length")
    parser.add_argument("--lamp-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr-prompt", type=float, default=3e-2)
    parser.add_argument("--lr-low-rank", type=float, default=3e-3)
    parser.add_argument("--lr-lora", type=float, default=3e-3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a busy machine, where "
                        "threads contending for cores make step times meaningless")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny:qwen2-xs, 64 rows, 1 seed, 6 steps")
    parser.add_argument("--benchmarks", type=Path, help="write the table into this Markdown file")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    if args.quick:
        (args.preset, args.train_size, args.test_size, args.seeds, args.steps, args.batch) = (
            "tiny:qwen2-xs", 64, 32, [0], 6, 8)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.seed, args)))
        return

    shared = [a for a in argv if a != "--benchmarks" and (not args.benchmarks or a != str(args.benchmarks))]
    rows: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            command = [sys.executable, __file__, *shared, "--variant", variant, "--seed", str(seed)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{variant} (seed {seed}) failed:\n{done.stderr[-3000:]}")
            rows[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            result = rows[variant][-1]
            print(f"seed {seed} {LABELS[variant]:<14} step {result['step_ms']:7.1f} ms  "
                  f"accuracy {result['accuracy']:.3f}", flush=True)
    body = table(rows, args)
    print("\n" + body)
    if args.benchmarks:
        sys.path.insert(0, str(Path(__file__).parent))
        from compare_alignment import write_benchmarks

        title = (f"Prompt tuning at a {args.tokens}-token budget: synthetic {args.task}"
                 + (" (quick smoke run)" if args.quick else ""))
        write_benchmarks(args.benchmarks, title, shlex.join(["python", "scripts/bench_prompt_tuning.py", *shared,
                                                             "--benchmarks", str(args.benchmarks)]), body,
                         tag="bench_prompt_tuning")
        print(f"\nwrote {args.benchmarks}")


if __name__ == "__main__":
    main()
