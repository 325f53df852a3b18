"""`federated`: the recipe section of `llmrec federate` (rule, clients, rounds, partitions, robustness)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from llmrec.schema import Section

RuleName = Literal["fedlora_opt", "fedit", "ffa", "fedsa", "flora", "local"]


class PartitionConfig(Section):
    """`federated.partition`: how the examples are dealt to clients."""

    by: Literal["category", "user_group"] = Field(
        "category",
        description="'category': the instruction examples of data.instructions, each category's examples split over "
        "clients by Dirichlet(alpha); 'user_group': the recommendation users, grouped by their dominant category "
        "and dealt the same way (each client trains next-item rows of its users).",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration: small = each client holds few categories; "
                         "large (100) = near-IID.")
    min_examples: int = Field(8, ge=1, description="Every client holds at least this many examples (partitions are "
                              "redrawn, seeded, until it does).")


class SimulationConfig(Section):
    """`federated.simulation`: Flower's simulation engine (Ray) on this machine."""

    client_cpus: float = Field(1.0, gt=0, description="CPUs each virtual client reserves (clients run in parallel "
                               "up to num_cpus / client_cpus).")
    client_gpus: float = Field(0.0, ge=0, description="GPUs (fractions allowed) each virtual client reserves.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs Ray may use (default: all of this machine's).")


class FaultConfig(Section):
    """`federated.faults`: injected failures, for checking that a run survives them (tests, drills)."""

    crash: list[tuple[int, int]] = Field(
        default_factory=list, description="[round, client] pairs: that client raises an error during that round's "
        "training.")
    poison: list[tuple[int, int, Literal["nan", "shape", "norm"]]] = Field(
        default_factory=list, description="[round, client, kind]: that client's upload holds a NaN, a tensor of the "
        "wrong shape, or a change 10^6 times too large.")


class FederatedConfig(Section):
    """`federated`: a run of `llmrec federate`. Each round, a sample of clients trains the recipe's adapter with
    stage 0 (`trainer: sft`; its `max_steps` is the number of local steps per round), uploads the tensors the rule
    shares, and the server aggregates them; then every client evaluates the global and its own adapter."""

    # the clients train and evaluate the rows they are dealt, so data.instructions needs no eval.task of its own
    deals_out_rows: ClassVar[bool] = True

    rule: RuleName = Field("fedlora_opt", description="The aggregation rule (llmrec.federated.rules.RULES).")
    num_clients: int = Field(4, ge=1, description="Clients (virtual SuperNodes in simulation).")
    rounds: int = Field(3, ge=1, description="Federated rounds.")
    fraction_train: float = Field(1.0, gt=0, le=1, description="Share of the clients sampled to train each round.")
    min_train_clients: int = Field(1, ge=1, description="Fewest clients sampled per round.")
    max_failure_fraction: float = Field(
        0.5, ge=0, le=1, description="A round succeeds when at most this share of its sampled clients failed, timed "
        "out or sent an update that was rejected; otherwise the run stops with an error.")
    round_timeout: float = Field(3600.0, gt=0, description="Seconds the server waits for the replies of a round.")
    max_update_norm: float | None = Field(
        100.0, gt=0, description="Reject an update whose L2 distance from the tensors its client started from "
        "exceeds this (null: no bound).")
    eval_batch_size: int = Field(32, ge=1, description="Rows per batch when clients evaluate.")
    max_eval_rows: int | None = Field(None, ge=1, description="Cap on each client's evaluated test rows (seeded "
                                      "sample; null: all).")
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)

    @model_validator(mode="after")
    def _clients_fit(self):
        if self.min_train_clients > self.num_clients:
            raise ValueError(f"min_train_clients ({self.min_train_clients}) exceeds num_clients ({self.num_clients})")
        for where in (*self.faults.crash, *self.faults.poison):
            if not 0 <= where[1] < self.num_clients:
                raise ValueError(f"faults name client {where[1]}, but clients are 0..{self.num_clients - 1}")
        return self

    def central_task(self) -> str:
        """The eval.task of the same training run without federation (what `llmrec merge` evaluates a federated run's
        merged client adapters on): the instruction examples, or the next-item rows of the users."""
        return "instructions" if self.partition.by == "category" else "ranking"

    def needs(self, recipe) -> list[tuple[tuple, str]]:
        """A federated recipe trains one SFT stage locally with the adapter its rule works on, on data it can deal
        out."""
        from .rules import build_rule

        needs = []
        rule = build_rule(self.rule)
        if recipe.adapter.method != rule.adapter:
            needs.append((("adapter", "method"), f"federated.rule {self.rule!r} works on adapter.method "
                          f"{rule.adapter!r}, not {recipe.adapter.method!r}."))
        if len(recipe.stages) != 1 or recipe.stages[0].trainer != "sft":
            needs.append((("stages",), "a federated recipe has one stage, `trainer: sft`: the clients' local training "
                          "(its max_steps = local steps per round)."))
        elif "max_steps" not in recipe.stages[0].args:
            needs.append((("stages", 0, "args"), "set max_steps: the number of local training steps per round."))
        if self.partition.by == "category" and recipe.data.instructions is None:
            needs.append((("federated", "partition", "by"), "partitions by category deal out the examples of "
                          "data.instructions; add that section (or partition by user_group)."))
        return needs
