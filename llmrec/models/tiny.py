"""`tiny:<preset>`: small, randomly initialised Qwen2/Llama models with a tokenizer trained on the run's text.

They let every recipe run offline on a CPU in minutes. The tokenizer is a byte-level BPE trained on the catalog
titles and the prompt template (so titles are a few tokens each and any text still encodes); the model is built
from a config under the run's seed. Both are deterministic for a given (texts, seed) and are saved into the run
directory, so eval, recommend and export reload them without rebuilding.
"""

from __future__ import annotations

from collections.abc import Iterable

from llmrec.errors import LLMRecError, did_you_mean

# torch, tokenizers and transformers are imported where they are used, so that checking a recipe (which names a
# preset) does not pay for them

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_SHAPES = {
    "xs": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2),
    "s": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2),
    "m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=4),
}
PRESETS = {f"{family}-{size}": (family, shape) for family in ("qwen2", "llama") for size, shape in _SHAPES.items()}
_CONFIG_CLASSES = {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}  # transformers' config class of each family


def is_tiny(name: str) -> bool:
    return name.startswith("tiny:")


def preset_of(name: str, key: str = "model.name") -> tuple[str, dict]:
    preset = name.removeprefix("tiny:")
    if preset not in PRESETS:
        raise LLMRecError(
            f"unknown tiny preset {preset!r}; the presets are {', '.join(PRESETS)}.{did_you_mean(preset, PRESETS)}",
            key,
        )
    return PRESETS[preset]


def train_tokenizer(texts: Iterable[str], vocab_size: int, split_digits: bool = False):
    """A byte-level BPE tokenizer (`PreTrainedTokenizerFast`); training is deterministic for the same texts in the
    same order. With `split_digits`, every digit is its own token (as in Llama and Qwen tokenizers), so arithmetic
    is learnable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits
        else byte_level
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def build_tiny_model(name: str, tokenizer, seed: int, overrides: dict | None = None):
    import torch
    import transformers

    family, shape = preset_of(name)
    config_class = getattr(transformers, _CONFIG_CLASSES[family])
    fields = dict(shape)
    known = set(config_class().to_dict())
    for key, value in (overrides or {}).items():
        if key not in known:
            raise LLMRecError(
                f"{key!r} is not a field of {config_class.__name__}.{did_you_mean(key, known)}",
                f"model.tiny_overrides.{key}",
            )
        fields[key] = value
    # std 1/sqrt(hidden) keeps activations at unit scale and gives tied-embedding logits a usable range; with the
    # usual 0.02 a frozen random base makes near-uniform predictions that a LoRA adapter cannot sharpen.
    fields.setdefault("initializer_range", shape["hidden_size"] ** -0.5)
    config = config_class(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **fields,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
