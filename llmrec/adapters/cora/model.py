"""CoRA (collaborative LoRA): a frozen LLM whose linear layers get low-rank increments generated per sample from
frozen collaborative-filtering embeddings (Liu et al., AAAI 2025; `shared/methods/cora.md`).

    e_u, e_i  = CF(user), CF(item)                    frozen matrix factorisation / LightGCN tables
    A_t(u, i) = head_t(generator([W_u e_u; W_i e_i]))  one A ∈ R^{r × d_in} per sample and target layer t
    h_t       = W0_t x + (α / r) · tanh(g_t) · B_t (A_t(u, i) x)

Only the generator, the shared B_t and the gates g_t train. At initialisation the increment is exactly zero
(tanh(0) = 0, or B = 0 without the gate), so the CoRA model's logits equal the base model's.

Written by hand rather than as a PEFT tuner: PEFT's tuners hold their weights as parameters, while CoRA's A
matrices are activations computed per sample. PEFT is still the export format: `to_peft_lora` writes the weights
of one user (or user–item pair) as a stock LoRA adapter that `PeftModel.from_pretrained` and vLLM load.

Choices where the paper is silent (see also `CoRAConfig`):
* the CF model trains on the run's training split when the adapter is attached, with BPR positives = liked
  interactions (rating ≥ `data.ctr.like_threshold`), and is cached in `<run>/cf/` so a resumed run reuses it;
* a user or item the CF model does not know is an error unless `cold_start` is 'zero' or 'mean' (the mean of the
  known embeddings), so falling back is always the recipe's explicit choice;
* CoRA is evaluated on the CTR task: a recipe with `adapter.method: cora` must set `eval.task: ctr`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from llmrec.errors import LLMRecError
from llmrec.files import atomic_save_file
from llmrec.logs import get_logger

from ..targets import replace_targets
from ..wrapper import WEIGHTS_NAME, FrozenModelWrapper
from .config import CoRAConfig
from .layer import CoRALinear, QueryGenerator

logger = get_logger(__name__)


class CoRAModel(FrozenModelWrapper):
    """The base model with CoRA layers; `forward` takes `cf_users` (and `cf_items`) as CF row indices."""

    frozen_attribute = "base_model"
    adapter_type = "CORA"

    def __init__(self, base_model: nn.Module, config: CoRAConfig, cf):
        super().__init__()
        self.base_model, self.cora_config, self.cf = base_model, config, cf
        self.target_names, self.cora_layers = replace_targets(
            base_model, config.target_modules,
            lambda linear: CoRALinear(linear, config.r, config.scaling, config.gate, config.fp32_delta),
        )
        self.generator = QueryGenerator(
            cf.user_embeddings.shape[1], [layer.in_features for layer in self.cora_layers], config.r, config.query_dim,
            config.num_blocks, config.num_heads, config.query_mode, config.num_queries, config.normalize_queries,
            config.conditioning,
        ).to(base_model.get_input_embeddings().weight.device)
        self.user_row = {user: row for row, user in enumerate(cf.user_ids)}
        self.item_row = {item: row for row, item in enumerate(cf.item_ids)}
        # one extra row at the end of each table: the cold-start embedding (zero or the mean)
        self.register_buffer("cf_users_table", self._with_fallback(cf.user_embeddings), persistent=False)
        self.register_buffer("cf_items_table", self._with_fallback(cf.item_embeddings), persistent=False)
        self.adapter_names = [name for name, p in self.named_parameters() if p.requires_grad]

    def _with_fallback(self, table: torch.Tensor) -> torch.Tensor:
        table = table.float()
        fallback = (table.mean(0, keepdim=True) if self.cora_config.cold_start == "mean"
                    else torch.zeros_like(table[:1]))
        return torch.cat([table, fallback]).to(self.base_model.get_input_embeddings().weight.device)

    # --- conditioning --------------------------------------------------------------------------------------------

    def cf_index(self, users: list[str], items: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`cf_users` (and `cf_items`) row indices for a batch; unknown ids follow `cold_start`."""
        out = {"cf_users": self.rows_of(users, "user")}
        if self.cora_config.conditioning == "user_item":
            if items is None:
                raise LLMRecError("this CoRA adapter is conditioned on (user, item) pairs; give an item too.",
                                  "adapter.args.conditioning")
            out["cf_items"] = self.rows_of(items, "item")
        return out

    def rows_of(self, ids: list[str], kind: str) -> torch.Tensor:
        """Rows of the CF `kind` ('user' or 'item') table; unknown ids get the fallback row or an error."""
        rows = self.user_row if kind == "user" else self.item_row
        fallback = len(rows)
        indices = []
        for key in ids:
            row = rows.get(str(key))
            if row is None:
                if self.cora_config.cold_start == "error":
                    raise LLMRecError(
                        f"the CF model has no embedding for {kind} {key!r} (it saw {len(rows)} {kind}s in training). "
                        "Set adapter.args.cold_start to 'zero' or 'mean' to score unknown users and items with a "
                        "fallback embedding, or keep them out of the data.",
                        "adapter.args.cold_start",
                    )
                row = fallback
            indices.append(row)
        return torch.tensor(indices, dtype=torch.long)

    def generated_weights(self, cf_users: torch.Tensor, cf_items: torch.Tensor | None = None) -> list[torch.Tensor]:
        users = self.cf_users_table[cf_users.to(self.cf_users_table.device)]
        items = self.cf_items_table[cf_items.to(self.cf_items_table.device)] if cf_items is not None else None
        return self.generator(users, items)

    def forward(self, input_ids=None, attention_mask=None, cf_users=None, cf_items=None, **kwargs):
        if cf_users is None:
            raise LLMRecError("a CoRA model needs cf_users (and cf_items) for every forward pass.", "adapter.method")
        for layer, A in zip(self.cora_layers, self.generated_weights(cf_users, cf_items)):
            layer.lora_A = A
        try:
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            for layer in self.cora_layers:
                layer.lora_A = None

    # --- save, load, export --------------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, state_dict: dict | None = None) -> None:
        """adapter_config.json, adapter_model.safetensors (generator, B, gates) and the CF model (safetensors)."""
        self.write_adapter_folder(folder, self.cora_config.to_dict(), state_dict)
        self.cf.save(Path(folder))

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, folder: str | Path, trainable: bool = False) -> CoRAModel:
        from llmrec.cf import CFModel

        model = cls(base_model, cls.read_adapter_config(folder, CoRAConfig), CFModel.load(Path(folder)))
        model.load_adapter_weights(folder)
        model.train(trainable)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable and name in model.adapter_names)
        return model

    @torch.no_grad()
    def to_peft_lora(self, folder: str | Path, user: str, item: str | None = None) -> Path:
        """Materialise the increments for `user` (and `item`) as a stock PEFT LoRA adapter with scaling 1:
        lora_A = A(u, i) and lora_B = (α / r) · tanh(g) · B, so W0 + lora_B · lora_A is exactly CoRA's weight."""
        from peft import LoraConfig

        if self.cora_config.conditioning == "user_item" and item is None:
            raise LLMRecError(
                "this CoRA adapter is conditioned on (user, item) pairs, so a static adapter needs an item too "
                "(--item); train with adapter.args.conditioning: user for one adapter per user.",
                "adapter.args.conditioning",
            )
        index = self.cf_index([user], [item] if self.cora_config.conditioning == "user_item" else None)
        weights = self.generated_weights(**index)
        tensors = {}
        for name, layer, A in zip(self.target_names, self.cora_layers, weights):
            tensors[f"base_model.model.{name}.lora_A.weight"] = A[0].float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.effective_B().float().cpu().contiguous()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = LoraConfig(
            r=self.cora_config.r, lora_alpha=self.cora_config.r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=sorted({name.rsplit(".", 1)[-1] for name in self.target_names}),
            base_model_name_or_path=getattr(self.config, "_name_or_path", None),
        )
        config.save_pretrained(str(folder))
        atomic_save_file(tensors, folder / WEIGHTS_NAME)
        return folder


