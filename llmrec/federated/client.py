"""One federated client: its partition of the data, its adapter, local training with stage 0's trainer (`sft`,
TRL's `SFTTrainer`, from the stage registry) on the rows it was dealt, and evaluation of the global and of its
personal adapter. Flower's `ClientApp` (`llmrec.federated.app`) calls it.

A client keeps, between rounds, only what its rule does not upload (`private-round-<N>.safetensors` in its work
folder, written atomically; the two newest are kept). Each round it starts from the global tensors it received
and its newest private tensors from an earlier round (the adapter's initial values the first time), trains
`stages.0.args.max_steps` steps with a fresh optimizer, saves its private tensors and returns the uploaded ones.

The adapter's initial values come from attaching it to the base model under the run seed, so the server and every
client build the same ones without exchanging them (FFA-LoRA's shared frozen A is this initial A). FLoRA clients
merge the received stack B_stack A_stack into their base weights and train the initial LoRA again each round.

Evaluation (each round, on the client's test split): the *global* adapter is the global tensors plus the initial
values of the tensors its rule never uploads (the server knows no others); the *personal* adapter is the global
tensors plus the client's own private tensors. Rules whose clients keep no trained tensors (FedIT, FFA, FLoRA)
have personal = global, and evaluate once.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from llmrec.errors import LLMRecError
from llmrec.files import atomic_save_file
from llmrec.logs import get_logger

from .rules import AggregationRule, build_rule, module_of, stacked_delta, tensor_kind

logger = get_logger(__name__)

EMPTY = "_empty"  # safetensors cannot write an empty file; this placeholder marks "no tensors"


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors (PEFT LoRA keys, or FedLoRA's), detached copies on the CPU."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.adapter_state_dict()
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Set the adapter's tensors named in `state` (others keep their values)."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise LLMRecError(f"the adapter has no tensor {unexpected[0]!r}; the server and this client disagree on the "
                          "recipe's adapter.", "adapter")


def client_rows(recipe, client: int) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of `client`: prompt/completion dicts, the same on every machine for the recipe."""
    fed, seed = recipe.federated, recipe.run.seed
    if fed.partition.by == "category":
        from llmrec.data.instructions import client_split, dirichlet_partition, instruction_rows

        rows = instruction_rows(recipe.data.instructions, seed)
        parts = dirichlet_partition([row["category"] for row in rows], fed.num_clients, fed.partition.alpha, seed,
                                    fed.partition.min_examples)
        train, test = client_split(rows, parts[client], recipe.data.instructions.test_fraction, seed, client)
    else:
        from llmrec.data import load_data, next_item_examples
        from llmrec.data.instructions import user_group_partition

        data = load_data(recipe.data, seed)
        users = set(user_group_partition(data, fed.num_clients, fed.partition.alpha, seed)[client])

        def rows_of(split: str) -> list[dict]:
            examples = next_item_examples(data, split, recipe.data.task)
            return [{"id": f"{row['user_id']}/{split}", "category": "next_item", "prompt": row["prompt"],
                     "completion": row["completion"]} for row in examples if row["user_id"] in users]

        train, test = rows_of("train"), rows_of("test")
    if fed.max_eval_rows is not None and len(test) > fed.max_eval_rows:
        test = random.Random(f"{seed}/{client}/eval").sample(test, fed.max_eval_rows)
    if not train:
        raise LLMRecError(f"client {client} has no training rows; lower federated.num_clients or raise "
                          "federated.partition.min_examples.", "federated.partition")
    return train, test


def partition_stats(recipe) -> list[str]:
    """`llmrec data stats` of a federated recipe: the rule, the partition, and each client's rows."""
    from collections import Counter

    fed = recipe.federated
    lines = [f"{'rule':>20}: {fed.rule}",
             f"{'partition':>20}: by {fed.partition.by}, Dirichlet alpha {fed.partition.alpha}"]
    example = None
    for client in range(fed.num_clients):
        train, test = client_rows(recipe, client)
        counts = Counter(row["category"] for row in train + test)
        shown = ", ".join(f"{name} {n}" for name, n in counts.most_common(3))
        top_share = counts.most_common(1)[0][1] / (len(train) + len(test))
        lines.append(f"{'client ' + str(client):>20}: {len(train)} train, {len(test)} test rows; "
                     f"{len(counts)} categories, top share {top_share:.2f} "
                     f"({shown}{', ...' if len(counts) > 3 else ''})")
        example = example or train[0]
    lines.append("\nexample prompt:\n" + example["prompt"] + "\nexample completion:\n" + example["completion"])
    return lines


