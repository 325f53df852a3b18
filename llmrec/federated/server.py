"""The server side: a Flower strategy per aggregation rule, and the round loop that checkpoints every round.

`AdapterStrategy` is Flower's `FedAvg` (node sampling, message construction) with llmrec's aggregation: every
reply is validated (`validation.update_problems`) before the rule combines the accepted ones, failures and
rejections are counted against `federated.max_failure_fraction`, and bytes are counted both ways.

`run_rounds` replaces `Strategy.start` to make runs resumable: after each round the global tensors and the
round's record are written (`<run>/federated/round-NNNN/`, atomically) and a restarted server continues after the
newest complete round. Round 0 evaluates the initial adapter (the base model's behaviour).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger

from .rules import AggregationRule
from .validation import update_problems

logger = get_logger(__name__)

EVAL_METRICS = ("exact_match", "rouge_l", "loss")


def state_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict()) if len(record) else {}


def record_of(state: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: tensor.contiguous() for name, tensor in state.items()})


class AdapterStrategy(FedAvg):
    """FedAvg's sampling and messaging, with `rule`'s aggregation and validated updates."""

    def __init__(self, rule: AggregationRule, initial: dict[str, torch.Tensor], num_clients: int,
                 fraction_train: float = 1.0, min_train_clients: int = 1, max_failure_fraction: float = 0.5,
                 max_update_norm: float | None = None):
        super().__init__(fraction_train=fraction_train, fraction_evaluate=1.0, min_train_nodes=min_train_clients,
                         min_evaluate_nodes=num_clients, min_available_nodes=num_clients)
        self.rule, self.initial = rule, initial
        self.max_failure_fraction, self.max_update_norm = max_failure_fraction, max_update_norm
        self.expected = rule.upload(initial)
        self.sent: dict[str, torch.Tensor] = {}
        self.sampled = 0
        self.round_record: dict = {}
        self.last_eval: list[dict] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent, self.sampled = state_of(arrays), len(messages)
        self.round_record = {"round": server_round, "sampled": self.sampled,
                             "bytes_down": arrays.count_bytes() * self.sampled}
        return messages

    def reference(self) -> dict[str, torch.Tensor]:
        """What each uploaded tensor started from on the client: the global tensor sent, else its initial value
        (FLoRA clients train a fresh LoRA from the initial values every round)."""
        if self.rule.name == "flora":
            return self.expected
        return {name: self.sent.get(name, tensor) for name, tensor in self.expected.items()}

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted, weights, clients, rejected, failed = [], [], [], [], []
        reference = self.reference()
        bytes_up = 0
        for reply in replies:
            if reply.has_error():
                failed.append({"node": reply.metadata.src_node_id, "reason": reply.error.reason})
                continue
            arrays = reply.content.array_records.get("arrays", ArrayRecord())
            metrics = reply.content.metric_records.get("metrics", MetricRecord())
            bytes_up += arrays.count_bytes()
            client = int(metrics.get("client", -1))
            update = state_of(arrays)
            problems = update_problems(update, self.expected, reference, self.max_update_norm)
            if "num-examples" not in metrics or metrics["num-examples"] <= 0:
                problems.append("no positive num-examples in its metrics")
            if problems:
                logger.warning(f"round {server_round}: rejected the update of client {client}: {'; '.join(problems)}.")
                rejected.append({"client": client, "reasons": problems})
                continue
            accepted.append(update)
            weights.append(float(metrics["num-examples"]))
            clients.append({**{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                            "client": client})
        missing = self.sampled - len(replies)
        for failure in failed:
            logger.warning(f"round {server_round}: a client failed: {failure['reason'].strip().splitlines()[-1]}")
        if missing:
            logger.warning(f"round {server_round}: {missing} client(s) sent no reply within the round timeout.")
        lost = len(failed) + len(rejected) + missing
        self.round_record.update(bytes_up=bytes_up, accepted=len(accepted), rejected=rejected, failed=failed,
                                 timed_out=missing, train=clients)
        if not accepted or lost > self.max_failure_fraction * self.sampled:
            raise LLMRecError(
                f"round {server_round}: {lost} of {self.sampled} sampled clients failed, timed out or were rejected "
                f"({len(failed)} failed, {missing} timed out, {len(rejected)} rejected), more than "
                f"federated.max_failure_fraction = {self.max_failure_fraction} allows. The run stops here; the last "
                "complete round is kept, so rerunning the command resumes after it.",
                "federated.max_failure_fraction",
            )
        new_state = self.rule.aggregate(accepted, weights, self.sent)
        total = sum(weights)
        loss = sum(w * c.get("train_loss", 0.0) for w, c in zip(weights, clients)) / total
        return record_of(new_state), MetricRecord({"train_loss": loss, "num-examples": total})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Every client evaluates (waiting, as training does, until all `num_clients` have connected)."""
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Global and local metrics pooled over the clients' test rows (each client weighted by its row count)."""
        per_client = []
        for reply in replies:
            if reply.has_error():
                logger.warning(f"round {server_round}: a client failed to evaluate: "
                               f"{reply.error.reason.strip().splitlines()[-1]}")
                continue
            per_client.append(dict(reply.content.metric_records["metrics"]))
        self.last_eval = sorted(per_client, key=lambda m: m.get("client", -1))
        if not per_client:
            return None
        total = sum(m["num-examples"] for m in per_client)
        pooled = {key: sum(m[key] * m["num-examples"] for m in per_client) / total
                  for key in per_client[0] if key.startswith(("global_", "local_"))}
        return MetricRecord({**pooled, "num-examples": total})


