"""FedLoRA: LoRA with the direction/magnitude parametrisation of FedLoRA-Optimizer (Zhao et al., arXiv 2510.11274;
`shared/methods/fedlora.md`). For each target linear layer W0 ∈ R^{d_out × d_in}:

    A  = diag(a_M) · A_D     A_D ∈ R^{r × d_in} with unit-norm rows,      a_M ∈ R^r
    B  = diag(b_M) · B_D     B_D ∈ R^{d_out × r} with unit-norm rows,     b_M ∈ R^{d_out}
    ΔW = (α / r) · B A,      h = W0 x + ΔW dropout(x)

The directions are stored unnormalised and normalised in every forward pass (row / max(‖row‖, eps)). In federated
training A_D, a_M and B_D are shared with the server, while b_M, which the paper finds to carry each client's
personal knowledge, stays on the client (the rule `fedlora_opt` of `llmrec.federated.rules` says so).

Initialisation (our choice; the paper does not give one):
* A_D: rows drawn like PEFT's lora_A (Kaiming-uniform, a = √5), which the forward then normalises;
* a_M = `init_a_magnitude` (0): ΔW = 0 at step 0, so the adapted model starts as the base model;
* B_D: standard-normal rows (their norm is irrelevant);
* b_M = `init_b_magnitude` (1).
With `init_offset` (a variant for the comparison of initialisations): a_M = the norms of A_D's drawn rows, so A
starts as PEFT's lora_A, and the layers subtract the initial increment (α / r) B₀A₀ (`FedLoRALinear`), so the model
still starts as the base model while every tensor has a gradient from the first step. The initial factors are the
same on every client (drawn under the run seed), saved beside the adapter (`initial_factors.safetensors`), and the
export materialises the whole change as one LoRA of rank 2r: lora_A = [A; A₀], lora_B = [B, −B₀].
PEFT starts LoRA from B = 0 instead. Here that would mean b_M = 0, and since the server never receives b_M, its
global model would keep b_M = 0, hence B = 0 and ΔW = 0: the global model would stay the base model whatever the
clients learn. With A = 0 and b_M = 1, only a_M has a gradient at the first step (A_D's is scaled by a_M = 0, B_D's
and b_M's by A x = 0); once a_M ≠ 0 every tensor trains.

Written by hand rather than as a PEFT tuner: PEFT's LoRA has no direction/magnitude split of A and B. Its DoRA
splits the merged weight W0 + BA into a magnitude vector and a direction normalised over columns, a different
quantity from unit rows of A and B, and it cannot keep a part of B local.

Export: the materialised A and B are a plain LoRA adapter with the same scaling α / r, so `to_peft_lora` writes
lora_A = A and lora_B = B in PEFT's format, which stock `PeftModel.from_pretrained` and vLLM load with the same
outputs.

The frozen model is the wrapper's `language_model`, not `base_model`: by transformers' convention `base_model` is the
backbone returning hidden states, and TRL's `SFTTrainer` (its fused LM head) calls `model.base_model(...)` and
projects through `get_output_embeddings()`. The FedLoRA layers sit inside the frozen model, so the backbone, the
forward and `generate` all see them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llmrec.files import atomic_save_file

from ..targets import replace_targets
from ..wrapper import WEIGHTS_NAME, FrozenModelWrapper
from .config import FedLoRAConfig
from .layer import PARAMETERS, FedLoRALinear

INITIAL_FACTORS = "initial_factors.safetensors"


class FedLoRAModel(FrozenModelWrapper):
    """A frozen causal LM whose target linear layers are `FedLoRALinear`; only their four tensors train."""

    adapter_type = "FEDLORA"

    def __init__(self, language_model: nn.Module, config: FedLoRAConfig):
        super().__init__()
        if any(isinstance(module, FedLoRALinear) for module in language_model.modules()):
            raise ValueError("this model already has FedLoRA layers; attach the adapter to a fresh base model")
        self.language_model, self.fedlora_config = language_model, config
        self.target_names, self.fedlora_layers = replace_targets(
            language_model, config.target_modules,
            lambda linear: FedLoRALinear(linear, config.r, config.scaling, config.lora_dropout,
                                         config.init_a_magnitude, config.init_b_magnitude, config.eps,
                                         config.init_offset),
        )
        self.adapter_names = [name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in PARAMETERS]

    # --- what transformers' Trainer, TRL and llmrec's evaluators look for on a model -----------------------------

    @property
    def base_model(self) -> nn.Module:
        """The frozen model's backbone (hidden states) with the FedLoRA layers in it: what TRL's fused LM head
        calls."""
        return self.language_model.base_model

    @property
    def generation_config(self):
        return self.language_model.generation_config

    def forward(self, *args, **kwargs):
        return self.language_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.language_model.generate(*args, **kwargs)

    # --- the materialised increments -----------------------------------------------------------------------------

    @torch.no_grad()
    def materialised_lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) of every target, keyed by its module name in the frozen model (e.g.
        'model.layers.0.self_attn.q_proj'); ΔW = (α / r) · B A."""
        return {name: (layer.lora_A(), layer.lora_B()) for name, layer in zip(self.target_names, self.fedlora_layers)}

    # --- save, load, export --------------------------------------------------------------------------------------

    def initial_factors(self) -> dict[str, torch.Tensor]:
        """With `init_offset`, the initial A₀ and B₀ of every layer, keyed by module name (empty otherwise)."""
        if not self.fedlora_config.init_offset:
            return {}
        return {f"{name}.{which}": getattr(layer, which).detach().float().cpu().contiguous()
                for name, layer in zip(self.target_names, self.fedlora_layers) for which in ("initial_A", "initial_B")}

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> None:
        """adapter_config.json and adapter_model.safetensors (the four tensors of every layer), written atomically;
        with `init_offset`, the initial factors in initial_factors.safetensors."""
        self.write_adapter_folder(folder, self.fedlora_config.to_dict(), state_dict)
        if self.fedlora_config.init_offset:
            atomic_save_file(self.initial_factors(), Path(folder) / INITIAL_FACTORS)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, folder: str | Path, trainable: bool = False) -> FedLoRAModel:
        model = cls(base_model, cls.read_adapter_config(folder, FedLoRAConfig))
        if model.fedlora_config.init_offset:
            from safetensors.torch import load_file

            factors = load_file(str(Path(folder) / INITIAL_FACTORS))
            for name, layer in zip(model.target_names, model.fedlora_layers):
                for which in ("initial_A", "initial_B"):
                    getattr(layer, which).copy_(factors[f"{name}.{which}"])
        model.load_adapter_weights(folder)
        model.train(trainable)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable and name in model.adapter_names)
        return model

    @torch.no_grad()
    def to_peft_lora(self, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
        """Write the materialised A and B as a stock PEFT LoRA adapter (same r, α and so the same scaling): lora_A = A,
        lora_B = B, which `PeftModel.from_pretrained` and vLLM load with this model's outputs. With `init_offset`,
        the rank is 2r (lora_A = [A; A₀], lora_B = [B, −B₀], α doubled to keep α / r): the same outputs again."""
        from peft import LoraConfig

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        widen = 2 if self.fedlora_config.init_offset else 1
        config = LoraConfig(
            r=widen * self.fedlora_config.r, lora_alpha=widen * self.fedlora_config.lora_alpha,
            lora_dropout=self.fedlora_config.lora_dropout, bias="none", task_type="CAUSAL_LM",
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in self.target_names}),
            base_model_name_or_path=base_model_name_or_path or getattr(self.config, "_name_or_path", None),
        )
        config.save_pretrained(str(folder))
        tensors = {}
        for (name, (A, B)), layer in zip(self.materialised_lora().items(), self.fedlora_layers):
            if widen == 2:
                A, B = torch.cat([A, layer.initial_A]), torch.cat([B, -layer.initial_B], dim=1)
            # PEFT's saved key: `base_model.model.<module>.lora_{A,B}.weight`, without the adapter name
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.float().cpu().contiguous()
        atomic_save_file(tensors, folder / WEIGHTS_NAME)
        return folder


class FedLoRAAdapter:
    """`adapter.method: fedlora` (the registry object: config class, attach, load, save)."""

    config_class = FedLoRAConfig

    def attach(self, model, args: dict, context=None):
        return FedLoRAModel(model, FedLoRAConfig(**args))

    def load(self, model, path: Path, trainable: bool = False):
        return FedLoRAModel.from_pretrained(model, path, trainable)

    def save(self, model, path: Path) -> None:
        model.save_pretrained(path)


FEDLORA = FedLoRAAdapter()