class FederatedClient:
    """The model, data and private state of one client (reused across rounds within one process)."""

    def __init__(self, recipe, client: int, work_dir: Path, base_dir: Path):
        import datasets
        import transformers

        # clients run in parallel and their progress bars interleave; the server reports progress per round
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        self.recipe, self.client = recipe, client
        self.work_dir = Path(work_dir) / f"client-{client}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.train_rows, self.test_rows = client_rows(recipe, client)
        self.model, self.tokenizer, self.initial = initial_model(recipe, base_dir, self.work_dir)
        if torch.cuda.is_available():  # Trainer would move it at the first round; evaluation comes first
            self.model.to("cuda")
        self.rule: AggregationRule = build_rule(recipe.federated.rule, lora_scaling(self.model))
        frozen = {name for name in self.initial if tensor_kind(name) in self.rule.frozen}
        for name, parameter in self.model.named_parameters():
            # PEFT names parameters with the adapter name inside (lora_A.default.weight); state keys drop it
            if name.replace(".default.", ".") in frozen:
                parameter.requires_grad_(False)
        self.base_weights: dict[str, torch.Tensor] = {}

    # --- state ---------------------------------------------------------------------------------------------------

    def private_file(self, server_round: int) -> Path:
        return self.work_dir / f"private-round-{server_round:04d}.safetensors"

    def latest_private(self, before_round: int) -> dict[str, torch.Tensor] | None:
        return latest_private(self.work_dir, before_round)

    def _set_state(self, global_state: dict[str, torch.Tensor], private: dict[str, torch.Tensor] | None) -> None:
        if self.rule.name == "flora":
            self._merge_stack(global_state)
            load_adapter_state(self.model, self.initial)
            return
        load_adapter_state(self.model, {**self.initial, **(private or {}), **global_state})

    def _merge_stack(self, stack: dict[str, torch.Tensor]) -> None:
        """Base weights = original + the global stack's B_stack A_stack (FLoRA)."""
        deltas = stacked_delta(stack)
        for name in self.initial:
            module = module_of(name)
            layer = self.model.get_submodule(module).base_layer
            original = self.base_weights.setdefault(module, layer.weight.detach().clone())
            delta = deltas.get(module)
            layer.weight.data.copy_(original if delta is None else original + delta.to(original))

    # --- rounds --------------------------------------------------------------------------------------------------

    def train(self, server_round: int, global_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
        """Local training of one round: (the tensors to upload, metrics)."""
        from datasets import Dataset
        from transformers import PrinterCallback

        from llmrec.trainers import StageContext, get_stage

        faults = self.recipe.federated.faults
        if [server_round, self.client] in [list(pair) for pair in faults.crash]:
            raise RuntimeError(f"injected crash of client {self.client} in round {server_round} (federated.faults)")
        self._set_state(global_state, self.latest_private(server_round))
        self.model.train()
        rows = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in self.train_rows])
        spec = get_stage(self.recipe.stages[0].trainer, "stages.0.trainer")
        args = self._training_args(server_round)
        context = StageContext(self.recipe, None, self.model, self.tokenizer, 0, wants_eval=False, args=args)
        trainer = spec.trainer_class(model=self.model, args=args, train_dataset=rows, processing_class=self.tokenizer,
                                     **spec.trainer_kwargs(context))
        trainer.remove_callback(PrinterCallback)  # the server logs each round; per-step dicts from N clients are noise
        trainer.train()
        state = adapter_state(self.model)
        atomic_save_file(self.rule.private(state) or {EMPTY: torch.zeros(0)}, self.private_file(server_round))
        for old in sorted(self.work_dir.glob("private-round-*.safetensors"))[:-2]:
            old.unlink()
        upload = self.rule.upload(state)
        for round_, client, kind in faults.poison:
            if (round_, client) == (server_round, self.client) and upload:
                upload = _poisoned(upload, kind)
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        metrics = {"num-examples": len(self.train_rows), "train_loss": losses[-1] if losses else float("nan"),
                   "steps": trainer.state.global_step}
        return upload, metrics

    def _training_args(self, server_round: int):
        # no checkpoints (a round is short; the server checkpoints rounds) and a data order of its own per round
        return self.recipe.stage_config(0, self.work_dir / "trainer", save_strategy="no", disable_tqdm=True,
                                        seed=self.recipe.run.seed + 1009 * server_round + self.client)

    def evaluate(self, global_state: dict[str, torch.Tensor], server_round: int) -> dict:
        """Metrics of the global adapter and (for rules with personal tensors) the client's own, on its test rows."""
        from llmrec.eval.instructions import evaluate_instruction_rows

        fed = self.recipe.federated
        max_new_tokens = self.recipe.data.instructions.max_new_tokens if self.recipe.data.instructions else 32
        out: dict[str, float] = {"num-examples": len(self.test_rows), "client": self.client}
        self._set_state(global_state, None)
        global_metrics = evaluate_instruction_rows(self.model, self.tokenizer, self.test_rows, max_new_tokens,
                                                   fed.eval_batch_size)
        private = self.latest_private(server_round + 1) if self.rule.personal else None
        if private is not None:
            self._set_state(global_state, private)
            local_metrics = evaluate_instruction_rows(self.model, self.tokenizer, self.test_rows, max_new_tokens,
                                                      fed.eval_batch_size)
        else:
            local_metrics = global_metrics
        for name in ("exact_match", "rouge_l", "loss"):
            out[f"global_{name}"] = float(global_metrics[name])
            out[f"local_{name}"] = float(local_metrics[name])
        return out


