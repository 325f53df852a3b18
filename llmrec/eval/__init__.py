"""Evaluation: the `eval` recipe section, and the measures and evaluators that tasks (`llmrec.tasks`) use.

- `metrics`: HR@K, NDCG@K, over-recommendation, AUC and UAUC; `keys`: how metrics.json names every value;
- `ranking` + `trie`: whole-catalog ranking by constrained beam search, the valid-item ratio, popularity and random
  baselines;
- `ctr`: p(Yes) scoring and AUC/UAUC/log-loss of like prediction, the CF-model baseline;
- `classification`: label-word prediction, accuracy, the majority class;
- `reasoning`: sampled solutions and mean@n / maj@n / pass@n;
- `judges` + `preference_summary`: preference judges (rule, transformers, endpoint) and judge accuracy;
- `instructions`: exact match, ROUGE-L and completion loss of greedy responses;
- `plots`: curves.png (training loss, then each task's panels).

Evaluators take models, tokenizers and plain rows; what a split's rows are is the task's business.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from llmrec.schema import Section


class EvalConfig(Section):
    """`eval`: how the trained model is evaluated at the end of a run (and by `llmrec eval`)."""

    task: str = Field(
        "ranking",
        description="What the run trains and measures, a task of llmrec.tasks.TASKS: 'ranking': next-item ranking "
        "over the catalog; 'ctr': Yes/No like prediction (needs data.ctr); 'classification': accuracy by label-word "
        "scoring (needs data.classification; splits test and valid); 'reasoning': mean and majority-vote accuracy of "
        "sampled solutions (needs data.reasoning); 'preference_summary': judge accuracy given the model's user "
        "summaries (needs data.summaries); 'instructions': exact match, ROUGE-L and loss of greedy responses (needs "
        "data.instructions; split test).",
    )
    splits: list[Literal["test", "valid", "ood_popularity", "ood_temporal", "ood_environment", "train"]] = Field(
        default_factory=lambda: ["test"], min_length=1,
        description="What to evaluate on (ood_<kind> needs that shift; 'train', the training users, only where the "
        "task has it, to see whether the model fits its training data at all).",
    )
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20], min_length=1,
                          description="Cut-offs for HR@K and NDCG@K.")
    num_beams: int | None = Field(None, ge=1, description="Beams (= items returned); default max(ks).")
    batch_size: int = Field(8, ge=1, description="Prompts per beam-search (or CTR / classification scoring) batch.")
    max_targets: int | None = Field(None, ge=1, description="Rank a seeded sample of this many targets (None: all).")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers",
        description="ranking: what runs the constrained beam search: 'transformers' (the trained model in this "
        "process) or 'vllm' (a vLLM engine on the run's final/ adapter, llmrec.eval.vllm_ranking: the same ranking, "
        "needs vLLM installed and one process).",
    )
    exclude_history: bool = Field(True, description="Never recommend items the user already interacted with.")
    baselines: list[Literal["popularity", "random", "bpr_mf", "sasrec"]] = Field(
        default_factory=lambda: ["popularity", "random"],
        description="ranking: the rankers measured beside the model on the same targets: popularity, random, "
        "bpr_mf (matrix factorisation trained with BPR on the train split) and sasrec (SASRec on the users' "
        "training sequences); the last two train once per run, on the CPU.",
    )
    baseline_args: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="ranking: settings of the trained baselines, by name: bpr_mf takes llmrec.cf.CFConfig's keys "
        "(its positives default to all), sasrec llmrec.cf.SASRecConfig's (dim, num_layers, epochs, ...).",
    )
    samples: int = Field(16, ge=1, description="reasoning: solutions sampled per question (mean@n, maj@n, pass@n).")
    temperature: float = Field(0.8, gt=0, description="reasoning: sampling temperature of those solutions.")
    max_new_tokens: int = Field(64, ge=1, description="reasoning: longest solution sampled.")
    valid_item_samples: int = Field(
        100, ge=0, description="Targets used to measure the valid-item ratio of unconstrained generation (0: skip)."
    )

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if any(k < 1 for k in self.ks):
            raise ValueError("every K in ks must be at least 1")
        if self.engine == "vllm" and self.task != "ranking":
            raise ValueError(f"engine 'vllm' ranks items; eval.task {self.task!r} is evaluated with transformers")
        if self.num_beams is not None and self.num_beams < max(self.ks):
            raise ValueError(f"num_beams ({self.num_beams}) must be at least max(ks) ({max(self.ks)})")
        return self

    @property
    def beams(self) -> int:
        return self.num_beams or max(self.ks)
