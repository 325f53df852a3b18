"""Did CausalDPO recover the environments? Compare its inferred memberships with the true environment labels.

    python scripts/analyze_causal_dpo.py RUN_DIR [RUN_DIR ...]

For each finished CausalDPO run (inferred mode) on data with an `environment` column, the script reloads the
policy and its environment head from final/, computes the memberships of the training prompts, and prints: the
mean membership of each inferred environment within each true environment, the purity and the normalised mutual
information of the argmax assignment against the true labels (NMI 0 = unrelated, 1 = recovered; only when the data
carry environment labels), how decided the memberships are (their entropy), and how the
inferred environments split the training rows by the popularity of their target item (the confounder the
exposure environments act through).
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import torch

from llmrec.data import next_item_examples
from llmrec.eval.metrics import normalised_mutual_information
from llmrec.rundir import load_trained
from llmrec.trainers.causal_dpo import EnvironmentHead, _backbone


@torch.no_grad()
def analyse(run_dir: str) -> None:
    recipe, data, model, tokenizer, run = load_trained(run_dir)
    head = EnvironmentHead.from_pretrained(run.final).to(next(model.parameters()).device)
    rows = next_item_examples(data, "train", recipe.data.task)
    frame = data.interactions_frame
    truth = None
    if "environment" in frame.columns:
        environment = {(u, i): e for u, i, e, s in zip(frame.user_id, frame.item_id, frame.environment, frame.split)
                       if s == "train"}
        truth = [int(environment[(u, i)]) for u, i in zip(rows["user_id"], rows["item_id"])]
    backbone = _backbone(model)
    memberships = []
    for start in range(0, len(rows), 64):
        encoded = tokenizer(rows["prompt"][start : start + 64], return_tensors="pt", padding=True,
                            padding_side="right")
        hidden = backbone(**encoded.to(next(model.parameters()).device)).last_hidden_state
        last = encoded["attention_mask"].sum(1) - 1
        memberships.append(head(hidden[torch.arange(len(last)), last]).cpu())
    memberships = torch.cat(memberships)
    assigned = memberships.argmax(1).tolist()
    K = memberships.shape[1]
    print(f"\n{run_dir}: {len(rows)} training prompts, K = {K}")
    if truth is not None:
        for env in sorted(set(truth)):
            mask = torch.tensor([t == env for t in truth])
            shares = memberships[mask].mean(0).tolist()
            print(f"  true environment {env} ({int(mask.sum())} rows): mean memberships "
                  + ", ".join(f"{s:.3f}" for s in shares))
        purity = sum(max(Counter(t for t, a in zip(truth, assigned) if a == k).values(), default=0)
                     for k in range(K)) / len(truth)
        print(f"  purity {purity:.3f}, NMI {normalised_mutual_information(truth, assigned):.3f}")
    print("  membership entropy (0 = hard clusters, log K = undecided): "
          f"{float(-(memberships * memberships.clamp_min(1e-12).log()).sum(1).mean()):.3f} of {math.log(K):.3f}")
    popularity = data.popularity("train")
    for k in range(K):
        targets = [popularity[i] for i, a in zip(rows["item_id"], assigned) if a == k]
        if targets:
            print(f"  inferred environment {k}: {len(targets)} rows, mean target popularity "
                  f"{sum(targets) / len(targets):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    for run_dir in parser.parse_args().run_dirs:
        analyse(run_dir)


if __name__ == "__main__":
    main()
