"""Next-item ranking (`eval.task: ranking`, the default): the model writes the title of a user's next item.

Rows: the SFT stage trains on next-item prompt–completion rows (`data.task`: the user's latest titles -> the next
title); the preference stages build theirs from the same prompts (`llmrec.data.preferences`).

Evaluation ranks the whole catalog for every target of a split by constrained beam search over a trie of the
tokenised titles (`llmrec.eval.ranking`; with `eval.engine: vllm` the same search on a vLLM engine of the run,
`llmrec.eval.vllm_ranking`), so every recommendation is a real item; items the user already has are
excluded when `eval.exclude_history` (the baselines exclude them too, on the same targets). Metric keys, per split:
`<split>/hr@K`, `<split>/ndcg@K`, `<split>/over_rec@K` (share of top-K slots taken by the three most recommended
items) for K in `eval.ks`, `<split>/targets`, `<split>/catalog_items`, `<split>/valid_item_ratio` (greedy,
unconstrained generations that are exactly a title), and the baselines' `hr@K`, `ndcg@K`, `over_rec@K` under
`baseline/<name>/<split>/` for the `eval.baselines`: popularity, random, and the trained ones, bpr_mf and
sasrec (`llmrec.cf`; trained once per run on the train split, early-stopped on valid, with `eval.baseline_args`;
BPR-MF ranks by the user's embedding, so a user without training interactions gets noise, while SASRec reads the
target's earlier items, the last `max_length` of them). Predictions: per target, the ranked items with their
log-probabilities and `target_rank` (1-based, null when the target is not among them). The `ood_popularity` targets
are a popularity-shifted draw of the test targets (`data.shifts`); the other OOD splits are held-out interactions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from llmrec.eval.keys import SPLIT_NAMES, baseline_prefix, split_prefix, systems
from llmrec.logs import get_logger

from . import Task, example_text

logger = get_logger(__name__)


@dataclass
class Target:
    user_id: str
    item_id: str
    history: list[str]
    prompt: str


@dataclass
class RecommendationQuery:
    """One recommendation to compute: the user (None for a given history), their items, the prompt, the catalog
    trie with the items to exclude, and the beams and k."""

    user: str | None
    history: list[str]
    prompt: str
    trie: object
    banned: dict[int, int]
    beams: int
    k: int

    def result(self, titles: dict[str, str], ranked: list[tuple[str, float]]) -> dict:
        """The answer of `llmrec recommend --json` and of the server's /v1/recommend."""
        return {
            "user": self.user,
            "history": [{"item_id": item, "title": titles[item]} for item in self.history],
            "ranked": [{"rank": rank, "item_id": item, "title": titles[item], "logprob": round(score, 4)}
                       for rank, (item, score) in enumerate(ranked[: self.k], 1)],
        }


