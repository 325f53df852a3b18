"""`FedLoRAConfig`: the fields of `adapter.args` for `adapter.method: fedlora`, named like PEFT's `LoraConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..targets import TARGET_PRESETS


@dataclass
class FedLoRAConfig:
    """LoRA with FedLoRA-Optimizer's direction/magnitude split: A = diag(a_M)·A_D and B = diag(b_M)·B_D, with
    unit-norm rows of A_D and B_D. A_D, a_M and B_D are the shared (global) part in federated training, b_M the
    local one."""

    r: int = field(default=8, metadata={"help": "Rank of the increment ΔW = (α / r) · B·A."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Scale α; the increment is multiplied by α / r."})
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "'qv', 'attention', 'all-linear' (every linear layer but the output head) or a list of "
                  "module names such as ['q_proj', 'v_proj']."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, as in LoRA."})
    init_a_magnitude: float = field(
        default=0.0,
        metadata={"help": "Initial a_M (every row of A). 0 makes the model at step 0 exactly the base model."},
    )
    init_b_magnitude: float = field(
        default=1.0,
        metadata={"help": "Initial b_M (every row of B). A server never receives b_M, so its global model keeps this "
                  "value: it must not be 0 for the global model to differ from the base model."},
    )
    init_offset: bool = field(
        default=False,
        metadata={"help": "Start A at its drawn rows (a_M = their norms, so init_a_magnitude is unused) and B at b_M "
                  "times its unit rows, and offset the frozen weight by −(α / r)·B₀A₀ so the model still starts as "
                  "the base model: every tensor has a gradient from the first step."},
    )
    eps: float = field(default=1e-8, metadata={"help": "Floor of a row's norm when normalising the directions."})
    task_type: str = field(default="CAUSAL_LM", metadata={"help": "Accepted for symmetry with PEFT configs."})

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be an integer of at least 1, not {self.r!r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, not {self.lora_alpha!r}")
        if isinstance(self.target_modules, str) and self.target_modules not in (*TARGET_PRESETS, "all-linear"):
            raise ValueError(f"target_modules must be 'qv', 'attention', 'all-linear' or a list of module names, not "
                             f"{self.target_modules!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), not {self.lora_dropout!r}")
        if not (math.isfinite(self.init_a_magnitude) and math.isfinite(self.init_b_magnitude)):
            raise ValueError("init_a_magnitude and init_b_magnitude must be finite numbers")
        if self.init_offset and self.init_b_magnitude == 0:
            raise ValueError("init_offset needs a non-zero init_b_magnitude: with B = 0 the offset is zero too")
        if self.init_a_magnitude == 0 and self.init_b_magnitude == 0 and not self.init_offset:
            # A = 0 and B = 0 together give every adapter tensor a zero gradient: the adapter could never train
            raise ValueError("init_a_magnitude and init_b_magnitude cannot both be 0: every gradient of the adapter "
                             "would be zero and it would never train")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, not {self.eps!r}")
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"FedLoRA adapts causal language models only (task_type 'CAUSAL_LM'), not "
                             f"{self.task_type!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def to_dict(self) -> dict:
        return {"adapter_type": "FEDLORA", **asdict(self)}
