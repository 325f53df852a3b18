"""Rollout throughput: vLLM (its CPU build) against llmrec's transformers backend, flat and tree, at N leaves.

Both backends generate the same rollout batch (every question with N leaves) from the same model, prompts and
sampling settings; the tree settings come from the ECHO stage of a recipe, and flat sampling is the tree with no
forks and no pruning. Prompts have realistic length: each test question follows `--shots` solved training problems
(few-shot prompting), about 500 tokens with the default 8. Reported per backend and shape: decoded tokens per second
(every token the backend decoded, shared prefixes once), and the vLLM/transformers ratio of that rate, the median of
the paired ratios over repeats (each repeat runs the four cells back to back, so machine noise is shared).

    python scripts/bench_vllm_rollout.py --recipe recipes/echo/arithmetic-smollm2.yaml --questions 8 --repeats 3

The model is the recipe's base (the packaged SmolLM2-135M-Instruct for the recipe above; fp32 on a CPU without
bf16) or `--run`'s final/ model. The engine's KV cache is capped by VLLM_CPU_KVCACHE_SPACE (GiB, default 2 here).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch


def _model_folder(recipe, run: str | None) -> str:
    if run:
        return f"{run}/final"
    from llmrec.models.packaged import is_packaged, packaged_folder

    if not is_packaged(recipe.model.name):
        raise SystemExit(f"{recipe.model.name!r} is not a packaged model; give --run with a final/ model.")
    return str(packaged_folder(recipe.model.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/echo/arithmetic-smollm2.yaml",
                        help="its echo stage gives the tree and sampling settings, its base model the model")
    parser.add_argument("--run", help="a run directory whose final/ model generates instead")
    parser.add_argument("--leaves", type=int, nargs="+", default=[8])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--shots", type=int, default=8, help="solved problems before each question")
    parser.add_argument("--max-new-tokens", type=int, help="default: the stage's max_completion_length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM

    from llmrec.data import reasoning_examples
    from llmrec.recipe import load_recipe
    from llmrec.rollout import HFRollout, SamplingConfig, VLLMRollout

    recipe = load_recipe(args.recipe, instantiate=False)
    index = next(i for i, stage in enumerate(recipe.stages) if stage.trainer == "echo")
    config = recipe.stage_config(index, "/tmp/unused")
    folder = _model_folder(recipe, args.run)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    train = reasoning_examples(recipe.data.reasoning, "train", recipe.run.seed)
    shots = "".join(p + c + "\n\n" for p, c in zip(train["prompt"][: args.shots], train["completion"][: args.shots]))
    test = reasoning_examples(recipe.data.reasoning, "test", recipe.run.seed)["prompt"][: args.questions]
    prompts = [tokenizer(shots + question)["input_ids"] for question in test]
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=args.max_new_tokens or config.max_completion_length)
    tree = config.tree_config()
    flat = type(tree)(**{**tree.__dict__, "branching": False, "pruning": False})
    eos = [tokenizer.eos_token_id]

    started = time.perf_counter()
    llm = LLM(model=folder, dtype="float32", max_model_len=2048, seed=0, enable_prefix_caching=True)
    engine_start = time.perf_counter() - started
    backends = {"transformers": HFRollout(model, eos, tokenizer.pad_token_id),
                "vllm": VLLMRollout(llm, eos, chunk_tokens=config.vllm_chunk_tokens)}
    prompt_tokens = statistics.mean(len(p) for p in prompts)
    print(f"{folder}: {len(prompts)} questions of {prompt_tokens:.0f} prompt tokens on average, temperature "
          f"{sampling.temperature}, at most {sampling.max_new_tokens} new tokens, {args.threads} threads for "
          f"transformers; vLLM engine start {engine_start:.0f} s", flush=True)
    for backend in backends.values():  # warm-up (first-call allocations, vLLM's first prefill)
        backend.generate(prompts[:2], 2, flat, sampling, seed=0)

    header = ("| N | rollout | transformers tokens/s | vLLM tokens/s | vLLM / transformers | decoded tokens/q "
              "(transformers, vLLM) |")
    rows = [header, "|---" * (header.count("|") - 1) + "|"]
    for n in args.leaves:
        cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for repeat in range(args.repeats):
            for shape, settings in (("flat", flat), ("tree", tree)):
                for name, backend in backends.items():
                    start = time.perf_counter()
                    with torch.no_grad():
                        out = backend.generate(prompts, n, settings, sampling, seed=repeat)
                    seconds = time.perf_counter() - start
                    assert all(len(q.completions) == n for q in out)
                    decoded = sum(q.stats.decoded_tokens for q in out)
                    cells[(shape, name)]["rate"].append(decoded / seconds)
                    cells[(shape, name)]["tokens"].append(decoded / len(prompts))
        for shape in ("flat", "tree"):
            hf, vl = cells[(shape, "transformers")], cells[(shape, "vllm")]
            ratio = statistics.median(v / h for v, h in zip(vl["rate"], hf["rate"]))
            rows.append(f"| {n} | {shape} | {statistics.median(hf['rate']):.0f} | {statistics.median(vl['rate']):.0f}"
                        f" | {ratio:.2f}x | {statistics.median(hf['tokens']):.0f}, "
                        f"{statistics.median(vl['tokens']):.0f} |")
            print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
