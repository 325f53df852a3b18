"""LoRA against FedLoRA's direction/magnitude parametrisation, trained centrally on the pooled client rows.

    python scripts/bench_fedlora_parametrisation.py --steps 150 --learning-rates 1e-3 3e-3 1e-2

Separates the parametrisation from federated averaging: both adapters are attached to the federated recipe's base
model under the same seed and trained with TRL's SFTTrainer on every client's training rows (the same batch size
and constant learning rate as the recipe's local training), then scored on every client's test rows. Also reports
how far FedLoRA's magnitudes moved (mean |a_M| and mean |b_M - 1|).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTTrainer

from llmrec.eval.instructions import evaluate_instruction_rows
from llmrec.federated.client import adapter_state, client_rows, initial_model
from llmrec.recipe import load_recipe

RECIPES = {"lora": "recipes/fedlora/fedit-tiny.yaml", "fedlora": "recipes/fedlora/tiny.yaml"}


def run(adapter: str, learning_rate: float, steps: int, seed: int, scratch: Path) -> dict:
    recipe = load_recipe(RECIPES[adapter], [f"run.seed={seed}"], instantiate=False)
    train, test = [], []
    for client in range(recipe.federated.num_clients):
        rows = client_rows(recipe, client)
        train += rows[0]
        test += rows[1]
    model, tokenizer, _ = initial_model(recipe, scratch / "base", scratch)
    args = recipe.stage_config(0, scratch / f"{adapter}-{learning_rate}", max_steps=steps, learning_rate=learning_rate,
                               save_strategy="no", disable_tqdm=True)
    rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train])
    SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer).train()
    result = evaluate_instruction_rows(model, tokenizer, test, recipe.data.instructions.max_new_tokens, 64)
    out = {"exact_match": result["exact_match"], "loss": result["loss"]}
    if adapter == "fedlora":
        state = adapter_state(model)
        out["mean |a_M|"] = float(torch.cat([t for n, t in state.items() if n.endswith("A_magnitude")]).abs().mean())
        out["mean |b_M - 1|"] = float(torch.cat([t for n, t in state.items() if n.endswith("B_magnitude")])
                                      .sub(1).abs().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| adapter | lr | test exact match | test loss | mean abs a_M | mean abs (b_M - 1) |\n"
          "|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for learning_rate in args.learning_rates:
            for adapter in RECIPES:
                r = run(adapter, learning_rate, args.steps, args.seed, Path(scratch))
                magnitudes = (f"{r['mean |a_M|']:.4f} | {r['mean |b_M - 1|']:.4f}" if adapter == "fedlora"
                              else "- | -")
                print(f"| {adapter} | {learning_rate:g} | {r['exact_match']:.3f} | {r['loss']:.3f} | {magnitudes} |",
                      flush=True)


if __name__ == "__main__":
    main()
