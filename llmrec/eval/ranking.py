"""Whole-catalog ranking by constrained beam search, the valid-item ratio, and the popularity and random baselines.

The model ranks the catalog by constrained beam search: `transformers`' beam search with a logits processor that
restricts every beam to the catalog trie, `num_beams` beams and as many returned sequences, and
`length_penalty=0` so a beam's score is the log-probability of the whole title (EOS included). Every returned
sequence is a real, distinct item; the K best are the model's top-K. Items the user already interacted with are
excluded through the trie (`exclude_history`), and the popularity and random baselines exclude them too, on the
same targets, so the comparison is like for like.

The valid-item ratio measures the model without the constraint: the share of greedy, unconstrained generations
that are exactly a catalog title.

Under several processes `rank_between_processes` splits the prompts between processes and gathers the rankings on
every process. The ranking task (`llmrec.tasks.ranking`) picks the targets and turns rankings into metrics.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from .trie import CatalogTrie


def build_trie(tokenizer, data, task) -> CatalogTrie:
    """The trie of the catalog's titles (`data`: a RecData) as they follow the next-item prompt (`task`: its
    `data.task` section)."""
    return CatalogTrie.from_titles(tokenizer, data.titles, task.completion_anchor)


# transformers gives unfilled beam slots a score of about -1e9; real title log-probabilities are far above this.
_UNFILLED_SCORE = -1.0e8


class CatalogConstraint(LogitsProcessor):
    """Mask every token that leaves the catalog trie (or enters a title the user already has).

    transformers' `PrefixConstrainedLogitsProcessor` refuses a beam with no allowed token, but beam search keeps
    finished sequences as backup beams; here such a beam simply gets no continuation (every score -inf).
    """

    def __init__(self, trie: CatalogTrie, prompt_length: int, banned: list[dict[int, int]], num_beams: int):
        self.trie, self.prompt_length, self.banned, self.num_beams = trie, prompt_length, banned, num_beams

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, columns = [], []
        for row, generated in enumerate(input_ids[:, self.prompt_length :].tolist()):
            allowed = self.trie.allowed(generated, self.banned[row // self.num_beams])
            rows.extend([row] * len(allowed))
            columns.extend(allowed)
        mask = torch.full_like(scores, float("-inf"))
        mask[rows, columns] = 0.0
        return scores + mask


@torch.no_grad()
def rank_with_model(
    model,
    tokenizer,
    trie: CatalogTrie,
    prompts: Sequence[str],
    excluded: Sequence[Sequence[str]] | None,
    num_beams: int,
    batch_size: int,
    progress: bool = True,
) -> list[list[tuple[str, float]]]:
    """For each prompt, up to `num_beams` (item, log-probability) pairs, best first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    results: list[list[tuple[str, float]]] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="Ranking the catalog", unit="batch", disable=not progress):
        batch = list(prompts[start : start + batch_size])
        banned = [trie.banned_counts(excluded[start + i]) if excluded else {} for i in range(len(batch))]
        beams = max(1, min(num_beams, min(trie.available(b) for b in banned)))
        encoded = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
        prompt_length = encoded["input_ids"].shape[1]
        output = model.generate(
            **encoded,
            **shared_prompt_cache(model, encoded, beams),
            num_beams=beams,
            num_return_sequences=beams,
            max_new_tokens=trie.depth,
            do_sample=False,
            length_penalty=0.0,
            early_stopping=True,
            logits_processor=LogitsProcessorList([CatalogConstraint(trie, prompt_length, banned, beams)]),
            output_scores=True,
            output_logits=beams == 1,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        sequences = output.sequences[:, prompt_length:].tolist()
        scores = output.sequences_scores.tolist() if beams > 1 else _greedy_logprobs(output, prompt_length, eos)
        for row in range(len(batch)):
            ranked, seen = [], set()
            for j in range(row * beams, (row + 1) * beams):
                tokens = sequences[j]
                if eos in tokens:
                    tokens = tokens[: tokens.index(eos) + 1]
                item = trie.item_of(tokens)
                if item is not None and item not in seen and scores[j] > _UNFILLED_SCORE:
                    seen.add(item)
                    ranked.append((item, scores[j]))
            results.append(ranked)
    model.train(was_training)
    return results


def shared_prompt_cache(model, encoded, beams: int) -> dict:
    """generate()'s cache argument holding each prompt but its last token, computed once and repeated for its beams
    ({} where it does not apply: one beam, or a soft-prompt adapter, whose virtual tokens PEFT adds in generate).

    generate() copies every prompt `beams` times before its first forward, so beam search would run the prompt
    through the model once per beam: with a real model and a long history that prefill is most of the ranking's
    cost. Handed this cache, generate() runs only the prompt's last token and then the titles.
    """
    config = getattr(model, "active_peft_config", None)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    if beams == 1 or ids.shape[1] < 2 or getattr(config, "is_prompt_learning", False):
        return {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # transformers 5
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded prompts
    output = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True)
    cache = output[name]
    cache.batch_repeat_interleave(beams)
    return {name: cache}


def _greedy_logprobs(output, prompt_length: int, eos: int) -> list[float]:
    """With one beam, generate() is greedy and reports no sequence score: sum the unconstrained log-probabilities
    of the chosen tokens up to EOS, as beam search scores them."""
    chosen = output.sequences[:, prompt_length:]
    logprobs = torch.stack(output.logits, dim=1).float().log_softmax(-1)
    picked = logprobs.gather(-1, chosen[:, : logprobs.shape[1], None]).squeeze(-1)
    ended = (chosen[:, : logprobs.shape[1]] == eos).long().cumsum(-1)
    keep = (ended == 0) | ((ended == 1) & (chosen[:, : logprobs.shape[1]] == eos))
    return (picked * keep).sum(-1).tolist()


@torch.no_grad()
def valid_item_ratio(model, tokenizer, titles: set[str], prompts: Sequence[str], max_new_tokens: int,
                     batch_size: int) -> float:
    """Share of greedy, unconstrained generations that are exactly a catalog title."""
    if not prompts:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    valid = 0
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        encoded = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left").to(device)
        output = model.generate(
            **encoded,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        valid += sum(text.strip() in titles for text in texts)
    model.train(was_training)
    return valid / len(prompts)


def popularity_order(data) -> list[str]:
    """Catalog items of a RecData by training interactions, most popular first (ties by item id)."""
    counts = data.popularity("train")
    return sorted(data.titles, key=lambda item: (-counts.get(item, 0), item))


def top_k_excluding(order: Sequence[str], excluded: Sequence[str], k: int) -> list[str]:
    skip, out = set(excluded), []
    for item in order:
        if item not in skip:
            out.append(item)
            if len(out) == k:
                break
    return out


def random_ranking(items: Sequence[str], excluded: Sequence[str], k: int, rng: random.Random) -> list[str]:
    skip = set(excluded)
    pool = [item for item in items if item not in skip]
    return rng.sample(pool, min(k, len(pool)))


def rank_between_processes(model, tokenizer, trie: CatalogTrie, prompts: Sequence[str],
                           excluded: Sequence[Sequence[str]] | None, num_beams: int,
                           batch_size: int) -> list[list[tuple[str, float]]]:
    """`rank_with_model` with the prompts split between processes; every process gets every ranking, in order."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    indices = list(range(len(prompts)))
    with state.split_between_processes(indices, apply_padding=True) as mine:
        ranked = rank_with_model(
            model,
            tokenizer,
            trie,
            [prompts[i] for i in mine],
            [excluded[i] for i in mine] if excluded is not None else None,
            num_beams,
            batch_size,
            progress=state.is_main_process,
        )
        local = list(zip(mine, ranked))
    by_index = dict(gather_object(local) if state.num_processes > 1 else local)
    return [by_index[i] for i in indices]
