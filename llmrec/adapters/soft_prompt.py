"""What the prompt-tuning adapters (EPT/DePT, LAMP) share: a frozen causal LM fed [soft prompt ; input].

A subclass says how its prompt is built (`prompt()`, a `(num_virtual_tokens, d)` float32 matrix computed from its
trainable factors) and, for EPT, how the input tokens are embedded (`embed`, which adds DePT's position offsets).
This module does the rest, the same way for both methods:

* `forward(input_ids, attention_mask, labels, ...)` prepends the prompt, extends the attention mask with ones and
  the labels with -100, and returns the logits (and hidden states) of the caller's positions only, so code that
  aligns logits with its own labels keeps working. The loss is the base model's over the caller's labels: the last
  prompt position predicts nothing, exactly as position -1 predicts nothing in the plain model.
* Position ids come from the attention mask (cumsum − 1, as `generate` makes them) when the caller gives none, so a
  left-padded row scores like the same row unpadded. Stock PEFT prompt tuning ignores position ids and counts the
  padding, so the two agree on unpadded and right-padded batches, which is what the export is checked on.
* `base_model` is the prompt-aware backbone (hidden states of the caller's positions), following transformers'
  convention that `model.base_model` returns hidden states: TRL's fused LM head (`SFTTrainer`) calls it and then
  projects through `get_output_embeddings()`. `config`, `generation_config`, `add_model_tags`,
  `activation_checkpointing_enable` are the base model's.
* `generate()` runs the base model's `generate` on [prompt ; E(x)] embeddings together with the caller's
  `input_ids`, so the returned sequences, `prompt_length` slicing and logits processors see the caller's tokens as
  with any model; `_generation_hooks` lets EPT embed each generated token with its offset.
* The state dict of the wrapper holds the adapter's parameters only (`FrozenModelWrapper`), so transformers'
  `Trainer` writes small checkpoints (`model.safetensors`) and restores them on resume without touching the base
  weights.
* `parameter_groups(lr)` / `optimizer_cls_and_kwargs(args)`: the optimizer groups with each group's learning rate
  (DePT trains the prompt and the low-rank factors at different rates). Pass the second to any transformers/TRL
  trainer: `SFTTrainer(model, args, ..., optimizer_cls_and_kwargs=model.optimizer_cls_and_kwargs(args))`; the
  trainer then builds its usual optimizer (`args.optim`, betas, eps) over these groups, and its scheduler scales
  every group's rate by the same factor.
* `save_pretrained` / `from_pretrained` (adapter_config.json with `adapter_type`, adapter_model.safetensors, both
  written atomically) and `to_peft_prompt_tuning`, the export of the final prompt as a stock PEFT adapter.

Packed or padding-free batches (one row holding several sequences) are refused: each sequence needs its own prompt.
SFTConfig's defaults (`packing=False`, `padding_free=False`) are what these adapters need.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path

import torch
from torch import nn

from llmrec.errors import LLMRecError
from llmrec.files import atomic_save_file

from .wrapper import WEIGHTS_NAME, FrozenModelWrapper

FROZEN = "language_model."


def sample_vocabulary(embeddings: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` rows of the embedding table (float32, CPU), distinct while the vocabulary allows it."""
    vocab = embeddings.shape[0]
    if count <= vocab:
        ids = torch.randperm(vocab, generator=generator)[:count]
    else:
        ids = torch.randint(vocab, (count,), generator=generator)
    return embeddings.detach()[ids.to(embeddings.device)].float().cpu()


def _is_packed(position_ids: torch.Tensor) -> bool:
    return bool((position_ids[..., 1:] <= position_ids[..., :-1]).any())


