"""The vLLM rollout backend: the same tree, grown by continuation requests.

vLLM decodes whole requests, so the tree grows in rounds: every live branch is one request (prompt + the branch's
tokens so far) for at most `chunk_tokens` more tokens with the top-K log-probabilities of each. The `TreeBuilder`
then reads each returned token in order, exactly as the transformers backend reports them; a fork becomes a new
request next round (prompt + shared prefix + the forced alternative token), and a branch that stopped mid-chunk is
cut there. Prefix caching (on by default in vLLM's V1 engine) serves the shared prompt and prefixes from cache, so
they are not recomputed; the tokens a stopped branch decoded past its stop point, at most one chunk, are the price
of not steering vLLM token by token, and are counted in `decoded_tokens`.

Engines: a `vllm.LLM` (TRL's colocate mode: `trainer.vllm_generation.llm`, which also runs on vLLM's CPU build) or
TRL's `VLLMClient` (server mode: `trainer.vllm_generation.vllm_client`). Each request carries its own seed, except
on the CPU build, whose generators cannot be rewound as vLLM does for a request whose prefill spans engine steps;
there the rollouts follow the engine's seed (`LLM(seed=...)`, TRL sets it), so a run repeats as a whole. With TRL's
engines the returned log-probabilities are "processed" (after temperature), which is what the signals use in both
backends.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .tree import Branch, TreeBuilder, TreeConfig, token_signals
from .types import QuestionRollout, SamplingConfig, completions_of

# one returned request: (token ids, per token the (token id, log-probability) pairs, most likely first)
Continuation = tuple[list[int], list[list[tuple[int, float]]]]


class VLLMRollout:
    """`generate(prompts, n_leaves, tree, sampling, seed)` on a vLLM engine (colocated `LLM` or a server client)."""

    def __init__(self, engine, eos_token_ids: list[int], chunk_tokens: int = 32):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
        self.engine, self.eos_token_ids, self.chunk_tokens = engine, set(eos_token_ids), chunk_tokens

    def generate(self, prompts: list[list[int]], n_leaves: int, tree: TreeConfig, sampling: SamplingConfig,
                 seed: int) -> list[QuestionRollout]:
        builder = TreeBuilder(tree, n_leaves, len(prompts), sampling.max_new_tokens, self.eos_token_ids)
        roots = [builder.new_branch(q, "tree") for q in range(len(prompts)) for _ in range(builder.roots(q))]
        self._grow(builder, roots, prompts, sampling, tree, seed)
        return [QuestionRollout(completions_of(builder.leaves(q)), builder.stats[q]) for q in range(len(prompts))]

    def _grow(self, builder: TreeBuilder, branches: list[Branch], prompts, sampling, tree: TreeConfig, seed: int):
        round_ = 0
        while True:
            branches = branches + builder.spawn_fills(branches)  # fills join the next round once they are due
            if not branches:
                return
            requests = [prompts[b.question] + b.token_ids for b in branches]
            budgets = [min(self.chunk_tokens, sampling.max_new_tokens - len(b.token_ids)) for b in branches]
            seeds = [seed * 1_000_003 + round_ * 10_007 + b.id for b in branches]
            outputs = self.complete(requests, budgets, seeds, sampling, tree.top_k)
            following: list[Branch] = []
            for branch, (token_ids, tops) in zip(branches, outputs):
                for position, (token, top) in enumerate(zip(token_ids, tops)):
                    logprobs = torch.tensor([[lp for _, lp in top]])
                    entropy, confidence = token_signals(logprobs, tree.top_k, tree.confidence_k)
                    sampled = dict(top).get(token, float("nan"))
                    decision = builder.observe(branch, token, sampled, float(entropy[0]), float(confidence[0]),
                                               top if tree.branching else [])
                    following += [builder.branches[i] for i in decision.alternatives
                                  if builder.branches[i].state == "active"]
                    if decision.stop is not None:
                        builder.stats[branch.question].decoded_tokens += len(token_ids) - position - 1
                        break
                if branch.state == "active":
                    following.append(branch)
            branches = following
            round_ += 1

    def complete(self, requests: list[list[int]], budgets: list[int], seeds: list[int], sampling: SamplingConfig,
                 top_k: int) -> list[Continuation]:
        """One round of continuation requests on the engine."""
        if hasattr(self.engine, "vllm_client") or type(self.engine).__name__ == "VLLMClient":
            return self._complete_server(getattr(self.engine, "vllm_client", self.engine), requests, budgets, seeds,
                                         sampling, top_k)
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM rewinds a seeded request's generator when its prefill is split over engine steps, which CPU
            # generators cannot do ("CPU Generator does not use offset"): there the engine's own seed draws
            seeds = [None] * len(seeds)
        params = [SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=budget,
                                 logprobs=top_k, seed=s, stop_token_ids=sorted(self.eos_token_ids))
                  for budget, s in zip(budgets, seeds)]
        outputs = self.engine.generate([TokensPrompt(prompt_token_ids=r) for r in requests], params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            tops = [sorted(((tok, lp.logprob) for tok, lp in step.items()), key=lambda x: -x[1])
                    for step in completion.logprobs]
            results.append((list(completion.token_ids), tops))
        return results

    def _complete_server(self, client, requests, budgets, seeds, sampling, top_k) -> list[Continuation]:
        # the server takes one max_tokens per call, so requests are grouped by their remaining budget
        groups: dict[int, list[int]] = defaultdict(list)
        for index, budget in enumerate(budgets):
            groups[budget].append(index)
        results: list[Continuation | None] = [None] * len(requests)
        for budget, indices in groups.items():
            out = client.generate(prompts=[requests[i] for i in indices], n=1, temperature=sampling.temperature,
                                  top_p=sampling.top_p, max_tokens=budget, logprobs=top_k,
                                  generation_kwargs={"seed": seeds[indices[0]],
                                                     "stop_token_ids": sorted(self.eos_token_ids)})
            for row, index in enumerate(indices):
                tops = [sorted(zip(ids, lps), key=lambda x: -x[1])
                        for ids, lps in zip(out["logprob_token_ids"][row], out["logprobs"][row])]
                results[index] = (list(out["completion_ids"][row]), tops)
        return results
