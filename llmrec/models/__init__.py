"""Base model and tokenizer: a `tiny:<preset>`, a packaged real model (`smollm2-135m-instruct`, converted once from
the GGUF a registry package ships: `llmrec.models.packaged`), a Hugging Face Hub id, or a local folder.

Hub and local models load through `AutoModelForCausalLM` with safetensors only; `trust_remote_code` is off
unless the recipe sets it. Tiny models are built once per run directory (`base/`) and reloaded from there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from llmrec.errors import LLMRecError, did_you_mean
from llmrec.files import atomic_dir
from llmrec.logs import get_logger
from llmrec.schema import Section

from .tiny import build_tiny_model, is_tiny, preset_of, train_tokenizer

logger = get_logger(__name__)


class ModelConfig(Section):
    """`model`: the base model."""

    name: str = Field(description="'tiny:<preset>', a packaged model ('smollm2-135m-instruct'), a Hub id such as "
                      "'Qwen/Qwen2.5-1.5B', or a local folder.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' is the checkpoint's own (float32 for tiny models; for a packaged "
        "model bfloat16 where the machine computes in it natively, else float32)."
    )
    attn_implementation: str | None = Field(None, description="e.g. 'sdpa', 'eager', 'flash_attention_2'.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a Hub model. Off unless you trust it.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    quantization: dict[str, Any] | None = Field(
        None,
        description="bitsandbytes options (fields of transformers.BitsAndBytesConfig), e.g. {load_in_4bit: true, "
        "bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16} for QLoRA; needs llmrec[qlora] and a GPU.",
    )
    tokenizer_vocab_size: int = Field(1024, ge=300, description="tiny only: BPE vocabulary size.")
    tokenizer_split_digits: bool = Field(False, description="tiny only: one token per digit (for arithmetic).")
    tiny_overrides: dict[str, Any] = Field(
        default_factory=dict, description="tiny only: config fields to change, e.g. {hidden_size: 96}."
    )

    def check(self) -> None:
        if is_tiny(self.name):
            preset_of(self.name)
        if self.quantization:
            import inspect

            from transformers import BitsAndBytesConfig

            known = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
            for key in self.quantization:
                if key not in known:
                    raise LLMRecError(
                        f"{key!r} is not an option of transformers.BitsAndBytesConfig.{did_you_mean(key, known)}",
                        f"model.quantization.{key}",
                    )


def load_base(
    config: ModelConfig, base_dir: Path, texts: Callable[[], Iterable[str]], seed: int, main_process: bool
):
    """(model, tokenizer). For tiny models, the first call builds them into `base_dir`; later calls reload."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .packaged import is_packaged, packaged_folder, supports_bf16

    if is_tiny(config.name):
        if not (base_dir / "config.json").is_file():
            if not main_process:
                raise RuntimeError(f"{base_dir} should have been written by the main process first")
            logger.info(f"Building {config.name} and training its tokenizer "
                        f"(vocabulary {config.tokenizer_vocab_size}).")
            tokenizer = train_tokenizer(texts(), config.tokenizer_vocab_size, config.tokenizer_split_digits)
            model = build_tiny_model(config.name, tokenizer, seed, config.tiny_overrides)
            with atomic_dir(base_dir) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
        source, options = str(base_dir), {}
    elif is_packaged(config.name):
        source, options = str(packaged_folder(config.name)), {}
    else:
        source = config.name
        options = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
        folder = Path(source).expanduser()
        if (source.startswith((".", "/", "~")) or source.count("/") > 1) and not folder.is_dir():
            # a Hub id has one slash; anything else is a folder, and the Hub's own error would hide that
            raise LLMRecError(f"no model folder at {folder.resolve()}. If it is another run's final/ (e.g. a base "
                              "model recipe's), run that recipe first.", "model.name")
    quantization = {}
    if config.quantization:
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(**config.quantization)
    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    if dtype == "auto" and is_packaged(config.name):
        dtype = torch.bfloat16 if supports_bf16() else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=config.attn_implementation, use_safetensors=True, **options,
            **quantization,
        )
    except OSError as err:
        raise LLMRecError(f"could not load model {source!r}: {err}", "model.name") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def is_folder(name: str) -> bool:
    """As `load_base` reads model.name: an existing folder, or a path (a Hub id has one slash)."""
    return Path(name).expanduser().is_dir() or name.startswith((".", "/", "~")) or name.count("/") > 1


def base_identity(run, recipe) -> tuple:
    """What makes two runs' bases the same (`run`: a RunDir): the Hub id and revision, or the weights and tokenizer
    of a built or local base."""
    name = recipe.model.name
    if not is_tiny(name) and not is_folder(name):
        return ("hub", name, recipe.model.revision)
    folder = run.base if is_tiny(name) else Path(name).expanduser()
    return ("weights", _file_digest(folder / "model.safetensors"), _file_digest(folder / "tokenizer.json"))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
