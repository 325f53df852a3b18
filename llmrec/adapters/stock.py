"""Adapters that stock libraries already provide: any PEFT method by its config class, and full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM


@dataclass(frozen=True)
class StockPeftAdapter:
    """A PEFT method used as is: `adapter.args` are the fields of its config class."""

    config_class: type

    def attach(self, model, args: dict, context=None):
        if getattr(model, "is_quantized", False):  # QLoRA: fp32 norms and input gradients for the k-bit base
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, self.config_class(task_type="CAUSAL_LM", **args))

    def load(self, model, path: Path, trainable: bool = False):
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)

    def save(self, model, path: Path) -> None:
        model.save_pretrained(str(path), safe_serialization=True)


class FullFineTuning:
    """No adapter: every weight trains, and the whole model is saved."""

    config_class = None

    def attach(self, model, args: dict, context=None):
        return model

    def load(self, model, path: Path, trainable: bool = False):
        loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=model.dtype, use_safetensors=True)
        loaded.train(trainable)
        return loaded

    def save(self, model, path: Path) -> None:
        model.save_pretrained(str(path), safe_serialization=True)


LORA = StockPeftAdapter(LoraConfig)
PROMPT_TUNING = StockPeftAdapter(PromptTuningConfig)
FULL_FINE_TUNING = FullFineTuning()
