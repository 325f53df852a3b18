"""The base of llmrec's own adapters (CoRA, EPT, LAMP): a module wrapping a frozen causal LM.

A subclass stores the frozen model under the attribute `frozen_attribute` and lists its own trainable tensors in
`adapter_names`. This base gives every such adapter three things:

* its state dict holds the adapter's tensors only (the frozen weights are dropped on save and not reported missing
  on load), so transformers' `Trainer` writes small checkpoints (`model.safetensors`) and restores them on resume
  with no adapter-specific saving code;
* what `Trainer`, TRL and llmrec's evaluators read from or ask of a model (`config`, `device`, `dtype`, the input
  and output embeddings, model tags, activation checkpointing) goes to the frozen model;
* `adapter_state_dict`, the tensors its `save_pretrained` writes, and the adapter folder itself:
  `write_adapter_folder` (adapter_config.json tagged with `adapter_type`, adapter_model.safetensors, both written
  atomically), `read_adapter_config` and `load_adapter_weights` (which name what is wrong with a folder).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llmrec.errors import LLMRecError
from llmrec.files import atomic_save_file, read_json, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _keep_adapter_tensors(module, state_dict, prefix, local_metadata) -> None:
    keep = {prefix + name for name in module.adapter_names}
    for key in [key for key in state_dict if key.startswith(prefix) and key not in keep]:
        del state_dict[key]


def _frozen_weights_are_not_missing(module, incompatible_keys) -> None:
    # a saved adapter never holds the frozen model, so its weights are never "missing" from one
    names = module.adapter_names
    incompatible_keys.missing_keys[:] = [
        key for key in incompatible_keys.missing_keys if any(key == name or key.endswith("." + name) for name in names)
    ]


class FrozenModelWrapper(nn.Module):
    frozen_attribute = "language_model"
    adapter_type = ""  # the tag of its adapter_config.json, e.g. "CORA"

    def __init__(self):
        super().__init__()
        self.register_state_dict_post_hook(_keep_adapter_tensors)
        self.register_load_state_dict_post_hook(_frozen_weights_are_not_missing)

    @property
    def frozen_model(self) -> nn.Module:
        return getattr(self, self.frozen_attribute)

    @property
    def config(self):
        return self.frozen_model.config

    @property
    def device(self) -> torch.device:
        return self.frozen_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.frozen_model.dtype

    def get_input_embeddings(self):
        return self.frozen_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.frozen_model.get_output_embeddings()

    def add_model_tags(self, tags) -> None:
        self.frozen_model.add_model_tags(tags)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        # the frozen model makes its input embeddings require grad, so checkpointed layers pass gradients on to the
        # adapter's tensors
        self.frozen_model.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.frozen_model.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.frozen_model.is_activation_checkpointing

    def adapter_state_dict(self, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors (from `state_dict` when given, e.g. one gathered under ZeRO-3), on the CPU."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        return {name: state_dict[name].detach().cpu().contiguous() for name in self.adapter_names}

    def write_adapter_folder(self, folder: str | Path, config: dict, state_dict: dict | None = None) -> Path:
        """adapter_config.json (`config` and the base model's name) and adapter_model.safetensors, atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save_file(self.adapter_state_dict(state_dict), folder / WEIGHTS_NAME)
        write_json(folder / CONFIG_NAME,
                   {**config, "base_model_name_or_path": getattr(self.config, "_name_or_path", None)})
        return folder

    @classmethod
    def read_adapter_config(cls, folder: str | Path, config_class: type):
        """The config stored in an adapter folder of this type (a clear error for anything else)."""
        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise LLMRecError(f"not a {cls.adapter_type} adapter folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}).",
                              str(folder))
        stored = read_json(folder / CONFIG_NAME)
        if stored.get("adapter_type") != cls.adapter_type:
            found = stored.get("adapter_type") or stored.get("peft_type")
            raise LLMRecError(f"{CONFIG_NAME} describes a {found} adapter, not {cls.adapter_type}.", str(folder))
        return config_class(**{f.name: stored[f.name] for f in fields(config_class) if f.name in stored})

    def load_adapter_weights(self, folder: str | Path) -> None:
        """Load the adapter's tensors, refusing a folder that lacks some or holds other shapes."""
        weights = load_file(str(Path(folder) / WEIGHTS_NAME))
        missing = set(self.adapter_names) - set(weights)
        if missing:
            raise LLMRecError(f"the {self.adapter_type} weights lack {len(missing)} tensors "
                              f"(e.g. {sorted(missing)[0]}); the adapter was saved for another model or "
                              "configuration.", str(folder))
        mine = self.state_dict()
        for name in self.adapter_names:
            if weights[name].shape != mine[name].shape:
                raise LLMRecError(f"{name} has shape {tuple(weights[name].shape)} in the saved adapter but "
                                  f"{tuple(mine[name].shape)} here; the adapter was saved for another base model.",
                                  str(folder))
        self.load_state_dict({name: weights[name] for name in self.adapter_names}, strict=False)
