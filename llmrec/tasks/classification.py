"""Text classification by label-word scoring (`eval.task: classification`): EPT, DePT, LAMP and prompt tuning's
benchmark task.

Section `data.classification` (`llmrec.data.classification.ClassificationTaskConfig`): a synthetic task generated
offline (sentiment, topic) or a GLUE task, its prompt template and one label word per class. Rows: the `sft` stage
trains on prompt -> label word; the interactions are loaded but not used.

Evaluation reads the class off the logits of each label word's first token after the prompt
(`llmrec.eval.classification`). Metric keys, per split (test and valid only): `<split>/accuracy`, `<split>/rows`, and
the majority-class baseline `baseline/majority/<split>/accuracy`.
Predictions hold each row's label, predicted class and the softmax over the label words.
"""

from __future__ import annotations

from collections import Counter

from llmrec.data.classification import ClassificationTaskConfig
from llmrec.eval.keys import SPLIT_NAMES, baseline_prefix, split_prefix, systems
from llmrec.logs import get_logger

from . import Task, example_text

logger = get_logger(__name__)


class ClassificationTask(Task):
    name = "classification"
    description = "text classification accuracy by label-word scoring, against the majority class"
    section = "classification"
    section_class = ClassificationTaskConfig
    section_help = ("A text-classification task (label-word scoring): `trainer: sft` trains on its rows instead of "
                    "next-item examples, and `eval.task: classification` evaluates it. The interactions are still "
                    "loaded (the default synthetic world is cheap) but not used.")
    section_holds = "the task, its prompt template and label words"
    section_trains = "trainer sft trains on classification rows"
    splits = ("test", "valid")
    uses_interactions = False
    headline = "accuracy"
    card_tag = "text-classification"
    card_intro = """A text classifier trained with llmrec: the model reads a prompt holding the text and writes the
class's label word; the predicted class is the label word whose first token has the highest logit after the prompt."""

    def rows(self, data, split: str, kind: str):
        if kind != "sft":
            return super().rows(data, split, kind)
        from llmrec.data.classification import classification_examples

        return classification_examples(self.config, split, self.recipe.run.seed)

    def check_tokenizer(self, tokenizer) -> None:
        from llmrec.eval.classification import label_token_ids

        label_token_ids(tokenizer, self.config.label_words)

    def text_rows(self, data) -> list[str]:
        from llmrec.data.classification import classification_tokenizer_texts

        return classification_tokenizer_texts(self.config, self.recipe.run.seed)

    def unlabelled_answers(self, tokenizer, data, split: str) -> tuple[list[str], tuple[int, ...]]:
        from llmrec.data.classification import classification_examples
        from llmrec.eval.classification import label_token_ids

        rows = classification_examples(self.config, split, self.recipe.run.seed)
        return list(rows["prompt"]), label_token_ids(tokenizer, self.config.label_words)

    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        import torch

        from llmrec.answers import prompt_answer_logits
        from llmrec.data.classification import classification_examples
        from llmrec.eval.classification import accuracy, label_token_ids, majority_class, predict

        config, seed = self.config, self.recipe.run.seed
        rows = classification_examples(config, split, seed)
        if len(rows) == 0:
            logger.warning(f"The {split} split has no classification rows; nothing to evaluate.")
            return {}, []
        label_ids = label_token_ids(tokenizer, config.label_words)
        logits = prompt_answer_logits(model, tokenizer, rows, self.recipe.eval.batch_size, label_ids,
                                      f"classification {split}")
        labels, predictions = list(rows["label"]), predict(logits)
        majority = majority_class(classification_examples(config, "train", seed)["label"])
        metrics = {
            split_prefix(split) + "rows": len(labels),
            split_prefix(split) + "accuracy": accuracy(labels, predictions),
            baseline_prefix("majority", split) + "accuracy": accuracy(labels, [majority] * len(labels)),
        }
        probabilities = torch.softmax(logits, dim=-1).tolist()
        rows_out = [{"row": i, "label": y, "prediction": p, "probabilities": [round(q, 6) for q in probs]}
                    for i, (y, p, probs) in enumerate(zip(labels, predictions, probabilities))]
        return metrics, rows_out

    # --- reports -------------------------------------------------------------------------------------------------

    def summary(self, metrics: dict, splits: list[str]) -> str:
        config = self.config
        out = []
        for split in self.evaluated(metrics, splits):
            out.append(f"\n{split} {config.name} classification: {metrics[f'{split}/rows']} rows, "
                       f"{config.num_classes} classes:")
            out.append(f"{'':<12}{'accuracy':>10}")
            for name, prefix in (("model", split_prefix(split)), ("majority", baseline_prefix("majority", split))):
                out.append(f"{name:<12}{metrics.get(prefix + 'accuracy', float('nan')):>10.4f}")
        return "\n".join(out)

    def card_results(self, metrics: dict) -> str:
        sections = []
        for split in self.evaluated(metrics):
            rows = ["| system | accuracy |", "|---|---|"]
            for system, prefix in (("this model", split_prefix(split)),
                                   ("majority-class baseline", baseline_prefix("majority", split))):
                value = metrics.get(prefix + "accuracy")
                rows.append(f"| {system} | {value:.4f} |" if isinstance(value, float) else f"| {system} | – |")
            sections.append(f"## Results: {SPLIT_NAMES[split]} ({metrics[f'{split}/rows']} rows, "
                            f"{self.config.num_classes} classes)\n\n" + "\n".join(rows) + "\n")
        return "\n".join(sections)

    def card_data(self, data) -> str:
        from llmrec.data.classification import describe_classification

        return f"- **Data:** {describe_classification(self.config)}."

    def card_notes(self, run_path) -> str:
        return ("The majority-class baseline always answers the most frequent class of the training rows.\n\n"
                + super().card_notes(run_path))

    def plot(self, axis, metrics: dict, split: str) -> None:
        found = systems(metrics, split, "accuracy")
        axis.bar(list(found), [metrics.get(f"{prefix}accuracy", 0.0) for prefix in found.values()])
        axis.set(title=f"Classification ({split})", ylabel="accuracy", ylim=(0, 1))

    def stats(self, data) -> list[str]:
        from llmrec.data.classification import classification_examples

        config, seed = self.config, self.recipe.run.seed
        lines = [f"{'task':>20}: {config.name}"]
        for split in ("train", "valid", "test"):
            rows = classification_examples(config, split, seed)
            counts = Counter(rows["label"])
            shown = ", ".join(f"{counts[k]} {word.strip()!r}" for k, word in enumerate(config.label_words))
            lines.append(f"{split + ' rows':>20}: {len(rows)} ({shown})")
        train = classification_examples(config, "train", seed)
        lines.append(example_text(train[0]))
        return lines