def run_rounds(strategy: AdapterStrategy, grid: Grid, num_rounds: int, global_state: dict[str, torch.Tensor],
               first_round: int, config: dict, timeout: float,
               on_round: Callable[[int, dict[str, torch.Tensor], dict], None]) -> dict[str, torch.Tensor]:
    """Rounds `first_round`..`num_rounds`; `on_round(round, global state, record)` persists each one."""
    if first_round == 1:
        metrics = _evaluate(strategy, grid, 0, global_state, config, timeout)
        on_round(0, global_state, {"round": 0, "bytes_up": 0, "bytes_down": 0, "metrics": metrics,
                                   "eval": strategy.last_eval})
    for server_round in range(first_round, num_rounds + 1):
        started = time.monotonic()
        logger.info(f"round {server_round}/{num_rounds}: training")
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, record_of(global_state), ConfigRecord(dict(config)), grid),
            timeout=timeout,
        )
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        global_state = state_of(arrays)
        record = dict(strategy.round_record)
        metrics = {"train_loss": float(train_metrics["train_loss"])}
        metrics.update(_evaluate(strategy, grid, server_round, global_state, config, timeout))
        record.update(metrics=metrics, eval=strategy.last_eval, seconds=round(time.monotonic() - started, 2),
                      global_bytes=record_of(global_state).count_bytes())
        on_round(server_round, global_state, record)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("exact_match", "loss")))
        logger.info(f"round {server_round}/{num_rounds}: {shown}; {record['bytes_up'] + record['bytes_down']:,} bytes")
    return global_state


def _evaluate(strategy: AdapterStrategy, grid: Grid, server_round: int, global_state, config: dict,
              timeout: float) -> dict:
    replies = grid.send_and_receive(
        strategy.configure_evaluate(server_round, record_of(global_state), ConfigRecord(dict(config)), grid),
        timeout=timeout,
    )
    pooled = strategy.aggregate_evaluate(server_round, replies)
    if pooled is None:
        raise LLMRecError(f"round {server_round}: no client could evaluate the global adapter.", "federated")
    return {key: float(value) for key, value in pooled.items() if key != "num-examples"}
