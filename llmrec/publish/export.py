"""`llmrec export`: a finished run's adapter in a stock PEFT format that loads without llmrec, from any directory.

`--to peft-prompt-tuning`: an EPT or LAMP run's final prompt as a PEFT prompt-tuning adapter (exact for LAMP and
for EPT/DePT without position offsets; refused, with the reason, otherwise).

A LoRA run's final adapter already is one and is copied; a FedLoRA run's A and B are materialised. A federated
run's final/ (the global adapter) already is one; `--client K` exports client K's personal adapter (the global
tensors and the tensors its rule kept on the client). A CoRA run's weights depend on the user (and item), so the
export materialises them for one user (`conditioning: user`) or one user–item pair: lora_A = A(u, i) and
lora_B = (α / r) · tanh(g) · B with scaling 1, which gives the same logits as the CoRA model for that input.

Every export then goes through `make_portable`, so the folder is self-sufficient:

```
OUT/
  adapter_config.json         base_model_name_or_path: the Hub id, the local folder's absolute path, or OUT/base's
  adapter_model.safetensors
  tokenizer.json, tokenizer_config.json, ...   the tokenizer the run trained with
  base/                       tiny models only: the base model (safetensors, config) and its tokenizer
  README.md                   what it is and how to load it (PEFT, vLLM, llmrec)
```

A `tiny:` base is on no Hub, so it travels inside the export and `base_model_name_or_path` is the absolute path of
`OUT/base` at export time: `AutoPeftModelForCausalLM.from_pretrained(OUT)` works from any working directory; after
the folder is moved, the README says how to pass `base/` from its new place.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir, read_json, write_json, write_text
from llmrec.logs import get_logger

logger = get_logger(__name__)

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices (vllm/config/lora.py)


def _finished_run(run_dir: str | Path, out: str | Path):
    from llmrec.hub import local_run_dir
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    run = RunDir(local_run_dir(run_dir))
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
    _, _, model, tokenizer, _ = load_trained(run.path)
    with atomic_dir(out) as tmp:
        model.to_peft_prompt_tuning(tmp)
        make_portable(tmp, out, run, recipe, f"the run's final {recipe.adapter.method.upper()} prompt "
                      f"({model.num_virtual_tokens} virtual tokens)", tokenizer)
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
        with atomic_dir(out) as tmp:
            what = export_client(run, recipe, tmp, client)
            make_portable(tmp, out, run, recipe, what, name_suffix="" if client is None else f"client{client}")
        logger.info(f"wrote {out}: the {'global' if client is None else f'client {client}'} adapter as PEFT LoRA")
        return out
    if client is not None:
        raise LLMRecError("--client is for federated runs (`llmrec federate`).", "--client")
    if method == "fedlora":
        _, _, model, tokenizer, _ = load_trained(run.path)
        with atomic_dir(out) as tmp:
            model.to_peft_lora(tmp)
            make_portable(tmp, out, run, recipe, "the run's FedLoRA adapter, its A and B materialised", tokenizer)
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
            make_portable(tmp, out, run, recipe, "the run's trained LoRA adapter (a copy of final/)")
        return out
    if user is None:
        raise LLMRecError("a CoRA adapter is materialised for one user; pass --user (and --item unless it is "
                          "user-conditioned).", "--user")
    _, _, model, tokenizer, _ = load_trained(run.path)
    pair = f"user {user!r}" + (f" and item {item!r}" if item else "")
    with atomic_dir(out) as tmp:
        model.to_peft_lora(tmp, user, item)
        make_portable(tmp, out, run, recipe, f"CoRA's weights materialised for {pair}: a static adapter for "
                      f"prompts about {'this pair' if item else 'this user'} only", tokenizer,
                      name_suffix="-".join(x for x in (user, item) if x))
    logger.info(f"wrote {out}: a PEFT LoRA adapter for {pair}")
    return out


# --- what makes an export self-sufficient ------------------------------------------------------------------------


def make_portable(folder: Path, out: Path, run, recipe, what: str, tokenizer=None, name_suffix: str = "") -> None:
    """Make the adapter just written into `folder` (the temporary folder that becomes `out`) load from anywhere:
    `base_model_name_or_path` names the base as it loads from any working directory (a `tiny:` base is copied into
    `base/`), the run's tokenizer is beside the adapter (`tokenizer`, or final/'s), and README.md says what it is
    and how to load it. Every export path calls this, inside its `atomic_dir`."""
    from llmrec.models import is_folder
    from llmrec.models.packaged import is_packaged
    from llmrec.models.tiny import is_tiny

    name = recipe.model.name
    base = portable_base(folder, out, run, recipe)
    config_file = folder / "adapter_config.json"
    config = read_json(config_file)
    config["base_model_name_or_path"] = base
    if recipe.model.revision and not is_tiny(name) and not is_packaged(name) and not is_folder(name):
        config["revision"] = recipe.model.revision
    write_json(config_file, config)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run.final, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer.save_pretrained(folder)
    module = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(x for x in (recipe.run.name, name_suffix) if x))
    write_text(folder / "README.md", _readme(run, recipe, out.resolve(), base, config, what, module))


def portable_base(folder: Path, out: Path, run, recipe) -> str:
    """The run's base model as it loads from any working directory: a packaged model's converted folder, a `tiny:`
    base copied into `folder/base/` (the temporary folder that becomes `out`), a local folder's absolute path, or the
    Hub id."""
    from llmrec.models import is_folder
    from llmrec.models.packaged import is_packaged, packaged_folder
    from llmrec.models.tiny import is_tiny

    name = recipe.model.name
    if is_packaged(name):  # the GGUF's de-quantised weights, not the Hub's original ones: the converted folder
        base = str(packaged_folder(name).resolve())
    elif is_tiny(name):
        if not (run.base / "config.json").is_file():
            raise LLMRecError(f"the run's tiny base model is missing from {run.base}; rerun `llmrec eval` on the run "
                              "to rebuild it.", str(run.path))
        shutil.copytree(run.base, folder / "base")
        base = str(out.resolve() / "base")
    elif is_folder(name):
        local = Path(name).expanduser()
        if not local.is_dir():
            raise LLMRecError(f"the base model folder is not at {local.resolve()}; a relative model.name is read from "
                              "the directory the run was trained in, so export from there.", "model.name")
        base = str(local.resolve())
    else:
        base = name
    return base


def _readme(run, recipe, out: Path, base: str, config: dict, what: str, module: str) -> str:
    from llmrec.models.packaged import PACKAGED
    from llmrec.models.tiny import is_tiny
    from llmrec.versions import library_versions

    lora = config.get("peft_type") == "LORA"
    tiny = is_tiny(recipe.model.name)
    versions = library_versions()
    packaged = PACKAGED.get(recipe.model.name)
    if tiny:
        origin = f"`{recipe.model.name}`, built by llmrec for this run and on no Hub, so it is in `base/`"
    elif packaged is not None:
        origin = (f"`{recipe.model.name}`, converted by llmrec from the 4-bit GGUF of the registry package "
                  f"{packaged.distribution} ({packaged.install}); on another machine `llmrec` converts it again "
                  f"into its cache. The original weights, {packaged.hub_id}, differ by the quantisation")
    elif base == recipe.model.name:
        origin = "from the Hugging Face Hub" + (f", revision `{config['revision']}`" if config.get("revision") else "")
    else:
        origin = "a local folder, which must stay there"
    lines = [
        f"# {recipe.run.name}: a PEFT {'LoRA' if lora else 'prompt-tuning'} adapter", "",
        f"{what[0].upper()}{what[1:]}. Exported by `llmrec export` from the run `{run.path.resolve()}` "
        f"(`adapter.method: {recipe.adapter.method}`).", "",
        f"Base model: `{base}` ({origin}).", "",
        "| file | what |", "|---|---|",
        f"| `adapter_config.json`, `adapter_model.safetensors` | the adapter; `base_model_name_or_path` is `{base}` |",
        "| `tokenizer.json`, `tokenizer_config.json` | the tokenizer the run trained with |",
    ]
    if tiny:
        lines.append("| `base/` | the base model (safetensors, config) and its tokenizer |")
    lines += [
        "", "## Load with PEFT", "", "```python",
        "from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
        f'model = AutoPeftModelForCausalLM.from_pretrained("{out}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out}")', "```", "",
    ]
    if tiny:
        lines += [
            "`base_model_name_or_path` is the absolute path `base/` had at export time, so this works from any "
            f"working directory while the folder stays at `{out}`. After moving or copying the folder, load the base "
            "from its new place:", "", "```python",
            "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'folder = "/new/place/{out.name}"',
            'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{folder}/base"), folder)',
            "tokenizer = AutoTokenizer.from_pretrained(folder)", "```", "",
        ]
    else:
        lines += [f"Use the folder's new path if you move it; the base is read from `{base}`.", ""]
    lines += ["## Serve with vLLM", ""]
    if lora:
        rank = int(config.get("r", 8))
        flag = (f" --max-lora-rank {next((r for r in VLLM_LORA_RANKS if r >= rank), rank)}" if rank > 16 else "")
        lines += ["```bash", f"vllm serve {base} --enable-lora --lora-modules {module}={out}{flag}", "```", "",
                  f'Requests that name `"model": "{module}"` use the adapter; those naming the base do not.', ""]
    else:
        lines += [
            "vLLM does not load PEFT prompt-tuning adapters: its prompt-adapter support was removed in vLLM 0.10 "
            "(vllm-project/vllm#20588). It accepts input embeddings instead (`vllm serve "
            f"{base} --enable-prompt-embeds`): send, as `prompt_embeds`, the adapter's prompt "
            f"(`prompt_embeddings` in `adapter_model.safetensors`, {config.get('num_virtual_tokens')} rows) "
            "followed by the base model's input embeddings of your prompt's tokens. llmrec does not test this path.",
            "",
        ]
    lines += [
        "## With llmrec", "",
        f"llmrec's commands (`llmrec eval`, `llmrec recommend`) read the run directory `{run.path.resolve()}`, not "
        "this folder. The adapter expects the prompts the run's task builds (its recipe is `recipe.yaml` there).", "",
        f"Written with llmrec {versions['llmrec']}, peft {versions['peft']}, transformers {versions['transformers']}.",
        "",
    ]
    return "\n".join(lines)
