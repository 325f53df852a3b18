"""Softmax-DPO (S-DPO): DPO with J negatives per prompt, on top of TRL's `DPOTrainer`.

With implicit rewards r(y) = β (log π(y|x) − log π_ref(y|x)), chosen y_w and negatives y_1..y_J:

    ℓ = −log σ( −log Σ_j exp( r(y_j) − r(y_w) ) )

For J = 1 this is TRL's sigmoid DPO loss, computed with the same operations, so the two trainers give the same loss
and gradients on the same model and batch (tests/test_alignment.py).

What TRL lacks and this file adds: rows whose `rejected` is a list, tokenised per negative; a collator that
stacks every sequence of the batch, [chosen_1..chosen_B; negatives of row 1; negatives of row 2; ...], so the
policy and the reference each run **one** forward per batch; rows with different numbers of negatives (the missing
ones are masked out of the log-sum-exp, not padded with fake sequences); the per-row loss computed from the
stacked log-probabilities. Everything else — the PEFT reference (adapter disabled, or TRL's frozen "ref" copy of
a trained adapter), the fused LM head, dropout handling, metrics — is TRL's.

Choices where the method file is silent: metrics generalise TRL's — `rewards/rejected` and `logps/rejected`
average over all negatives, `rewards/accuracies` is the share of (row, negative) pairs the chosen item wins,
`rewards/margins` is the chosen reward minus the mean negative reward (all equal TRL's for J = 1). Options of
`DPOConfig` that define other losses (`loss_type` other than sigmoid, `f_divergence_type`, `ld_alpha`,
`use_weighting`) are refused with an error, and so is `precompute_ref_log_probs` (the reference's cache is laid out
for one rejected per row; with LoRA the reference costs no memory anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig, DPOTrainer
from trl.data_utils import common_prefix_length
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import pad, use_adapter

from llmrec.data import PreferenceDataConfig
from llmrec.errors import LLMRecError

from . import StageContext, StageSpec
from .preference_stage import build_preference_datasets, reference_model_kwargs


@dataclass
class SoftmaxDPOConfig(DPOConfig):
    r"""
    Configuration of [`SoftmaxDPOTrainer`]: every field of `trl.DPOConfig`, plus:

        > Parameters that control the loss

        logratio_clamp (`float`, *optional*):
            Clamp each log-ratio log π(y|x) − log π_ref(y|x) to [−c, c] before the loss (the CausalDPO authors use
            10). `None` (default) leaves them as they are, as TRL does.
    """

    logratio_clamp: float | None = field(
        default=None,
        metadata={"help": "Clamp log-ratios to [-c, c] before the loss; None leaves them unclamped "
                  "(TRL's behaviour)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type != ["sigmoid"]:
            raise ValueError(f"softmax DPO generalises the sigmoid loss only; loss_type={self.loss_type} is not "
                             "supported")
        if self.f_divergence_type != "reverse_kl" or self.ld_alpha is not None or self.use_weighting:
            raise ValueError("softmax DPO supports neither f_divergence_type, ld_alpha nor use_weighting")
        if self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs is not supported with several negatives per row")
        if self.logratio_clamp is not None and self.logratio_clamp <= 0:
            raise ValueError("logratio_clamp must be positive")


@dataclass
class DataCollatorForMultiNegativePreference(DataCollatorMixin):
    """Pads [chosen_1..chosen_B; negatives of row 1; ...; negatives of row B] into one right-padded batch.

    Returns `input_ids`, `attention_mask`, `completion_mask` and `negatives_per_row` (shape [B]); with one negative
    per row the batch is exactly TRL's `DataCollatorForPreference` batch. Extra integer columns listed in
    `extra_columns` (such as `environment`) are passed through as tensors of shape [B].
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    extra_columns: tuple[str, ...] = ()
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        sequences, masks = [], []
        for example in examples:
            sequences.append(example["prompt_ids"] + example["chosen_ids"])
            masks.append([0] * len(example["prompt_ids"]) + [1] * len(example["chosen_ids"]))
        for example in examples:
            for rejected in example["rejected_ids"]:
                sequences.append(example["prompt_ids"] + rejected)
                masks.append([0] * len(example["prompt_ids"]) + [1] * len(rejected))
        if self.max_length is not None:
            sequences = [s[: self.max_length] for s in sequences]
            masks = [m[: self.max_length] for m in masks]
        output = {
            "input_ids": pad([torch.tensor(s) for s in sequences], padding_value=self.pad_token_id,
                             padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad([torch.ones(len(s), dtype=torch.long) for s in sequences], padding_value=0,
                                  padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0,
                                   padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "negatives_per_row": torch.tensor([len(e["rejected_ids"]) for e in examples]),
        }
        for column in self.extra_columns:
            output[column] = torch.tensor([e[column] for e in examples])
        return output


@dataclass
class PolicyOutput:
    """Per-sequence log-probabilities of the stacked batch, and the fused-head outputs they came from."""

    logps: torch.Tensor
    outputs: Any


class SoftmaxDPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with J negatives per row and the S-DPO loss."""

    _tag_names = ["trl", "dpo", "softmax-dpo", "llmrec"]
    _extra_columns: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = DataCollatorForMultiNegativePreference(
            pad_token_id=self._tokenizer.pad_token_id,
            max_length=self.args.max_length,
            pad_to_multiple_of=self.args.pad_to_multiple_of,
            extra_columns=self._extra_columns,
        )

    # --- data -----------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset: Dataset, processing_class, args: SoftmaxDPOConfig,
                         dataset_name: str) -> Dataset:
        if "prompt_ids" in dataset.column_names:
            return dataset
        check_preference_rows(dataset, dataset_name)
        eos = self._tokenizer.eos_token

        def tokenize(example):
            prompt_ids = processing_class(text=example["prompt"])["input_ids"]
            full = [
                processing_class(text=example["prompt"] + text + ("" if text.endswith(eos) else eos))["input_ids"]
                for text in [example["chosen"], *example["rejected"]]
            ]
            prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
            return {
                "prompt_ids": prompt_ids[:prompt_len],
                "chosen_ids": full[0][prompt_len:],
                "rejected_ids": [ids[prompt_len:] for ids in full[1:]],
            }

        dataset = dataset.map(tokenize, num_proc=args.dataset_num_proc, desc=f"Tokenizing {dataset_name} dataset")
        if args.max_length is not None:
            dataset = dataset.filter(lambda e: len(e["prompt_ids"]) < args.max_length,
                                     desc=f"Dropping truncated {dataset_name} rows")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", *self._extra_columns]

    # --- loss -----------------------------------------------------------------------------------------------

    def _policy_logps(self, model, model_kwargs: dict, labels: torch.Tensor, seq_len: int) -> PolicyOutput:
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        return PolicyOutput(outputs.log_probs[:, -seq_len:].sum(dim=1), outputs)

    def _reference_logps(self, model_kwargs: dict, labels: torch.Tensor, seq_len: int) -> torch.Tensor:
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    outputs = self.model(**model_kwargs, labels=labels, fused_lm_head=True)
            else:
                outputs = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        return outputs.log_probs[:, -seq_len:].sum(dim=1)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        extra = {"completion_mask", "negatives_per_row", *self._extra_columns}
        model_kwargs = {k: v for k, v in inputs.items() if k not in extra}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        seq_len = completion_mask.size(1) - 1

        policy = self._policy_logps(model, model_kwargs, labels, seq_len)
        reference = self._reference_logps(model_kwargs, labels, seq_len)
        logratios = policy.logps - reference
        if self.args.logratio_clamp is not None:
            logratios = logratios.clamp(-self.args.logratio_clamp, self.args.logratio_clamp)

        counts = inputs["negatives_per_row"]
        rows = counts.numel()
        owner = torch.repeat_interleave(torch.arange(rows, device=counts.device), counts)
        slot = (torch.arange(owner.numel(), device=counts.device)
                - torch.repeat_interleave(counts.cumsum(0) - counts, counts))
        chosen, negatives = logratios[:rows], logratios[rows:]
        # β (r(y_j) − r(y_w)) per (row, negative); absent negatives stay −inf so they drop out of the log-sum-exp
        gaps = torch.full((rows, int(counts.max())), float("-inf"), dtype=logratios.dtype, device=logratios.device)
        gaps = gaps.index_put((owner, slot), self.beta * (negatives - chosen[owner]))
        preference_logits = -torch.logsumexp(gaps, dim=1)
        per_row_loss = -F.logsigmoid(preference_logits)
        loss = self.combine_row_losses(per_row_loss, preference_logits, inputs, policy, mode)

        self._log_preference_metrics(mode, inputs, policy, chosen, negatives, owner, seq_len)
        if return_outputs:
            with torch.no_grad():
                policy.outputs = model(**model_kwargs)
        return (loss, policy.outputs) if return_outputs else loss

    def combine_row_losses(self, per_row_loss, preference_logits, inputs, policy: PolicyOutput, mode: str):
        """The batch loss from the per-row losses: their mean (CausalDPO re-weights them by environment)."""
        return per_row_loss.mean()

    def _log_preference_metrics(self, mode, inputs, policy: PolicyOutput, chosen, negatives, owner, seq_len) -> None:
        gather = self.accelerator.gather_for_metrics
        rows = chosen.numel()
        mask = inputs["completion_mask"][..., 1:].bool()
        outputs = policy.outputs
        self._metrics[mode]["entropy"].append(_masked_mean(gather, outputs.entropy[:, -seq_len:].detach(), mask))
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        mean_logits = outputs.mean_logits[:, -seq_len:]
        self._metrics[mode]["logits/chosen"].append(_masked_mean(gather, mean_logits[:rows], mask[:rows]))
        self._metrics[mode]["logits/rejected"].append(_masked_mean(gather, mean_logits[rows:], mask[rows:]))
        top1 = outputs.is_top1[:, -seq_len:][:rows].float()
        self._metrics[mode]["mean_token_accuracy"].append(_masked_mean(gather, top1, mask[:rows]))
        chosen_rewards = self.beta * chosen.detach()
        rejected_rewards = self.beta * negatives.detach()
        mean_rejected = torch.zeros_like(chosen_rewards).index_add_(0, owner, rejected_rewards) / inputs[
            "negatives_per_row"
        ].to(chosen_rewards.dtype)
        self._metrics[mode]["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        self._metrics[mode]["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        self._metrics[mode]["rewards/accuracies"].append(
            gather((chosen_rewards[owner] > rejected_rewards).float()).mean().item())
        self._metrics[mode]["rewards/margins"].append(gather(chosen_rewards - mean_rejected).mean().item())
        self._metrics[mode]["logps/chosen"].append(gather(policy.logps[:rows].detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(policy.logps[rows:].detach()).mean().item())


def _masked_mean(gather, values: torch.Tensor, mask: torch.Tensor) -> float:
    total = gather((values * mask).sum()).sum()
    count = gather(mask.sum()).sum()
    return (total / count).item() if count > 0 else 0.0


def check_preference_rows(dataset: Dataset, name: str) -> None:
    """Clear errors for rows a multi-negative trainer cannot use."""
    for column in ("prompt", "chosen", "rejected"):
        if column not in dataset.column_names:
            raise LLMRecError(
                f"the {name} dataset has no {column!r} column; preference rows need prompt, chosen and rejected "
                f"(a list of negatives); its columns are {', '.join(dataset.column_names)}.",
                f"{name} dataset",
            )
    for index, (chosen, rejected) in enumerate(zip(dataset["chosen"], dataset["rejected"])):
        if isinstance(rejected, str):
            raise LLMRecError(f"row {index}: 'rejected' must be a list of negatives, got one string.",
                              f"{name} dataset")
        if not rejected:
            raise LLMRecError(f"row {index}: 'rejected' is empty; every row needs at least one negative.",
                              f"{name} dataset")
        if chosen in rejected:
            raise LLMRecError(
                f"row {index}: the chosen item {chosen!r} is also among its rejected items.", f"{name} dataset"
            )


# --- the llmrec stage -----------------------------------------------------------------------------------------


def build_datasets(context: StageContext):
    return build_preference_datasets(context, pairwise=False)


def trainer_kwargs(context: StageContext) -> dict:
    return reference_model_kwargs(context)


SOFTMAX_DPO = StageSpec(
    config_class=SoftmaxDPOConfig,
    trainer_class=SoftmaxDPOTrainer,
    build_datasets=build_datasets,
    description="softmax DPO: the true next item against J negatives in one softmax",
    data_config=PreferenceDataConfig,
    trainer_kwargs=trainer_kwargs,
)
