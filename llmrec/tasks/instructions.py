"""Instruction following (`eval.task: instructions`): short responses to instructions in categories, the task of
federated fine-tuning (FedLoRA-Optimizer and its baselines).

Section `data.instructions` (`llmrec.data.instructions.InstructionTaskConfig`): a synthetic instruction world or
Dolly-15k-style JSON Lines. Rows: centralised runs split every example once into train and test (the task has no
validation split, so an `sft` stage validating during training uses the test rows); `llmrec federate` deals the
examples to clients instead (`llmrec.federated`) and evaluates each round itself.

Evaluation generates greedy responses to the test rows (`llmrec.eval.instructions`). Metric keys: `test/exact_match`,
`test/rouge_l`, `test/loss` (mean NLL per reference response token), `test/rows`, and per category
`test/exact_match/<category>`. There is no baseline.
"""

from __future__ import annotations

from collections import Counter

from llmrec.data.instructions import InstructionTaskConfig
from llmrec.eval.keys import SPLIT_NAMES, split_prefix

from . import Task, example_text

MEASURES = ("exact_match", "rouge_l", "loss")


class InstructionTask(Task):
    name = "instructions"
    description = "exact match, ROUGE-L and loss of greedy responses to instructions"
    section = "instructions"
    section_class = InstructionTaskConfig
    section_help = ("Instruction examples with categories (a synthetic world, or Dolly-15k-style JSON Lines) that "
                    "`llmrec federate` deals to clients by category; the interactions are loaded but not used.")
    section_holds = "the instruction rows"
    splits = ("test",)
    uses_interactions = False
    headline = "exact_match"
    card_tag = "instruction-tuning"
    card_intro = """An instruction follower trained with llmrec: the model reads an instruction (and a context) and
writes a short response; exact match and ROUGE-L compare its greedy responses with the references."""

    def split_rows(self, split: str) -> list[dict]:
        """The centralised split's rows (`id`, `category`, `prompt`, `completion`); 'valid' is the test split."""
        from llmrec.data.instructions import instruction_split

        return instruction_split(self.config, self.recipe.run.seed, "train" if split == "train" else "test")

    def rows(self, data, split: str, kind: str):
        if kind != "sft":
            return super().rows(data, split, kind)
        from datasets import Dataset

        rows = self.split_rows(split)
        return Dataset.from_list([{"prompt": row["prompt"], "completion": row["completion"]} for row in rows])

    def text_rows(self, data) -> list[str]:
        from llmrec.data.instructions import instruction_tokenizer_texts

        return instruction_tokenizer_texts(self.config, self.recipe.run.seed)

    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        from llmrec.eval.instructions import evaluate_instruction_rows

        result = evaluate_instruction_rows(model, tokenizer, self.split_rows(split), self.config.max_new_tokens,
                                           self.recipe.eval.batch_size)
        prefix = split_prefix(split)
        metrics = {prefix + key: float(result[key]) for key in MEASURES}
        metrics[prefix + "rows"] = result["rows"]
        metrics.update({f"{prefix}exact_match/{category}": value for category, value in result["by_category"].items()})
        return metrics, []

    # --- reports -------------------------------------------------------------------------------------------------

    @staticmethod
    def _categories(metrics: dict, split: str) -> list[str]:
        return sorted(k.rsplit("/", 1)[1] for k in metrics if k.startswith(f"{split}/exact_match/"))

    def summary(self, metrics: dict, splits: list[str]) -> str:
        out = []
        for split in self.evaluated(metrics, splits):
            out.append(f"\n{split} instructions: {metrics[f'{split}/rows']} rows")
            out.append(f"{'exact_match':>12}{'rouge_l':>12}{'loss':>12}")
            out.append("".join(f"{metrics[f'{split}/{m}']:>12.4f}" for m in MEASURES))
            out.append("by category: " + ", ".join(f"{c} {metrics[f'{split}/exact_match/{c}']:.2f}"
                                                   for c in self._categories(metrics, split)))
        return "\n".join(out)

    def card_results(self, metrics: dict) -> str:
        sections = []
        for split in self.evaluated(metrics):
            rows = ["| exact match | ROUGE-L | loss |", "|---|---|---|",
                    "| " + " | ".join(f"{metrics[f'{split}/{k}']:.4f}" for k in MEASURES) + " |"]
            heading = f"## Results: {SPLIT_NAMES[split]} ({metrics[f'{split}/rows']} rows)"
            sections.append(heading + "\n\n" + "\n".join(rows) + "\n")
        return "\n".join(sections)

    def card_data(self, data) -> str:
        config = self.config
        source = config.path if config.source == "jsonl" else (
            f"synthetic instruction world, {config.categories} categories x {config.examples_per_category} rows"
            f"{f', world seed {config.world_seed}' if config.world_seed is not None else ''}")
        return f"- **Data:** {source}; {config.test_fraction:.0%} held out for testing."

    def card_notes(self, run_path) -> str:
        return ("Answers are compared after lowercasing and removing punctuation; the loss is the mean negative\n"
                "log-likelihood per reference response token.\n\n" + super().card_notes(run_path))

    def plot(self, axis, metrics: dict, split: str) -> None:
        categories = self._categories(metrics, split)
        names = ["all", *categories]
        axis.bar(names, [metrics[f"{split}/exact_match"], *(metrics[f"{split}/exact_match/{c}"] for c in categories)])
        axis.tick_params(axis="x", labelrotation=60)
        axis.set(title=f"Instruction exact match ({split})", ylabel="exact match", ylim=(0, 1))

    def stats(self, data) -> list[str]:
        lines = [f"{'source':>20}: {self.config.source}"]
        for split in ("train", "test"):
            rows = self.split_rows(split)
            counts = Counter(row["category"] for row in rows)
            lines.append(f"{split + ' rows':>20}: {len(rows)} ({len(counts)} categories: "
                         + ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) + ")")
        example = self.split_rows("train")[0]
        lines.append(example_text(example))
        return lines
