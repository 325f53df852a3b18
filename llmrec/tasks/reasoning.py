"""Reasoning (`eval.task: reasoning`): problems with final answers, solved by sampled worked solutions (ECHO, TTRL).

Section `data.reasoning` (`llmrec.data.reasoning.ReasoningTaskConfig`): the arithmetic world, GSM8K, MATH-500, AIME
or JSON Lines, and the prompt template. Rows: the `sft` stage trains on worked solutions of the training problems;
test-time RL (`trainer: echo`) builds its own prompt-only rows from the test questions. The interactions are loaded
but not used.

Evaluation samples `eval.samples` solutions per question of the split at `eval.temperature` (seeded), extracts their
answers and votes (`llmrec.eval.reasoning`). Metric keys, per split: `<split>/mean_accuracy` (mean@n),
`<split>/majority_accuracy` (maj@n), `<split>/pass_accuracy` (pass@n), `<split>/answered`,
`<split>/completion_tokens`, `<split>/questions`, `<split>/samples`, and per difficulty level
`<split>/level<L>/mean_accuracy|majority_accuracy|questions`. There is no baseline (the base model before training is
the comparison: evaluate it with a recipe without stages).
"""

from __future__ import annotations

from collections import Counter

from llmrec.data.reasoning import ReasoningTaskConfig
from llmrec.eval.keys import SPLIT_NAMES, split_prefix

from . import Task, example_text

COLUMNS = ("mean_accuracy", "majority_accuracy", "pass_accuracy", "answered", "completion_tokens")


class ReasoningTask(Task):
    name = "reasoning"
    description = "mean and majority-vote accuracy of sampled solutions"
    section = "reasoning"
    section_class = ReasoningTaskConfig
    section_help = ("Problems with final answers (arithmetic world, GSM8K, MATH-500, AIME): `trainer: sft` trains on "
                    "their worked solutions, test-time RL (`trainer: echo`) on the test questions without their "
                    "answers, and `eval.task: reasoning` samples solutions. The interactions are loaded but not used.")
    section_holds = "the problems and their prompt template"
    splits = ("test", "valid")
    uses_interactions = False
    headline = "mean_accuracy"
    card_tag = "reasoning"
    card_intro = """A problem solver trained with llmrec: the model writes a worked solution that ends in its final
answer; accuracy compares the extracted answers of sampled solutions with the true ones."""

    def rows(self, data, split: str, kind: str):
        if kind != "sft":
            return super().rows(data, split, kind)
        from llmrec.data.reasoning import reasoning_examples

        return reasoning_examples(self.config, split, self.recipe.run.seed)

    def text_rows(self, data) -> list[str]:
        from llmrec.data.reasoning import reasoning_tokenizer_texts

        return reasoning_tokenizer_texts(self.config, self.recipe.run.seed)

    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        from llmrec.data.reasoning import reasoning_examples
        from llmrec.eval.reasoning import accuracy_metrics, sample_answers

        recipe, settings = self.recipe, self.recipe.eval
        rows = reasoning_examples(self.config, split, recipe.run.seed)
        if settings.max_targets is not None and len(rows) > settings.max_targets:
            rows = rows.select(range(settings.max_targets))
        sampled = sample_answers(model, tokenizer, list(rows["prompt"]), settings.samples, settings.temperature,
                                 settings.max_new_tokens, settings.batch_size, recipe.run.seed,
                                 f"sampling {split} solutions")
        predictions = [{"prompt": row["prompt"], "answer": row["answer"], "level": row["level"], **answers}
                       for row, answers in zip(rows, sampled)]
        prefix = split_prefix(split)
        metrics = {prefix + k: v for k, v in accuracy_metrics(predictions).items()}
        for level in sorted({p["level"] for p in predictions}):
            subset = [p for p in predictions if p["level"] == level]
            metrics.update({f"{prefix}level{level}/{k}": v for k, v in accuracy_metrics(subset).items()
                            if k in ("mean_accuracy", "majority_accuracy", "questions")})
        return metrics, predictions

    # --- reports -------------------------------------------------------------------------------------------------

    def summary(self, metrics: dict, splits: list[str]) -> str:
        out = []
        for split in self.evaluated(metrics, splits):
            out.append(f"\n{split} {self.config.source}: {metrics[f'{split}/questions']} questions, "
                       f"{metrics[f'{split}/samples']} samples each at temperature {self.recipe.eval.temperature}:")
            out.append("".join(f"{c.removesuffix('_accuracy'):>12}" for c in COLUMNS))
            out.append("".join(f"{metrics[f'{split}/{c}']:>12.4f}" for c in COLUMNS))
        return "\n".join(out)

    def card_results(self, metrics: dict) -> str:
        sections = []
        for split in self.evaluated(metrics):
            n = metrics[f"{split}/samples"]
            rows = [f"| mean@{n} | maj@{n} | pass@{n} | answered | tokens per solution |", "|---|---|---|---|---|",
                    "| " + " | ".join(f"{metrics[f'{split}/{k}']:.4f}" for k in COLUMNS) + " |"]
            heading = (f"## Results: {SPLIT_NAMES[split]} ({metrics[f'{split}/questions']} questions, {n} samples "
                       f"each at temperature {self.recipe.eval.temperature})")
            sections.append(heading + "\n\n" + "\n".join(rows) + "\n")
        return "\n".join(sections)

    def card_data(self, data) -> str:
        config = self.config
        return (f"- **Data:** {config.source} problems ({config.train_size} train, {config.test_size} test"
                f"{f', levels {config.levels}' if config.source == 'arithmetic' else ''}).")

    def card_notes(self, run_path) -> str:
        return ("mean@n is the share of correct samples, maj@n the accuracy of the majority answer, pass@n the share "
                "of\nquestions with at least one correct sample.\n\n" + super().card_notes(run_path))

    def plot(self, axis, metrics: dict, split: str) -> None:
        n = metrics.get(f"{split}/samples", "n")
        names = {"mean_accuracy": f"mean@{n}", "majority_accuracy": f"maj@{n}", "pass_accuracy": f"pass@{n}"}
        axis.bar(list(names.values()), [metrics.get(f"{split}/{key}", 0.0) for key in names])
        axis.set(title=f"Reasoning accuracy ({split})", ylabel="accuracy", ylim=(0, 1))

    def stats(self, data) -> list[str]:
        from llmrec.data.reasoning import reasoning_examples

        config, seed = self.config, self.recipe.run.seed
        lines = [f"{'source':>20}: {config.source}"]
        for split in ("train", "valid", "test"):
            rows = reasoning_examples(config, split, seed)
            levels = Counter(rows["level"])
            shown = ", ".join(f"{k}: {levels[k]}" for k in sorted(levels))
            lines.append(f"{split + ' problems':>20}: {len(rows)}" + (f" (levels {shown})" if len(rows) else ""))
        rows = reasoning_examples(config, "train", seed)
        rows = rows if len(rows) else reasoning_examples(config, "test", seed)
        lines.append(example_text(rows[0]))
        return lines
