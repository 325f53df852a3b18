"""The base of llmrec's own adapters (CoRA, EPT, LAMP): a module wrapping a frozen causal LM.

A subclass stores the frozen model under the attribute `frozen_attribute` and lists its own trainable tensors in
`adapter_names`. This base gives every such adapter three things:

* its state dict holds the adapter's tensors only (the frozen weights are dropped on save and not reported missing
  on load), so transformers' `Trainer` writes small checkpoints (`model.safetensors`) and restores them on resume
  with no adapter-specific saving code;
* what `Trainer`, TRL and llmrec's evaluators read from a model (`config`, `device`, `dtype`, the input
  embeddings) comes from the frozen model;
* `adapter_state_dict`, the tensors its `save_pretrained` writes.
"""

from __future__ import annotations

import torch
from torch import nn


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

    def adapter_state_dict(self, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors (from `state_dict` when given, e.g. one gathered under ZeRO-3), on the CPU."""
        state_dict = state_dict if state_dict is not None else self.state_dict()
        return {name: state_dict[name].detach().cpu().contiguous() for name in self.adapter_names}
