"""Tree vs flat rollouts at equal leaves: decoded tokens and wall time per question, for N = 4, 8, 16.

Both use llmrec's transformers backend (flat sampling is the tree with no forks), the same prompts, seed and
sampling settings; the tree settings come from the ECHO stage of a recipe. The model is a run's `final/` model (an
SFT run of the arithmetic world, so the signals are those of a partly competent model) or, without --run, a random
tiny model.

    python scripts/bench_rollout.py --run runs/echo-tiny-sft --recipe recipes/echo/tiny.yaml --questions 16 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run directory whose final/ model generates (default: a random tiny model)")
    parser.add_argument("--recipe", default="recipes/echo/tiny.yaml", help="its echo stage gives the tree settings")
    parser.add_argument("--leaves", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats, each with its own seed (medians reported; the time ratio is the "
                             "median of the paired ratios)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmrec.data import reasoning_examples
    from llmrec.recipe import load_recipe
    from llmrec.rollout import HFRollout, SamplingConfig

    recipe = load_recipe(args.recipe, instantiate=False)
    index = next(i for i, stage in enumerate(recipe.stages) if stage.trainer == "echo")
    config = recipe.stage_config(index, "/tmp/unused")
    if args.run:
        model = AutoModelForCausalLM.from_pretrained(f"{args.run}/final").eval()
        tokenizer = AutoTokenizer.from_pretrained(f"{args.run}/final")
    else:
        from llmrec.models.tiny import build_tiny_model, train_tokenizer

        texts = reasoning_examples(recipe.data.reasoning, "test", 0)["prompt"]
        tokenizer = train_tokenizer(texts * 5, 400, split_digits=True)
        model = build_tiny_model(recipe.model.name, tokenizer, seed=0).eval()
    prompts = [tokenizer(p)["input_ids"]
               for p in reasoning_examples(recipe.data.reasoning, "test", recipe.run.seed)["prompt"]]
    prompts = prompts[: args.questions]
    rollout = HFRollout(model, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.max_completion_length)
    tree = config.tree_config()
    flat = type(tree)(**{**tree.__dict__, "branching": False, "pruning": False})

    print(f"{len(prompts)} questions, temperature {sampling.temperature}, max {sampling.max_new_tokens} new tokens, "
          f"tree {dict(config.tree)}, pruning {tree.pruning}")
    header = ("| N | flat tokens/q | tree tokens/q | tokens ratio | flat s/q | tree s/q | time ratio | forks/q | "
              "pruned/q | fills/q |")
    rows = [header, "|---" * (header.count("|") - 1) + "|"]
    rollout.generate(prompts[:2], 2, tree, sampling, seed=0)  # warm-up
    for n in args.leaves:
        runs: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in ("flat", "tree")}
        for repeat in range(args.repeats):  # flat and tree side by side in each repeat, so machine noise is shared
            for name, settings in (("flat", flat), ("tree", tree)):
                start = time.perf_counter()
                with torch.no_grad():
                    out = rollout.generate(prompts, n, settings, sampling, seed=repeat)
                runs[name]["time"].append((time.perf_counter() - start) / len(prompts))
                assert all(len(q.completions) == n for q in out)
                for key in ("decoded_tokens", "forks", "pruned", "fills"):
                    runs[name][key].append(sum(getattr(q.stats, key) for q in out) / len(prompts))
        f, t = ({k: statistics.median(v) for k, v in runs[name].items()} for name in ("flat", "tree"))
        time_ratio = statistics.median(a / b for a, b in zip(runs["flat"]["time"], runs["tree"]["time"]))
        rows.append(f"| {n} | {f['decoded_tokens']:.1f} | {t['decoded_tokens']:.1f} | "
                    f"{f['decoded_tokens'] / t['decoded_tokens']:.2f}x | {f['time']:.3f} | {t['time']:.3f} | "
                    f"{time_ratio:.2f}x | {t['forks']:.1f} | {t['pruned']:.1f} | {t['fills']:.1f} |")
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
