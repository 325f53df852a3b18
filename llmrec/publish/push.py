"""`llmrec push`: a finished run on the Hugging Face Hub, and `hf://owner/repo[@revision]` to load it back.

What a pushed repository holds (one commit, so a failed push publishes nothing half-way):

```
README.md                        the model card (`llmrec.publish.card`), with how to load this repository
adapter_config.json              the adapter in its stock PEFT format, where one is exact: LoRA; FedLoRA (global or
adapter_model.safetensors          --client K); CoRA for one user or user-item pair (--user/--item); prompt tuning,
tokenizer.json, ...                LAMP and EPT without position offsets; with the run's tokenizer
final/                           llmrec's own format (what `llmrec recommend hf://...` loads): the same adapter,
                                   or what no stock format holds exactly (CoRA's generator, EPT's offsets,
                                   CausalDPO's environment head), or the fully fine-tuned model
base/                            --include-base only: a `tiny:` or local base model, which is on no Hub
recipe.yaml, metrics.json, curves.png
merge.json, endpoints.json,      a merged run (`llmrec merge`): what was merged, its endpoints, and the
  surgery/, adamerging.png         Representation Surgery modules (llmrec's format)
```

Never checkpoints, optimizer states or pickles: only files with the suffixes in `PUBLISHED_SUFFIXES` go up.

Choices where the issue leaves room:
* loading back is `hf://owner/repo` (optionally `@branch`, tag or commit) wherever a command takes a finished run
  (`llmrec eval`, `llmrec recommend`, `llmrec export`); the repository is fetched through `huggingface_hub`'s cache
  and read as a run directory. `llmrec eval` then prints the metrics and writes nothing (the cache is read-only).
* a packaged model (`smollm2-135m-instruct`) is pushed with `base_model` naming the Hub repository its weights were
  converted from; the card says that they differ by the GGUF's quantisation.
* the licence is `--license` (a Hub licence id); without it, `other`: the publisher has not chosen one, and the
  base model's and the data's terms apply (MovieLens, for one, has its own terms).
* the run's tokenizer goes up beside the stock adapter (and in `final/`) whatever the base's: a few hundred kB, and
  PEFT, vLLM and llmrec then never pair the adapter with a tokenizer it was not trained with.
* the whole push (repository, branch, commit) is retried on 5xx answers and dropped connections, `RETRIES` times
  with exponential back-off; a commit is atomic on the Hub, so a retry cannot publish twice.

The token comes from `HF_TOKEN` or the stored login (`huggingface_hub.get_token`), never from a recipe, and is
never printed: errors name the repository and what to do, not the request.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.hub import HUB_SCHEME, check_repo_id, hub_error, reason, transient
from llmrec.logs import get_logger

logger = get_logger(__name__)

PUBLISHED_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".jinja", ".yaml", ".png", ".md"}
RETRIES = 3
BACKOFF_SECONDS = 2.0
STOCK_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class PushPlan:
    folder: Path  # the staged repository contents
    files: list[tuple[str, int]]  # (path in the repository, bytes)
    card: str


# --- what goes up ------------------------------------------------------------------------------------------------


def stage(run_dir: str | Path, folder: Path, repo_id: str, user: str | None = None, item: str | None = None,
          client: int | None = None, include_base: bool = False, license: str | None = None) -> PushPlan:
    """Write into `folder` everything `llmrec push` publishes for the run, and return the plan."""
    from huggingface_hub import ModelCard

    from llmrec.data import load_data
    from llmrec.files import read_json, write_json
    from llmrec.models.tiny import is_tiny
    from llmrec.publish.card import card_body, card_metadata, hub_base_model
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    run = RunDir(run_dir)
    run.require(final=True)
    recipe = load_recipe(run.recipe_file, instantiate=False)
    base = hub_base_model(recipe)
    tiny = is_tiny(recipe.model.name)
    if base is None and not include_base:
        what = "built by llmrec from a preset" if tiny else "a local folder"
        raise LLMRecError(
            f"the base model {recipe.model.name!r} is {what} and on no Hub, so the published adapter would point "
            "at nothing. Pass --include-base to upload the base model into the repository (base/) too, or train "
            "on a Hub model.", "model.name")
    stock = _stock_adapter(run, recipe, folder, user, item, client)
    peft_type = None
    if stock is not None:
        config = read_json(folder / "adapter_config.json")
        config["base_model_name_or_path"] = base or recipe.model.name
        write_json(folder / "adapter_config.json", config)
        peft_type = config.get("peft_type")
    _copy_published(run.final, folder / "final")
    merged = [run.path / name for name in ("merge.json", "endpoints.json", "adamerging.png")]  # llmrec merge's
    for source in (run.recipe_file, run.metrics_file, run.curves, *merged):
        if source.is_file():
            shutil.copy2(source, folder / source.name)
    if (run.path / "surgery").is_dir():  # Representation Surgery modules: llmrec's format, per endpoint
        _copy_published(run.path / "surgery", folder / "surgery")
    if include_base and base is None:
        _copy_published(run.base if tiny else Path(recipe.model.name).expanduser(), folder / "base")
    data = load_data(recipe.data, recipe.run.seed)
    metadata = card_metadata(recipe, run.metrics(), license=license or "other", model_name=repo_id.split("/")[-1])
    if stock is not None:  # the top of the repository is a stock PEFT adapter, whatever final/ holds
        metadata.library_name = "peft"
    body = card_body(recipe, data, run.metrics(), f"{HUB_SCHEME}{repo_id}")
    text = f"---\n{metadata.to_yaml()}\n---\n{body}\n{_loading(recipe, repo_id, base, stock, peft_type, license)}"
    card = ModelCard(text)
    card.save(folder / "README.md")
    files = sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    unsafe = [path for path, _ in files if Path(path).suffix not in PUBLISHED_SUFFIXES]
    if unsafe:  # the copies above filter; this guards the stock exports' own files
        raise LLMRecError(f"refusing to publish {', '.join(unsafe)} (only {', '.join(sorted(PUBLISHED_SUFFIXES))} "
                          "files go up).", str(run.path))
    return PushPlan(folder, files, text)


def _stock_adapter(run, recipe, folder: Path, user, item, client) -> str | None:
    """Write the run's adapter in its stock PEFT format (and the run's tokenizer) into `folder`; return what it is,
    or None when the method has no exact stock form (the card then says why)."""
    from llmrec.publish.export import export_peft_lora, export_peft_prompt_tuning

    method = recipe.adapter.method
    if (user or item) and method != "cora":
        raise LLMRecError("--user and --item choose the weights of a CoRA run; this run's adapter is "
                          f"{method!r}.", "--user")
    if client is not None and recipe.federated is None:
        raise LLMRecError("--client is for federated runs (`llmrec federate`).", "--client")
    if method == "none":
        return None
    if method in ("lora", "prompt_tuning") and recipe.federated is None:
        for name in STOCK_FILES:
            shutil.copy2(run.final / name, folder / name)
        _copy_published(run.final, folder, only_tokenizer=True)
        return f"the run's {method} adapter"
    if method == "cora" and user is None:
        return None
    with tempfile.TemporaryDirectory(prefix="llmrec-push-") as tmp:
        out = Path(tmp) / "export"
        try:
            if method in ("ept", "lamp"):
                export_peft_prompt_tuning(run.path, out)
            else:
                export_peft_lora(run.path, out, user, item, client)
        except LLMRecError as err:
            if method == "ept":  # position offsets: no exact stock form; final/ holds it
                logger.info(f"no stock PEFT form for this EPT run ({err}); publishing llmrec's format only")
                return None
            raise
        for path in out.iterdir():
            if path.is_file() and path.name != "README.md":
                shutil.copy2(path, folder / path.name)
    who = f" for user {user}" + (f" and item {item}" if item else "") if user else ""
    return f"the run's {method} adapter{who}" + (f" (client {client})" if client is not None else "")


def _copy_published(source: Path, target: Path, only_tokenizer: bool = False) -> None:
    """Copy the publishable files of `source` (recursively) into `target`."""
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.suffix not in PUBLISHED_SUFFIXES or path.name == "README.md":
            continue
        if only_tokenizer and not path.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                         "chat_template")):
            continue
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)


def _loading(recipe, repo_id: str, base: str | None, stock: str | None, peft_type: str | None,
             license: str | None) -> str:
    """The card's sections on loading the published repository."""
    from llmrec.models.packaged import PACKAGED

    method = recipe.adapter.method
    lines = ["## Load this repository", ""]
    if base is None:
        lines += [f"The base model, `{recipe.model.name}`, is on no Hub, so the metadata name no `base_model`; it is "
                  "in this repository's `base/` folder.", ""]
    elif recipe.model.name in PACKAGED:
        lines += [f"The base model was converted by llmrec from the 4-bit GGUF of `{recipe.model.name}`; `{base}` "
                  "holds its original weights, which differ by the quantisation.", ""]
    load_base = (f'AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="base")' if base is None
                 else f'AutoModelForCausalLM.from_pretrained("{base}")')
    if stock is not None:
        lines += [f"With PEFT ({stock}):", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = PeftModel.from_pretrained({load_base}, \"{repo_id}\")",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", ""]
        if peft_type == "LORA":
            served = base or "<the base model folder>"
            lines += ["With vLLM:", "", "```bash",
                      f"vllm serve {served} --enable-lora --lora-modules {repo_id.split('/')[-1]}={repo_id}", "```",
                      ""]
    elif method == "none":
        lines += ["With transformers (the fully fine-tuned model is in `final/`):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="final")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", subfolder="final")', "```", ""]
    else:
        lines += [f"No stock PEFT format holds this `{method}` adapter exactly, so it is published in llmrec's "
                  "format (`final/`) only" + (" (CoRA: push with --user to publish one user's weights as LoRA)"
                                              if method == "cora" else "") + ".", ""]
    lines += ["With llmrec (it reads `final/`, `recipe.yaml` and, for a `tiny:` base, `base/`):", "", "```bash",
              f"llmrec recommend {HUB_SCHEME}{repo_id} --user USER_ID -k 10", "```", "",
              "## Limitations", "",
              "The model was trained and evaluated on the data in the recipe only; its metrics say nothing about "
              "other catalogs or users. It recommends from the catalog it was trained on.", "",
              "## Licence", "",
              f"`{license}`." if license else "`other`: the publisher chose no licence; the base model's and the "
              "data's terms apply.", ""]
    return "\n".join(lines)


# --- publishing --------------------------------------------------------------------------------------------------


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         user: str | None = None, item: str | None = None, client: int | None = None,
         commit_message: str | None = None, dry_run: bool = False, include_base: bool = False,
         license: str | None = None, endpoint: str | None = None) -> str:
    """Publish the run as `repo_id` in one commit (on branch `revision`, created from main when missing), or with
    `dry_run` only describe what would go up; returns what was done, in words."""
    from huggingface_hub import HfApi, get_token

    check_repo_id(repo_id, "REPO_ID")
    with tempfile.TemporaryDirectory(prefix="llmrec-push-") as tmp:
        plan = stage(run_dir, Path(tmp), repo_id, user, item, client, include_base, license)
        total = sum(size for _, size in plan.files)
        listing = "\n".join(f"  {size:>12,}  {path}" for path, size in plan.files)
        where = f"{repo_id}" + (f" (branch {revision})" if revision else "")
        if dry_run:
            return (f"would publish {len(plan.files)} files ({total:,} bytes) to {where}; nothing was sent.\n"
                    f"{listing}\n\n--- README.md ---\n{plan.card}")
        token = get_token()
        if not token:
            raise LLMRecError("no Hugging Face token: set HF_TOKEN to a token with write access, or log in with "
                              "`hf auth login`; nothing was published.", repo_id)
        api = HfApi(endpoint=endpoint, token=token)
        message = commit_message or f"llmrec push of the run {Path(run_dir).name}"
        for attempt in range(1, RETRIES + 1):
            try:
                api.create_repo(repo_id, private=private, exist_ok=True)
                if revision and revision != "main":
                    api.create_branch(repo_id, branch=revision, exist_ok=True)
                commit = api.upload_folder(repo_id=repo_id, folder_path=plan.folder, revision=revision,
                                           commit_message=message)
                break
            except Exception as err:  # noqa: BLE001 - every failure becomes one paragraph naming the repository
                if attempt < RETRIES and transient(err):
                    wait = BACKOFF_SECONDS * 2 ** (attempt - 1)
                    logger.warning(f"the Hub did not answer the push to {repo_id} ({reason(err)}); "
                                   f"retrying in {wait:.0f} s ({attempt}/{RETRIES})")
                    time.sleep(wait)
                    continue
                raise hub_error(err, repo_id, "push", revision, attempt) from None
    return (f"published {len(plan.files)} files ({total:,} bytes) to {where} in one commit: "
            f"{commit.commit_url}\n{listing}")