class CoRAAdapter:
    """`adapter.method: cora` (the registry object: config class, attach, load, save)."""

    config_class = CoRAConfig

    def recipe_needs(self, recipe) -> list[tuple[tuple, str]]:
        needs = []
        if recipe.eval.task != "ctr":
            needs.append((("eval", "task"),
                          "CoRA is trained and evaluated on the Yes/No CTR task; set eval.task: ctr."))
        if recipe.data.ctr is None:
            needs.append((("data",), "CoRA needs a data.ctr section (how rated interactions become Yes/No rows)."))
        return needs

    def attach(self, model, args: dict, context=None):
        if context is None:
            raise LLMRecError("CoRA needs the run's data to train its CF model; attach it through a recipe.",
                              "adapter.method")
        config = CoRAConfig(**args)
        return CoRAModel(model, config, self.collaborative_model(config, context))

    def collaborative_model(self, config: CoRAConfig, context):
        """Train the CF model on the run's training split, or reload it from `<run>/cf/` (main process first)."""
        from accelerate import PartialState

        from llmrec.cf import CFConfig, CFModel, train_cf

        folder = Path(context.workdir) / "cf"
        threshold = context.recipe.data.ctr.like_threshold if context.recipe.data.ctr else 4.0
        cf_config = CFConfig(
            **{name.removeprefix("cf_"): value for name, value in asdict(config).items() if name.startswith("cf_")},
            like_threshold=threshold,
        )
        state = PartialState()
        with state.main_process_first():
            if (folder / "cf_model.safetensors").is_file():
                logger.info(f"Loading the CF model from {folder}.")
                return CFModel.load(folder)
            logger.info(f"Training the CF model ({cf_config.model}, dim {cf_config.dim}) on the training "
                        "interactions.")
            try:
                cf = train_cf(context.data, cf_config, context.recipe.run.seed)
            except LLMRecError as err:  # name the recipe key: the CF settings are CoRA's cf_* arguments
                if (err.place or "").startswith("cf."):
                    raise LLMRecError(err.message, "adapter.args.cf_" + err.place.removeprefix("cf.")) from None
                raise
            if state.is_main_process:
                cf.save(folder)
            return cf

    def load(self, model, path: Path, trainable: bool = False):
        return CoRAModel.from_pretrained(model, path, trainable)

    def save(self, model, path: Path) -> None:
        model.save_pretrained(path)


CORA = CoRAAdapter()