class RankingTask(Task):
    name = "ranking"
    description = "next-item ranking over the whole catalog (HR@K, NDCG@K) against popularity and random"
    headline = "targets"
    card_tag = "recommendation"
    card_intro = """A next-item recommender trained with llmrec: the model reads a user's recent item titles and
writes the title of the next item; recommendations are ranked over the whole catalog by constrained beam search, so
every recommendation is a real item."""

    # --- rows ----------------------------------------------------------------------------------------------------

    def rows(self, data, split: str, kind: str):
        if kind != "sft":
            return super().rows(data, split, kind)
        from llmrec.data import next_item_examples

        return next_item_examples(data, split, self.recipe.data.task)

    def targets(self, data, split: str) -> list[Target]:
        """The targets of a split; the popularity-shift OOD set is drawn from the test targets here."""
        from llmrec.data import next_item_examples, ood_split, popularity_shift_sample

        recipe = self.recipe
        drawn = split == ood_split("popularity")
        rows = next_item_examples(data, "test" if drawn else split, recipe.data.task)
        targets = [Target(r["user_id"], r["item_id"], r["history"], r["prompt"]) for r in rows]
        if drawn:
            shift = recipe.data.shift("popularity")
            picked = popularity_shift_sample([t.item_id for t in targets], data.popularity("train"), shift,
                                             recipe.run.seed)
            targets = [targets[i] for i in picked]
        max_targets = recipe.eval.max_targets
        if max_targets is not None and len(targets) > max_targets:
            targets = random.Random(recipe.run.seed).sample(targets, max_targets)
        return targets

    def unlabelled_answers(self, tokenizer, data, split: str) -> tuple[list[str], tuple[int, ...]]:
        from llmrec.eval.ranking import build_trie

        # the answer distribution: the catalog's first title tokens at the answer position
        trie = build_trie(tokenizer, data, self.recipe.data.task)
        return [t.prompt for t in self.targets(data, split)], tuple(trie.allowed([]))

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, model, tokenizer, data, split: str) -> tuple[dict, list[dict]]:
        from llmrec.errors import LLMRecError
        from llmrec.eval.metrics import ranking_metrics
        from llmrec.eval.ranking import (
            build_trie,
            popularity_order,
            random_ranking,
            rank_between_processes,
            top_k_excluding,
            valid_item_ratio,
        )

        config, seed = self.recipe.eval, self.recipe.run.seed
        targets = self.targets(data, split)
        trie = build_trie(tokenizer, data, self.recipe.data.task)
        logger.info(f"Ranking {len(data.titles)} items for {len(targets)} {split} targets ({config.beams} beams).")
        prompts = [t.prompt for t in targets]
        excluded = [t.history for t in targets] if config.exclude_history else None
        if config.engine == "vllm":
            if self.engine_ranker is None:
                raise LLMRecError("ranking on vLLM needs the run's engine; evaluate through `llmrec eval RUN` or "
                                  "`llmrec train`.", "eval.engine")
            ranked = self.engine_ranker(tokenizer, trie, prompts, excluded, config.beams)
        else:
            ranked = rank_between_processes(model, tokenizer, trie, prompts, excluded, config.beams, config.batch_size)
        rankings = [[item for item, _ in row] for row in ranked]
        wanted = [t.item_id for t in targets]
        prefix = split_prefix(split)
        metrics = {prefix + key: value for key, value in ranking_metrics(rankings, wanted, config.ks).items()}
        metrics[prefix + "targets"] = len(targets)
        metrics[prefix + "catalog_items"] = len(trie)
        if config.valid_item_samples:
            sample = targets[: config.valid_item_samples]
            metrics[prefix + "valid_item_ratio"] = valid_item_ratio(model, tokenizer, set(data.titles.values()),
                                                                    [t.prompt for t in sample], trie.depth + 2,
                                                                    config.batch_size)

        k = max(config.ks)
        rng = random.Random(seed)
        items = sorted(data.titles)
        excluded = [t.history if config.exclude_history else [] for t in targets]
        for name in config.baselines:
            if name == "popularity":
                order = popularity_order(data)
                base = [top_k_excluding(order, banned, k) for banned in excluded]
            elif name == "random":
                base = [random_ranking(items, banned, k, rng) for banned in excluded]
            elif name == "bpr_mf":
                base = self._trained_baseline(name, data).rank([t.user_id for t in targets], k, excluded)
            else:
                base = self._trained_baseline(name, data).rank([t.history for t in targets], k, excluded)
            for key, value in ranking_metrics(base, wanted, config.ks).items():
                metrics[baseline_prefix(name, split) + key] = value

        titles = data.titles
        predictions = [
            {
                "user_id": t.user_id,
                "target": t.item_id,
                "target_title": titles[t.item_id],
                "target_rank": ranking.index(t.item_id) + 1 if t.item_id in ranking else None,
                "ranked": [{"item_id": item, "title": titles[item], "logprob": round(score, 4)}
                           for item, score in row],
            }
            for t, row, ranking in zip(targets, ranked, rankings)
        ]
        return metrics, predictions

    def _trained_baseline(self, name: str, data):
        """BPR-MF or SASRec trained on `data` with `eval.baseline_args`, once per run (every split reuses it)."""
        from llmrec.cf import train_cf, train_sasrec

        trained = self.__dict__.setdefault("_baselines", {})
        if (name, id(data)) not in trained:
            logger.info(f"Training the {name} baseline on the train split.")
            if name == "bpr_mf":
                model = train_cf(data, self._baseline_config(name), self.recipe.run.seed)
            else:
                model = train_sasrec(data, self._baseline_config(name), self.recipe.run.seed)
            trained[(name, id(data))] = model
        return trained[(name, id(data))]

    def _baseline_config(self, name: str):
        from llmrec.cf import CFConfig, SASRecConfig

        args = self.recipe.eval.baseline_args.get(name, {})
        if name == "bpr_mf":
            return CFConfig.model_validate({"model": "mf", "positives": "all", **args})
        return SASRecConfig.model_validate(args)

    def needs(self) -> list:
        from pydantic import ValidationError

        needs = super().needs()
        config = self.recipe.eval
        for name in config.baseline_args:
            if name not in ("bpr_mf", "sasrec"):
                needs.append((("eval", "baseline_args", name), f"{name!r} is not a trained baseline; baseline_args "
                              "takes bpr_mf and sasrec."))
                continue
            if name not in config.baselines:
                needs.append((("eval", "baseline_args", name), f"settings for {name}, which eval.baselines does not "
                              "list; add it there or drop them."))
            try:
                self._baseline_config(name)
            except ValidationError as error:
                first = error.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                needs.append((("eval", "baseline_args", name, *first["loc"][:1]),
                              f"{name} {where}: {first['msg']}." if where else f"{name}: {first['msg']}."))
        return needs

    def recommendation_query(self, tokenizer, data, k: int, user: str | None = None,
                             history: list[str] | None = None, trie=None) -> RecommendationQuery:
        """What ranking for a user of the run, or for a history of item ids or titles (a new user), needs: the top
        k of the ranking evaluation computes (`eval.beams` beams, at least k, so a shorter list is the start of a
        longer one). `trie`: the catalog's, when the caller keeps it."""
        from llmrec.data.tasks import format_prompt
        from llmrec.eval.ranking import build_trie

        recipe = self.recipe
        if history is None:
            history = _user_history(data, user)
        else:
            history = [item_of(data, item) for item in history]
        if trie is None:
            trie = build_trie(tokenizer, data, recipe.data.task)
        banned = trie.banned_counts(history) if recipe.eval.exclude_history else {}
        beams = min(max(k, recipe.eval.beams), trie.available(banned))
        return RecommendationQuery(user, history, format_prompt(recipe.data.task, history, data.titles), trie,
                                   banned, beams, k)

    def recommend(self, model, tokenizer, data, k: int, user: str | None = None,
                  history: list[str] | None = None, llm=None, lora_request=None) -> dict:
        """The top k for a user or a history (`recommendation_query`), ranked by the model, or by a vLLM engine
        (`llm`, with the run's adapter as `lora_request`)."""
        from llmrec.eval.ranking import rank_with_model
        from llmrec.eval.vllm_ranking import rank_with_vllm

        query = self.recommendation_query(tokenizer, data, k, user, history)
        excluded = [query.history] if self.recipe.eval.exclude_history else None
        if llm is None:
            ranked = rank_with_model(model, tokenizer, query.trie, [query.prompt], excluded, query.beams, 1,
                                     progress=False)[0]
        else:
            ranked = rank_with_vllm(llm, tokenizer, query.trie, [query.prompt], excluded, query.beams, lora_request,
                                    progress=False)[0]
        return query.result(data.titles, ranked)

    # --- reports -------------------------------------------------------------------------------------------------

    def _columns(self) -> list[str]:
        ks = sorted(self.recipe.eval.ks)
        return [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")] + [f"over_rec@{max(ks)}"]

    def _systems(self, split: str) -> list[tuple[str, str]]:
        baselines = self.recipe.eval.baselines
        return [("model", split_prefix(split))] + [(name, baseline_prefix(name, split)) for name in baselines]

    def summary(self, metrics: dict, splits: list[str]) -> str:
        columns = self._columns()
        out = []
        for split in self.evaluated(metrics, splits):
            rows = [f"{'':<12}" + "".join(f"{c:>12}" for c in columns)]
            for name, prefix in self._systems(split):
                values = [metrics.get(prefix + c) for c in columns]
                cells = [f"{v:>12.4f}" if isinstance(v, float) else f"{'-':>12}" for v in values]
                rows.append(f"{name:<12}" + "".join(cells))
            out.append(f"\n{split} ranking over {metrics.get(f'{split}/catalog_items', '?')} items, "
                       f"{metrics.get(f'{split}/targets', '?')} targets:")
            out.append("\n".join(rows))
            ratio = metrics.get(f"{split}/valid_item_ratio")
            if ratio is not None:
                out.append(f"valid-item ratio of unconstrained generation: {ratio:.4f}")
        return "\n".join(out)

    def _card_table(self, metrics: dict, split: str) -> str:
        columns = self._columns()
        header = "| system | " + " | ".join(c.upper().replace("OVER_REC", "over-rec.") for c in columns) + " |"
        rows = [header, "|---|" + "---|" * len(columns)]
        for name, prefix in self._systems(split):
            cells = [f"{metrics[prefix + c]:.4f}" if isinstance(metrics.get(prefix + c), float) else "–"
                     for c in columns]
            rows.append(f"| {'this model' if name == 'model' else f'{name} baseline'} | " + " | ".join(cells) + " |")
        return "\n".join(rows)

    def card_results(self, metrics: dict) -> str:
        sections = []
        for split in self.evaluated(metrics):
            ratio = metrics.get(f"{split}/valid_item_ratio")
            text = (f"## Results: {SPLIT_NAMES[split]} ({metrics[f'{split}/targets']} targets, "
                    f"{metrics.get(f'{split}/catalog_items', '?')} candidate items)\n\n"
                    f"{self._card_table(metrics, split)}\n")
            if isinstance(ratio, float):
                text += f"\nValid-item ratio of unconstrained greedy generation: {ratio:.4f}\n"
            sections.append(text)
        return "\n".join(sections)

    def card_data(self, data) -> str:
        return interactions_line(self.recipe, data)

    def card_notes(self, run_path) -> str:
        config = self.recipe.eval
        history = "excluded from" if config.exclude_history else "allowed in"
        return f"""Items the user had already interacted with are {history} every ranking.
The over-recommendation ratio is the share of all top-{max(config.ks)} slots taken by the three most recommended
items (high values mean every user gets the same few items).

## Use

```bash
llmrec recommend {run_path} --user USER_ID -k 10
llmrec eval {run_path}
```"""

    def plot(self, axis, metrics: dict, split: str) -> None:
        from llmrec.eval.plots import grouped_bars

        ks = sorted(int(k.split("@")[1]) for k in metrics if k.startswith(f"{split}/hr@"))
        keys = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
        series = {name: [metrics.get(prefix + key, 0.0) for key in keys]
                  for name, prefix in systems(metrics, split, "hr@").items()}
        grouped_bars(axis, [key.upper() for key in keys], series)
        axis.set(title=f"Whole-catalog ranking ({split})", ylabel="score")

    def stats(self, data) -> list[str]:
        lines = [f"{key:>20}: {value}" for key, value in data.stats().items()]
        train = self.rows(data, "train", "sft")
        lines.append(f"{'train examples':>20}: {len(train)}")
        if len(train):
            lines.append(example_text(train[0]))
        return lines


def interactions_line(recipe, data) -> str:
    """The model card's data line for a task on the recipe's interactions: counts, split, shifts, prompt length."""
    from llmrec.data.splits import describe_split

    details = {
        "popularity": lambda s: f"test targets re-drawn with weight popularity^-{s.power}",
        "temporal": lambda s: f"each user's latest {s.fraction:.0%} of interactions",
        "environment": lambda s: f"the users of environments {s.ood_environments}, never trained on",
    }
    shifts = [f"{s.kind} shift ({details[s.kind](s)})" for s in recipe.data.shifts]
    shifted = f"; out-of-distribution tests: {'; '.join(shifts)}" if shifts else ""
    stats = data.stats()
    counts = f"{stats['users']} users, {stats['items']} items, {stats['interactions']} interactions"
    return f"""- **Data:** {stats['name']} — {counts};
  split {describe_split(recipe.data.split)}{shifted}; prompts show the last {recipe.data.task.history_length} items."""


def _user_history(data, user: str) -> list[str]:
    from llmrec.errors import LLMRecError, did_you_mean

    sequences = data.user_sequences()
    if user not in sequences:
        raise LLMRecError(
            f"user {user!r} has no interactions in this run's data ({len(sequences)} users, e.g. "
            f"{', '.join(list(sequences)[:3])}).{did_you_mean(user, sequences)} For a new user, give their items "
            "with --history.",
            "--user",
        )
    return [item for item, _ in sequences[user]]


def item_of(data, text: str) -> str:
    """The item a catalog id or title names (a title matched exactly, then ignoring case)."""
    from llmrec.errors import LLMRecError, did_you_mean

    titles = data.titles
    if text in titles:
        return text
    for same in (lambda title: title == text, lambda title: title.casefold() == text.casefold()):
        found = [item for item, title in titles.items() if same(title)]
        if len(found) == 1:
            return found[0]
        if found:
            raise LLMRecError(f"the title {text!r} names {len(found)} items ({', '.join(found[:5])}); give the item "
                              "id instead.", "--history")
    raise LLMRecError(f"{text!r} is neither an item id nor a title of this run's catalog ({len(titles)} items, e.g. "
                      f"{', '.join(list(titles)[:3])}).{did_you_mean(text, [*titles, *titles.values()])}", "--history")
