"""The token signals of a model's own solutions, to set an ECHO recipe's tree thresholds for that model.

The tree forks where entropy H >= entropy_high, group confidence C^G <= branch_confidence and the entropy jump
dH >= entropy_jump, and prunes on low or falling confidence (`llmrec.rollout.tree`). Their scale depends on the model
(the paper's values cannot fire at all with k = 5), so a recipe's values come from its SFT model's signals: this
script samples solutions to the test questions of a finished run (the SFT model, before test-time RL), computes the
signals exactly as the tree builder does (`token_signals`, the same windows), prints their quantiles from
`min_depth` on, and with --recipe how many tokens per solution the recipe's thresholds would fork and prune at.

    python scripts/calibrate_tree.py runs/compare-echo-smollm2/sft-s0 --recipe recipes/echo/arithmetic-smollm2.yaml
"""

from __future__ import annotations

import argparse

import torch

from llmrec.recipe import load_recipe
from llmrec.rollout.tree import TreeConfig, token_signals
from llmrec.rundir import load_trained

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def signals(scores: list[torch.Tensor], completions: torch.Tensor, eos: set[int], tree: TreeConfig) -> dict:
    """Per signal, its values at every decoded token from `tree.min_depth` on, over all completions."""
    per_step = [token_signals(step, tree.top_k, tree.confidence_k) for step in scores]
    out = {"H": [], "C": [], "C^G": [], "C^tail": [], "dH": []}
    for row in range(completions.shape[0]):
        entropies, confidences = [], []
        for t, token in enumerate(completions[row].tolist()):
            entropies.append(per_step[t][0][row].item())
            confidences.append(per_step[t][1][row].item())
            if t >= tree.min_depth:
                previous = entropies[max(0, t - tree.entropy_window):t]
                out["H"].append(entropies[-1])
                out["C"].append(confidences[-1])
                out["C^G"].append(sum(confidences[-tree.group_window:]) / len(confidences[-tree.group_window:]))
                out["C^tail"].append(sum(confidences[-tree.tail_window:]) / len(confidences[-tree.tail_window:]))
                out["dH"].append(entropies[-1] - sum(previous) / len(previous))
            if token in eos:
                break
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run (the SFT model)")
    parser.add_argument("--recipe", help="an ECHO recipe: its tree settings and sampling (default: the tree defaults)")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="solutions sampled per question")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    recipe, _, model, tokenizer, _ = load_trained(args.run)
    stage = next((s for s in load_recipe(args.recipe).stages if s.trainer == "echo"), None) if args.recipe else None
    tree = TreeConfig(**(stage.args.get("tree", {}) if stage else {}))
    temperature = stage.args.get("temperature", 0.8) if stage else 0.8
    max_new_tokens = stage.args.get("max_completion_length", 48) if stage else 48
    from llmrec.data.reasoning import reasoning_examples

    prompts = reasoning_examples(recipe.data.reasoning, "test", recipe.run.seed)["prompt"][: args.questions]
    eos = {tokenizer.eos_token_id}
    torch.manual_seed(args.seed)
    tokenizer.padding_side = "left"
    batch = tokenizer([p for p in prompts for _ in range(args.samples)], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    with torch.no_grad():
        generated = model.generate(**batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, output_scores=True, return_dict_in_generate=True,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completions = generated.sequences[:, batch["input_ids"].shape[1]:]
    values = signals(list(generated.scores), completions, eos, tree)
    print(f"{len(values['H'])} tokens from position {tree.min_depth} on, {completions.shape[0]} solutions "
          f"(top_k {tree.top_k}, confidence_k {tree.confidence_k}, temperature {temperature})")
    print(f"{'signal':>8} " + " ".join(f"{f'q{q:g}':>8}" for q in QUANTILES))
    for name, series in values.items():
        quantiles = torch.tensor(series).quantile(torch.tensor(QUANTILES))
        print(f"{name:>8} " + " ".join(f"{v:8.3f}" for v in quantiles.tolist()))
    h, cg, dh = (torch.tensor(values[k]) for k in ("H", "C^G", "dH"))
    forks = (h >= tree.entropy_high) & (cg <= tree.branch_confidence) & (dh >= tree.entropy_jump)
    low = torch.tensor(values["C^G"]) < tree.prune_confidence
    print(f"with these thresholds: {forks.sum().item() / completions.shape[0]:.2f} fork-eligible tokens per solution "
          f"({forks.float().mean().item():.3%} of tokens); C^G below prune_confidence at "
          f"{low.float().mean().item():.3%} of tokens")
    print("example solution:", repr(tokenizer.decode(completions[0], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
