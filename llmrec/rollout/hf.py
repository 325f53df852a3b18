"""The transformers rollout backend: batched decoding of every branch of every question with one KV cache.

The prompts are prefilled once (left-padded, one row per question). Each decoding step runs one forward over the
live rows; then rows that stopped are dropped and a fork's new rows are copies of its parent's row, so the cache is
re-indexed (`Cache.reorder_cache`, an `index_select` per layer) instead of recomputing any shared prefix. A pruned
row is dropped at the step that pruned it. Fills (independent samples that complete a question's N leaves) join
the running batch as soon as the tree's shortfall is certain, from a left-padded copy of the prefilled prompt
cache row. transformers' `generate` cannot fork mid-sequence, hence this loop.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .tree import Branch, TreeBuilder, TreeConfig, token_signals
from .types import QuestionRollout, SamplingConfig, completions_of


class HFRollout:
    """`generate(prompts, n_leaves, tree, sampling, seed)` with a transformers causal LM (in eval mode)."""

    def __init__(self, model, eos_token_ids: list[int], pad_token_id: int):
        self.model, self.eos_token_ids, self.pad_token_id = model, set(eos_token_ids), pad_token_id
        # transformers 5 renames `past_key_values` to `cache` model by model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n_leaves: int, tree: TreeConfig, sampling: SamplingConfig,
                 seed: int) -> list[QuestionRollout]:
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        builder = TreeBuilder(tree, n_leaves, len(prompts), sampling.max_new_tokens, self.eos_token_ids)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids, device=device)
            mask[row, width - len(ids):] = 1
        prompt_cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                         use_cache=True, logits_to_keep=1, **{self.cache_argument: prompt_cache})
        prompt_logits = out.logits[:, -1].float()

        roots = [builder.new_branch(q, "tree") for q in range(len(prompts)) for _ in range(builder.roots(q))]
        self._decode(builder, roots, prompt_cache, mask, prompt_logits, sampling, generator)
        return [QuestionRollout(completions_of(builder.leaves(q)), builder.stats[q]) for q in range(len(prompts))]

    def _decode(self, builder: TreeBuilder, rows: list[Branch], prompt_cache, prompt_mask, prompt_logits, sampling,
                generator) -> None:
        # rows join a running batch by left-padding a copy of their prompt's cache row to the batch's length; that
        # needs plain dynamic cache layers (sliding-window layers drop old positions), else fills wait for an empty
        # batch and restart from the prompt cache
        joinable = all(type(layer) is DynamicLayer for layer in prompt_cache.layers)
        prompt_kv = [(layer.keys, layer.values) for layer in prompt_cache.layers]
        cache, mask, logits = self._start(prompt_kv, prompt_mask, prompt_logits, rows)
        tree = builder.config
        while True:
            fills = builder.spawn_fills(rows) if joinable or not rows else []
            if fills and rows:
                mask, logits = self._join(cache, mask, logits, prompt_kv, prompt_mask, prompt_logits, fills)
                rows = rows + fills
            elif fills:
                cache, mask, logits = self._start(prompt_kv, prompt_mask, prompt_logits, fills)
                rows = fills
            if not rows:
                return
            scaled = logits / sampling.temperature
            sampled_logp = torch.log_softmax(scaled, dim=-1)  # recorded and used for the signals (before top-p)
            entropy, confidence = token_signals(sampled_logp, tree.top_k, tree.confidence_k)
            tokens = torch.multinomial(torch.softmax(_filtered(scaled, sampling.top_p), dim=-1), 1,
                                       generator=generator).squeeze(1)
            top = sampled_logp.topk(min(tree.max_width + 1, sampled_logp.shape[-1]), dim=-1).indices
            # one transfer to Python lists per step; the per-row loop below is plain Python
            token_list, entropy_list, confidence_list = tokens.tolist(), entropy.tolist(), confidence.tolist()
            chosen_logp = sampled_logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            top_list, top_logp = top.tolist(), sampled_logp.gather(1, top).tolist()
            keep, feed = [], []
            next_rows: list[Branch] = []
            for i, branch in enumerate(rows):
                token = token_list[i]
                alternatives = list(zip(top_list[i], top_logp[i])) if tree.branching else []
                decision = builder.observe(branch, token, chosen_logp[i], entropy_list[i], confidence_list[i],
                                           alternatives)
                continuing = [branch] if decision.stop is None else []
                continuing += [builder.branches[c] for c in decision.alternatives
                               if builder.branches[c].state == "active"]
                for row in continuing:  # a fork's row is a copy of its parent's row i
                    keep.append(i)
                    feed.append(row.token_ids[-1])
                    next_rows.append(row)
            rows = next_rows
            if not rows:
                continue  # fills may still be due
            if keep != list(range(len(mask))):  # rows stopped or forked: re-index the cache
                index = torch.tensor(keep, device=mask.device)
                cache.reorder_cache(index)
                mask = mask[index]
            mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
            out = self.model(input_ids=torch.tensor(feed, device=mask.device).unsqueeze(1), attention_mask=mask,
                             position_ids=(mask.sum(-1, keepdim=True) - 1), use_cache=True,
                             **{self.cache_argument: cache})
            logits = out.logits[:, -1].float()

    def _start(self, prompt_kv, prompt_mask, prompt_logits, rows: list[Branch]):
        """A batch of `rows` that start from their prompts: a new cache holding their prompts' keys and values (the
        prefilled tensors are only read, so later batches can start from them too), with the prompts' logits."""
        index = torch.tensor([b.question for b in rows], device=prompt_mask.device)
        cache = DynamicCache(config=self.model.config)
        for layer, (keys, values) in enumerate(prompt_kv):
            cache.update(keys[index], values[index], layer)
        return cache, prompt_mask[index], prompt_logits[index]

    @staticmethod
    def _join(cache, mask, logits, prompt_kv, prompt_mask, prompt_logits, rows: list[Branch]):
        """Append `rows`, which start from their prompts, to a running batch (cache updated in place)."""
        index = torch.tensor([b.question for b in rows], device=mask.device)
        pad = mask.shape[1] - prompt_mask.shape[1]
        for layer, (keys, values) in zip(cache.layers, prompt_kv):
            new_keys, new_values = keys[index], values[index]
            if pad:
                zeros = new_keys.new_zeros((*new_keys.shape[:2], pad, new_keys.shape[3]))
                new_keys = torch.cat([zeros, new_keys], dim=2)
                new_values = torch.cat([zeros.to(new_values.dtype), new_values], dim=2)
            layer.keys = torch.cat([layer.keys, new_keys])
            layer.values = torch.cat([layer.values, new_values])
        new_mask = torch.cat([prompt_mask.new_zeros(len(rows), pad), prompt_mask[index]], dim=1)
        return torch.cat([mask, new_mask]), torch.cat([logits, prompt_logits[index]])


def _filtered(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (top-p); the most likely token always stays."""
    if top_p >= 1.0:
        return logits
    ordered, order = logits.sort(dim=-1, descending=True)
    cumulative = ordered.softmax(-1).cumsum(-1)
    drop = cumulative - ordered.softmax(-1) >= top_p
    return logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