def latest_private(work_dir: Path, before_round: int) -> dict[str, torch.Tensor] | None:
    """A client's newest private tensors saved in a round before `before_round` (a resumed server may repeat one)."""
    from safetensors.torch import load_file

    saved = sorted(p for p in Path(work_dir).glob("private-round-*.safetensors")
                   if int(p.stem.rsplit("-", 1)[1]) < before_round)
    if not saved:
        return None
    private = load_file(saved[-1])
    private.pop(EMPTY, None)
    return private


def initial_model(recipe, base_dir: Path, work_dir: Path):
    """(model with the adapter attached under the run seed, tokenizer, the adapter's initial tensors): the same on
    the server and on every client."""
    from llmrec.adapters import AdapterContext, get_adapter
    from llmrec.data import load_data
    from llmrec.models import is_tiny, load_base
    from llmrec.tasks import tokenizer_texts

    # a tiny base is built from the data's texts the first time (deterministic, so a remote client builds the same)
    build = is_tiny(recipe.model.name) and not (Path(base_dir) / "config.json").is_file()
    data = load_data(recipe.data, recipe.run.seed) if build else None
    model, tokenizer = load_base(recipe.model, Path(base_dir), tokenizer_texts(recipe, data), recipe.run.seed,
                                 main_process=True)
    torch.manual_seed(recipe.run.seed)
    model = get_adapter(recipe.adapter.method).attach(model, recipe.adapter.args,
                                                      AdapterContext(recipe, data, work_dir))
    return model, tokenizer, adapter_state(model)


def lora_scaling(model) -> float:
    """α/r of a PEFT LoRA model's layers (1.0 for other adapters)."""
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and scaling:
            return float(next(iter(scaling.values())))
    return 1.0


def _poisoned(upload: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    upload = dict(upload)
    name = sorted(upload)[0]
    if kind == "nan":
        upload[name] = upload[name].clone()
        upload[name].view(-1)[0] = float("nan")
    elif kind == "shape":
        upload[name] = torch.zeros(*upload[name].shape[:-1], upload[name].shape[-1] + 1, dtype=upload[name].dtype)
    else:
        upload[name] = upload[name] * 1e6 + 1e6
    return upload


__all__ = ["FederatedClient", "adapter_state", "client_rows", "load_adapter_state", "lora_scaling", "partition_stats"]
