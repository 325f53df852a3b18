"""Like prediction (`eval.task: ctr`, TALLRec / CoLLM / CoRA's task): "will the user like this item?", Yes or No.

Section `data.ctr` (`llmrec.data.ctr.CTRTaskConfig`): how rated interactions become prompts with a Yes/No label.
Rows: the `ctr` stage trains the two-way softmax over the answers' logits on them; an `sft` stage trains on the
same rows as prompt -> answer completions (TALLRec's instruction tuning).

Evaluation scores every row of a split by p(Yes) = σ(logit_yes − logit_no) at the answer position
(`llmrec.eval.ctr`). Metric keys, per split: `<split>/auc`, `<split>/uauc` (mean per-user AUC over the
`<split>/uauc_users` users with both classes), `<split>/logloss`, `<split>/rows`, `<split>/positive_rate`; baselines
`baseline/popularity/<split>/auc|uauc|uauc_users` (training interactions of the item) and, for a CoRA model,
`baseline/cf/<split>/...` (its CF model alone).
"""

from __future__ import annotations

from llmrec.data.ctr import CTRTaskConfig
from llmrec.eval.keys import SPLIT_NAMES, baseline_prefix, split_prefix, systems
from llmrec.logs import get_logger

from . import Task, example_text
from .ranking import interactions_line

logger = get_logger(__name__)

BASELINES = ("cf", "popularity")


class CTRTask(Task):
    name = "ctr"
    description = "Yes/No like prediction (AUC, UAUC) against item popularity and, for CoRA, its CF model"
    section = "ctr"
    section_class = CTRTaskConfig
    section_help = "The Yes/No like-prediction task (CTR); needs ratings."
    section_holds = "how rated interactions become Yes/No rows"
    headline = "auc"
    card_tag = "recommendation"
    card_intro = """A like predictor trained with llmrec: the model reads the titles a user liked and a candidate
item's title and answers Yes or No; the score is the softmax of the two answers' logits."""

    def rows(self, data, split: str, kind: str):
        if kind != "sft":
            return super().rows(data, split, kind)
        from llmrec.data.ctr import ctr_examples

        return ctr_examples(data, split, self.config, self.recipe.run.seed)

    def answer_ids(self, tokenizer) -> tuple[int, ...]:
        from llmrec.answers import answer_token_ids

        return answer_token_ids(tokenizer, (self.config.yes_answer, self.config.no_answer), "data.ctr.yes_answer")

    def check_tokenizer(self, tokenizer) -> None:
        self.answer_ids(tokenizer)

    def template_texts(self) -> list[str]:
        from llmrec.data.ctr import ctr_tokenizer_texts

        return ctr_tokenizer_texts(self.config)

    def unlabelled_answers(self, tokenizer, data, split: str) -> tuple[list[str], tuple[int, ...]]:
        from llmrec.data.ctr import ctr_examples

        rows = ctr_examples(data, split, self.config, self.recipe.run.seed)
        return list(rows["prompt"]), self.answer_ids(tokenizer)

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        from llmrec.data.ctr import ctr_examples
        from llmrec.eval.ctr import cf_scores, ctr_metrics, ctr_scores

        rows = ctr_examples(data, split, self.config, self.recipe.run.seed)
        if len(rows) == 0:
            logger.warning(f"The {split} split has no CTR rows; nothing to evaluate.")
            return {}, []
        scores = ctr_scores(model, tokenizer, rows, self.recipe.eval.batch_size, self.answer_ids(tokenizer),
                            f"CTR {split}")
        users, items, labels = list(rows["user_id"]), list(rows["item_id"]), list(rows["label"])
        metrics = {split_prefix(split) + k: v for k, v in ctr_metrics(users, labels, scores).items()}

        popularity = data.popularity("train")
        baselines = {"popularity": [float(popularity[i]) for i in items]}
        cf = cf_scores(model, users, items)
        if cf is not None:
            baselines["cf"] = cf
        for name, values in baselines.items():
            for key, value in ctr_metrics(users, labels, values).items():
                if key in ("auc", "uauc", "uauc_users"):
                    metrics[baseline_prefix(name, split) + key] = value
        predictions = [{"user_id": u, "item_id": i, "label": y, "score": s}
                       for u, i, y, s in zip(users, items, labels, scores)]
        return metrics, predictions

    # --- reports -------------------------------------------------------------------------------------------------

    def summary(self, metrics: dict, splits: list[str]) -> str:
        out = []
        for split in self.evaluated(metrics, splits):
            out.append(f"\n{split} like prediction: {metrics[f'{split}/rows']} rows, "
                       f"{metrics[f'{split}/positive_rate']:.1%} liked, "
                       f"UAUC over {metrics[f'{split}/uauc_users']} users:")
            out.append(f"{'':<12}{'auc':>10}{'uauc':>10}")
            for name, prefix in [("model", split_prefix(split))] + [(b, baseline_prefix(b, split)) for b in BASELINES]:
                if prefix + "auc" in metrics:
                    values = [metrics.get(prefix + m, float("nan")) for m in ("auc", "uauc")]
                    out.append(f"{name:<12}" + "".join(f"{value:>10.4f}" for value in values))
        return "\n".join(out)

    def card_results(self, metrics: dict) -> str:
        sections = []
        for split in self.evaluated(metrics):
            rows = ["| system | AUC | UAUC |", "|---|---|---|"]
            named = [("this model", split_prefix(split))] + [
                (f"{baseline} baseline", baseline_prefix(baseline, split)) for baseline in BASELINES
                if baseline_prefix(baseline, split) + "auc" in metrics
            ]
            for system, prefix in named:
                cells = [f"{metrics[prefix + m]:.4f}" if isinstance(metrics.get(prefix + m), float) else "–"
                         for m in ("auc", "uauc")]
                rows.append(f"| {system} | " + " | ".join(cells) + " |")
            sections.append(
                f"## Results: {SPLIT_NAMES[split]} ({metrics[f'{split}/rows']} rows, "
                f"{metrics[f'{split}/positive_rate']:.1%} liked; UAUC over {metrics[f'{split}/uauc_users']} users "
                "with both classes)\n\n" + "\n".join(rows) + "\n"
            )
        return "\n".join(sections)

    def card_data(self, data) -> str:
        return interactions_line(self.recipe, data)

    def card_notes(self, run_path) -> str:
        recipe = self.recipe
        item = "" if recipe.adapter.args.get("conditioning") == "user" else " --item ITEM_ID"
        export = (f"\nllmrec export {run_path} --user USER_ID{item} --to peft-lora OUT"
                  if recipe.adapter.method == "cora" else "")
        return f"""AUC is over all rows; UAUC averages the AUC of each user who has both liked and disliked rows.

## Use

```bash
llmrec eval {run_path}{export}
```"""

    def plot(self, axis, metrics: dict, split: str) -> None:
        from llmrec.eval.plots import grouped_bars

        series = {name: [metrics.get(prefix + "auc", 0.0), metrics.get(prefix + "uauc", 0.0)]
                  for name, prefix in systems(metrics, split, "auc").items()}
        grouped_bars(axis, ["AUC", "UAUC"], series)
        axis.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        axis.set(title=f"Like prediction ({split})", ylabel="score", ylim=(0, 1))

    def stats(self, data) -> list[str]:
        lines = [f"{key:>20}: {value}" for key, value in data.stats().items()]
        train = self.rows(data, "train", "sft")
        lines.append(f"{'train CTR rows':>20}: {len(train)} ({sum(train['label'])} liked)")
        if len(train):
            lines.append(example_text(train[0]))
        return lines
