"""Which linear layers an adapter with layers of its own (CoRA, FedLoRA) wraps, and swapping them in.

`target_modules` is 'all-linear' (every linear layer but the output head), a preset of `TARGET_PRESETS`, or a list
of module names such as ['q_proj', 'v_proj'], as in PEFT.
"""

from __future__ import annotations

from torch import nn

from llmrec.errors import LLMRecError

# Module-name presets for `target_modules` (the names of Llama/Qwen2/Mistral decoder projections).
TARGET_PRESETS = {
    "qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Dotted names of the linear layers `target_modules` names (the output head is never one)."""
    head = model.get_output_embeddings()
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head]
    if target_modules == "all-linear":
        return [name for name, _ in linears]
    wanted = TARGET_PRESETS.get(target_modules, target_modules) if isinstance(target_modules, str) else target_modules
    found = [name for name, _ in linears if name.rsplit(".", 1)[-1] in wanted]
    missing = [w for w in wanted if not any(name.rsplit(".", 1)[-1] == w for name in found)]
    if missing:
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in linears})
        raise LLMRecError(
            f"no linear layer is named {missing[0]!r} in this model; its linear layers are named {', '.join(names)}.",
            "adapter.args.target_modules",
        )
    return found


def replace_targets(model: nn.Module, target_modules: str | list[str],
                    make_layer) -> tuple[list[str], list[nn.Module]]:
    """Freeze `model` and put `make_layer(linear)` in place of each target linear layer, on that layer's device:
    (the targets' dotted names, the new layers)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    names, layers = find_targets(model, target_modules), []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        layer = make_layer(linear).to(linear.weight.device)
        setattr(parent, child, layer)
        layers.append(layer)
    return names, layers
