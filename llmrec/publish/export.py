"""`llmrec export`: a finished run's adapter in a stock PEFT format that `PeftModel.from_pretrained` and vLLM load
without llmrec.

`--to peft-prompt-tuning`: an EPT or LAMP run's final prompt as a PEFT prompt-tuning adapter (exact for LAMP and
for EPT/DePT without position offsets; refused, with the reason, otherwise).

A LoRA run's final adapter already is one and is copied; a FedLoRA run's A and B are materialised. A federated
run's final/ (the global adapter) already is one; `--client K` exports client K's personal adapter (the global
tensors and the tensors its rule kept on the client). A CoRA run's weights depend on the user (and item), so the
export materialises them for one user (`conditioning: user`) or one user–item pair: lora_A = A(u, i) and
lora_B = (α / r) · tanh(g) · B with scaling 1, which gives the same logits as the CoRA model for that input.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir
from llmrec.logs import get_logger

logger = get_logger(__name__)


def _finished_run(run_dir: str | Path, out: str | Path):
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    run = RunDir(run_dir)
    run.require(final=True)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LLMRecError("the output folder exists and is not empty; choose a new one.", str(out))
    return run, load_recipe(run.recipe_file, instantiate=False), out


def export_peft_prompt_tuning(run_dir: str | Path, out: str | Path) -> Path:
    from llmrec.rundir import load_trained

    run, recipe, out = _finished_run(run_dir, out)
    if recipe.adapter.method not in ("ept", "lamp"):
        raise LLMRecError(f"only EPT and LAMP runs export to a PEFT prompt-tuning adapter; this run's adapter is "
                          f"{recipe.adapter.method!r}.", "adapter.method")
    _, _, model, tokenizer, _ = load_trained(run_dir)
    with atomic_dir(out) as tmp:
        model.to_peft_prompt_tuning(tmp)
        tokenizer.save_pretrained(tmp)
    logger.info(f"wrote {out}: a PEFT prompt-tuning adapter with {model.num_virtual_tokens} virtual tokens")
    return out


def export_peft_lora(run_dir: str | Path, out: str | Path, user: str | None = None, item: str | None = None,
                     client: int | None = None) -> Path:
    from llmrec.rundir import load_trained

    run, recipe, out = _finished_run(run_dir, out)
    method = recipe.adapter.method
    if recipe.federated is not None:
        from llmrec.federated.run import export_client

        if user or item:
            raise LLMRecError("a federated run's adapters are per client, not per user; use --client.", "--user")
        return export_client(run, recipe, out, client)
    if client is not None:
        raise LLMRecError("--client is for federated runs (`llmrec federate`).", "--client")
    if method == "fedlora":
        _, _, model, tokenizer, _ = load_trained(run_dir)
        with atomic_dir(out) as tmp:
            model.to_peft_lora(tmp)
            tokenizer.save_pretrained(tmp)
        return out
    if method not in ("lora", "cora"):
        raise LLMRecError(f"only LoRA and CoRA runs export to a PEFT LoRA adapter; this run's adapter is {method!r}"
                          f"{' (use --to peft-prompt-tuning)' if method in ('ept', 'lamp') else ''}.",
                          "adapter.method")
    if method == "lora":
        if user or item:
            raise LLMRecError("a LoRA adapter is the same for every user; drop --user and --item.", "--user")
        with atomic_dir(out) as tmp:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(run.final / name, tmp / name)
        return out
    if user is None:
        raise LLMRecError("a CoRA adapter is materialised for one user; pass --user (and --item unless it is "
                          "user-conditioned).", "--user")
    _, _, model, tokenizer, _ = load_trained(run_dir)
    with atomic_dir(out) as tmp:
        model.to_peft_lora(tmp, user, item)
        tokenizer.save_pretrained(tmp)
    logger.info(f"wrote {out}: a PEFT LoRA adapter for user {user!r}" + (f" and item {item!r}" if item else ""))
    return out