class SoftPromptModel(FrozenModelWrapper, abc.ABC):
    """A frozen causal LM with a trainable prompt prepended to every input."""

    adapter_type = ""
    config_class: type = object

    def __init__(self, language_model: nn.Module, config):
        super().__init__()
        self.language_model = language_model
        self.prompt_config = config
        for parameter in language_model.parameters():
            parameter.requires_grad_(False)

    # --- what a subclass provides ----------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def num_virtual_tokens(self) -> int:
        """Length of the prompt the frozen model sees."""

    @abc.abstractmethod
    def prompt(self) -> torch.Tensor:
        """The prompt, (num_virtual_tokens, d) in float32."""

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, positions: torch.Tensor):
        """Embeddings of the caller's tokens; `positions` index the tokens of each sequence from 0."""
        return inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)

    def check_positions(self, last_position: int) -> None:
        """Refuse inputs the adapter cannot embed (EPT: longer than its offset table)."""

    def parameter_group(self, name: str) -> str:
        """The optimizer group of trainable parameter `name`."""
        return "prompt"

    def group_learning_rates(self) -> dict[str, float | None]:
        """Learning rate per group; None takes the trainer's."""
        return {}

    def export_refusal(self) -> LLMRecError | None:
        """Why the trained prompt cannot become a stock PEFT prompt-tuning adapter, or None when it can."""
        return None

    @contextlib.contextmanager
    def _generation_hooks(self):
        yield

    # --- what transformers' Trainer, TRL and llmrec's evaluators look for on a model -----------------------------

    @property
    def generation_config(self):
        return self.language_model.generation_config

    @property
    def base_model(self):
        """The prompt-aware backbone: `base_model(input_ids=..., attention_mask=...)` returns the hidden states of
        the caller's positions (what TRL's fused LM head projects through `get_output_embeddings()`)."""
        return self._backbone

    @property
    def hidden_size(self) -> int:
        return self.get_input_embeddings().weight.shape[1]

    @property
    def adapter_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters() if not name.startswith(FROZEN)]

    # --- the extended input ----------------------------------------------------------------------------------------

    def _extend(self, input_ids, attention_mask, position_ids, inputs_embeds):
        """[prompt ; input] embeddings, attention mask (None stays None) and position ids (None: the model's own).
        The input is checked (packing, length) before anything is embedded."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        tokens = input_ids if input_ids is not None else inputs_embeds[..., 0]
        batch, length = tokens.shape[:2]
        if attention_mask is None and position_ids is not None and _is_packed(position_ids):
            raise LLMRecError(
                "a soft prompt needs one prompt per sequence, so packed or padding-free batches (several sequences "
                "in one row) are not supported; set packing: false and padding_free: false in the stage's args.",
                f"adapter.method ({self.adapter_type.lower()})",
            )
        if position_ids is not None:
            positions = position_ids
        elif attention_mask is not None:
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        else:
            positions = torch.arange(length, device=tokens.device).expand(batch, -1)
        if length:
            attended = positions if attention_mask is None else positions.masked_fill(attention_mask == 0, 0)
            self.check_positions(int(attended.max()))

        embeds = self.embed(input_ids, inputs_embeds, positions)
        p = self.num_virtual_tokens
        prompt = self.prompt().to(device=embeds.device, dtype=embeds.dtype).expand(batch, -1, -1)
        embeds = torch.cat([prompt, embeds], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, p), attention_mask], dim=1)
        if position_ids is not None:
            prefix = torch.arange(p, device=position_ids.device, dtype=position_ids.dtype).expand(batch, -1)
            position_ids = torch.cat([prefix, position_ids + p], dim=1)
        elif attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        return embeds, attention_mask, position_ids

    @staticmethod
    def _refuse_cache(kwargs: dict) -> None:
        for key in ("cache", "past_key_values"):
            cache = kwargs.get(key)
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("a prompt-tuned model takes whole sequences; continue a sequence through generate()")

    def _cut(self, states, length: int):
        return None if states is None else tuple(state[:, -length:] for state in states)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                logits_to_keep=0, **kwargs):
        self._refuse_cache(kwargs)
        embeds, mask, positions = self._extend(input_ids, attention_mask, position_ids, inputs_embeds)
        length = embeds.shape[1] - self.num_virtual_tokens
        if labels is not None:
            # -100 for the prompt, and for the first input token: in the plain model nothing predicts it either
            labels = torch.cat(
                [labels.new_full((labels.shape[0], self.num_virtual_tokens + 1), -100), labels[:, 1:]], 1
            )
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = logits_to_keep + self.num_virtual_tokens
        outputs = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels,
                                      logits_to_keep=logits_to_keep, **kwargs)
        if outputs.logits.shape[1] > length:
            outputs.logits = outputs.logits[:, -length:]
        if getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = self._cut(outputs.hidden_states, length)
        return outputs

    def _backbone(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        self._refuse_cache(kwargs)
        embeds, mask, positions = self._extend(input_ids, attention_mask, position_ids, inputs_embeds)
        length = embeds.shape[1] - self.num_virtual_tokens
        outputs = self.language_model.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                                 **kwargs)
        outputs.last_hidden_state = outputs.last_hidden_state[:, -length:]
        if getattr(outputs, "hidden_states", None) is not None:
            outputs.hidden_states = self._cut(outputs.hidden_states, length)
        return outputs

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        """The base model's `generate` with the prompt in front; returns the caller's ids followed by the new ones,
        and accepts every generation argument (beam search, logits processors, ...). Needs the KV cache."""
        input_ids = input_ids if input_ids is not None else kwargs.pop("inputs", None)
        if input_ids is None:
            raise ValueError("generate() of a prompt-tuned model needs input_ids")
        if kwargs.get("use_cache") is False:
            raise ValueError("generate() of a prompt-tuned model needs the KV cache (use_cache=True)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds, mask, positions = self._extend(input_ids, attention_mask, position_ids, None)
        if position_ids is not None:
            kwargs["position_ids"] = positions
        with self._generation_hooks():
            return self.language_model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=mask,
                                                **kwargs)

    # --- optimizer groups --------------------------------------------------------------------------------------------

    def parameter_groups(self, learning_rate: float, weight_decay: float = 0.0) -> list[dict]:
        """Torch optimizer groups of the trainable parameters, each with its learning rate (the group's own, or
        `learning_rate`) and a `name`."""
        rates = self.group_learning_rates()
        groups: dict[str, list[nn.Parameter]] = {}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad and not name.startswith(FROZEN):
                groups.setdefault(self.parameter_group(name), []).append(parameter)
        return [
            {"params": params, "lr": rates.get(group) or learning_rate, "weight_decay": weight_decay, "name": group}
            for group, params in groups.items()
        ]

    def optimizer_cls_and_kwargs(self, args) -> tuple[type, dict]:
        """`Trainer(optimizer_cls_and_kwargs=...)` for training arguments `args`: the optimizer `args.optim` names,
        with its usual arguments, over `parameter_groups`."""
        from transformers import Trainer

        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, self)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)) or (
            {"params", "model", "optimizer_dict"} & set(kwargs)
        ):
            raise LLMRecError(
                f"optim {args.optim!r} builds its own parameter groups, so it cannot give the prompt and the other "
                "factors their own learning rates; use a standard optimizer such as adamw_torch.",
                "optim",
            )
        return optimizer_cls, {**kwargs, "params": self.parameter_groups(args.learning_rate, args.weight_decay)}

    # --- save, load, export ----------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> None:
        """adapter_config.json and adapter_model.safetensors (every trainable tensor), each written atomically."""
        self.write_adapter_folder(folder, self.prompt_config.to_dict(), state_dict)

    @classmethod
    def from_pretrained(cls, language_model: nn.Module, folder: str | Path, trainable: bool = False):
        model = cls(language_model, cls.read_adapter_config(folder, cls.config_class))
        model.load_adapter_weights(folder)
        model.train(trainable)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable and not name.startswith(FROZEN))
        return model

    @torch.no_grad()
    def to_peft_prompt_tuning(self, folder: str | Path) -> Path:
        """Write the final prompt as a stock PEFT prompt-tuning adapter (`PeftModel.from_pretrained` loads it with
        the same outputs; vLLM loads no prompt-tuning adapter, but takes the prompt as input embeddings)."""
        from peft import PromptTuningConfig

        refusal = self.export_refusal()
        if refusal is not None:
            raise refusal
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual_tokens, token_dim=self.hidden_size,
            num_transformer_submodules=1, base_model_name_or_path=getattr(self.config, "_name_or_path", None),
        )
        config.save_pretrained(str(folder))
        # PEFT keeps a prompt-learning adapter's prompt under this one key (its prompt encoder's embedding weight)
        atomic_save_file({"prompt_embeddings": self.prompt().float().cpu().contiguous()}, folder / WEIGHTS_NAME)
        return folder


class SoftPromptAdapter:
    """The registry object of a prompt-tuning method: config class, attach, load, save."""

    model_class: type[SoftPromptModel] = SoftPromptModel

    @property
    def config_class(self) -> type:
        return self.model_class.config_class

    def attach(self, model, args: dict, context=None):
        return self.model_class(model, self.config_class(**args))

    def load(self, model, path: Path, trainable: bool = False):
        return self.model_class.from_pretrained(model, path, trainable)

    def save(self, model, path: Path) -> None:
        model.save_pretrained(path)
