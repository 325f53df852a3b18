"""EPT (Lan et al., AAAI 2025) and DePT (Shi & Lipani, ICLR 2024) on a frozen causal LM
(`shared/methods/ept_lamp.md`).

    X'  = E(x) + s · (A B)[position]                              DePT's offsets, s = α / √r, B zero-initialised
    P_f = P_s + softmax(P_s W_q (B W_k)ᵀ / √d_f) · B W_v W_o        prompt fusion
    g   = softmax(G(mean_tokens(P_f)))                             gate over N spaces
    P_r = P_f + Σ_i g_i · P_f D_i U_i                              multi-space projection, U_i zero-initialised
    the frozen model reads [P_r ; X']

DePT is EPT with `fusion` and `projection` off; with `offsets` off as well it is vanilla prompt tuning with m tokens.
At initialisation B = 0 and U_i = 0, so EPT starts as vanilla prompt tuning with P_s, whatever is switched on.

The paper's equations were not available; the choices made here where the specification leaves room:
* position = the token's index in its own sequence (from the attention mask, so padding does not shift it; or the
  caller's position ids). Offsets apply to every token the model reads, completion and generated tokens included:
  in training the completion is part of the input, so generation must see the same offsets. Inputs (with what
  `generate` adds) longer than the n rows of A are an error naming `adapter.args.max_length`, raised before any
  computation.
* fusion's keys and values are the r rows of B, the offset's low-rank basis in embedding space (r keys, not the n
  rows of A B: those are combinations of the same r rows, at n times the cost). Queries and keys are projected to
  `fusion_dim` and scaled by √fusion_dim (the attention width) rather than √d; the value map W_v W_o is factored
  through `fusion_dim` too, so fusion costs 4·d·fusion_dim parameters instead of 3·d².
* projections are low rank, D_i (d × q) random and U_i (q × d) zero, like LoRA; the gate G is a linear layer,
  zero-initialised (a uniform gate at the start).
* P_s starts from sampled vocabulary embeddings (PEFT's SAMPLE_VOCAB init, used by DePT); A from LoRA's
  Kaiming-uniform; W_q, W_k, W_v, D_i from N(0, 1/d) and W_o from N(0, 1/fusion_dim). All draws come from
  `init_seed`, so attaching the adapter is deterministic.
* two learning rates: the prompt P_s is one optimizer group, everything else (A, B, fusion, projections, gate) the
  other ("low_rank"), as DePT trains the prompt and its low-rank pair at different rates.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from llmrec.errors import LLMRecError

from ..soft_prompt import SoftPromptAdapter, SoftPromptModel, sample_vocabulary
from .config import EPTConfig


class EPTModel(SoftPromptModel):
    """A frozen causal LM with EPT's prompt and (optionally) DePT's position offsets."""

    adapter_type = "EPT"
    config_class = EPTConfig

    def __init__(self, language_model: nn.Module, config: EPTConfig):
        super().__init__(language_model, config)
        d, m, r, f = self.hidden_size, config.num_virtual_tokens, config.r, config.fusion_dim
        generator = torch.Generator().manual_seed(config.init_seed)

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=generator) * std)

        self.prompt_embeddings = nn.Parameter(sample_vocabulary(self.get_input_embeddings().weight, m, generator))
        self.offset_A = self.offset_B = None
        if config.offsets:
            self.offset_A = nn.Parameter(torch.empty(config.max_length, r))
            nn.init.kaiming_uniform_(self.offset_A, a=math.sqrt(5), generator=generator)
        if config.offsets or config.fusion:
            self.offset_B = nn.Parameter(torch.zeros(r, d))
        self.fusion_query = self.fusion_key = self.fusion_value = self.fusion_out = None
        if config.fusion:
            self.fusion_query, self.fusion_key = normal(d, f, std=d**-0.5), normal(d, f, std=d**-0.5)
            self.fusion_value, self.fusion_out = normal(d, f, std=d**-0.5), normal(f, d, std=f**-0.5)
        self.projection_down = self.projection_up = self.gate_weight = self.gate_bias = None
        if config.projection:
            n, q = config.num_spaces, config.projection_rank
            self.projection_down = normal(n, d, q, std=d**-0.5)
            self.projection_up = nn.Parameter(torch.zeros(n, q, d))
            self.gate_weight, self.gate_bias = nn.Parameter(torch.zeros(n, d)), nn.Parameter(torch.zeros(n))
        for name in self.adapter_names:  # drawn on the CPU for the seeded generator; they live beside the embeddings
            parameter = self.get_parameter(name)
            parameter.data = parameter.data.to(self.get_input_embeddings().weight.device)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_config.num_virtual_tokens

    def prompt(self) -> torch.Tensor:
        prompt = self.prompt_embeddings
        if self.fusion_query is not None:
            queries, keys = prompt @ self.fusion_query, self.offset_B @ self.fusion_key
            attention = torch.softmax(queries @ keys.T / math.sqrt(self.prompt_config.fusion_dim), dim=-1)
            prompt = prompt + attention @ (self.offset_B @ self.fusion_value @ self.fusion_out)
        if self.projection_down is not None:
            weights = torch.softmax(nn.functional.linear(prompt.mean(0), self.gate_weight, self.gate_bias), dim=-1)
            spaces = torch.einsum("md,ndq,nqe->nme", prompt, self.projection_down, self.projection_up)
            prompt = prompt + torch.einsum("n,nme->me", weights, spaces)
        return prompt

    def offset(self, positions: torch.Tensor) -> torch.Tensor:
        """s · (A B)[positions], (…, d) in float32."""
        return self.prompt_config.scaling * (self.offset_A[positions] @ self.offset_B)

    def embed(self, input_ids, inputs_embeds, positions):
        embeds = super().embed(input_ids, inputs_embeds, positions)
        if self.offset_A is None:
            return embeds
        return embeds + self.offset(positions.to(self.offset_A.device)).to(embeds.dtype)

    def check_positions(self, last_position: int) -> None:
        n = self.prompt_config.max_length
        if self.offset_A is not None and last_position >= n:
            raise LLMRecError(
                f"an input is {last_position + 1} tokens long, but the DePT position-offset table has n = {n} rows, "
                f"one per input position. Raise adapter.args.max_length to at least {last_position + 1}, or keep "
                f"inputs (with the tokens generate() adds) within {n} tokens, e.g. with the stage's max_length.",
                "adapter.args.max_length",
            )

    @contextlib.contextmanager
    def _generation_hooks(self):
        """While generating, each new token reaches the base model as an id: embed it here, with its offset. Its
        position is the one `generate` tracks, minus the prompt's length."""
        if self.offset_A is None:
            yield
            return

        def embed_with_offset(module, args, kwargs):
            if kwargs.get("input_ids") is None:
                return None  # the first step: the [prompt ; X'] embeddings built by generate()
            if kwargs.get("position_ids") is None:
                raise ValueError(f"{type(module).__name__}.generate() gives no position ids, which EPT's offsets need")
            positions = kwargs["position_ids"] - self.num_virtual_tokens
            self.check_positions(int(positions.max()))
            kwargs["inputs_embeds"] = self.embed(kwargs.pop("input_ids"), None, positions)
            kwargs["input_ids"] = None
            return args, kwargs

        handle = self.language_model.register_forward_pre_hook(embed_with_offset, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def parameter_group(self, name: str) -> str:
        return "prompt" if name == "prompt_embeddings" else "low_rank"

    def group_learning_rates(self) -> dict[str, float | None]:
        return {"prompt": self.prompt_config.prompt_learning_rate,
                "low_rank": self.prompt_config.low_rank_learning_rate}

    def export_refusal(self) -> LLMRecError | None:
        if self.offset_A is None:
            return None
        return LLMRecError(
            "this EPT adapter adds DePT's position offsets to the token embeddings of the input, which a PEFT "
            "prompt-tuning adapter cannot express (it only prepends a fixed prompt), so a stock export would change "
            "the model's outputs. Load it with llmrec, or train with adapter.args.offsets: false for a portable "
            "prompt.",
            "adapter.args.offsets",
        )


class EPTAdapter(SoftPromptAdapter):
    """`adapter.method: ept` (the registry object: config class, attach, load, save)."""

    model_class = EPTModel


EPT = EPTAdapter()
