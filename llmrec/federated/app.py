"""Flower apps: `client_app` (every client, simulation or deployment) and `server_app` (deployment).

The server sends each client the resolved recipe (YAML text), the round and the global tensors; a client needs
nothing else than llmrec installed and its `partition-id` (Flower's node config; the simulation engine sets it).
Optional node config: `work-dir` (where the client keeps its private tensors and, for tiny models, builds its base
model; default `<server run dir>/clients`, which suits clients on the server's machine).

Deployment (`flwr run`, with a SuperLink and SuperNodes; see the README) loads `server_app` with the run config
`recipe` (a path on the server's machine) and optional `overrides` (space-separated key=value).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .client import FederatedClient
from .server import record_of, state_of

client_app = ClientApp()
server_app = ServerApp()

_clients: dict[tuple[str, int, str], FederatedClient] = {}


def _client(message: Message, context: Context) -> FederatedClient:
    """The client of this node, built on first use and kept for later rounds (same process, same recipe)."""
    import torch

    from llmrec.recipe import load_recipe

    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", torch.get_num_threads()))))
    config = message.content["config"]
    text, run_dir = str(config["recipe"]), Path(str(config["run-dir"]))
    client = int(context.node_config["partition-id"])
    work_dir = Path(str(context.node_config.get("work-dir", run_dir / "clients")))
    key = (hashlib.sha256(text.encode()).hexdigest(), client, str(work_dir))
    if key not in _clients:
        _clients.clear()  # one client per process at a time: a Ray actor serves many virtual clients in turn
        recipe_file = work_dir / f"client-{client}" / "recipe.yaml"
        recipe_file.parent.mkdir(parents=True, exist_ok=True)
        recipe_file.write_text(text, encoding="utf-8")
        recipe = load_recipe(recipe_file, instantiate=False)
        base_dir = run_dir / "base" if "work-dir" not in context.node_config else work_dir / "base"
        _clients[key] = FederatedClient(recipe, client, work_dir, base_dir)
    return _clients[key]


@client_app.train()
def train(message: Message, context: Context) -> Message:
    client = _client(message, context)
    server_round = int(message.content["config"]["server-round"])
    upload, metrics = client.train(server_round, state_of(message.content["arrays"]))
    content = RecordDict({"arrays": record_of(upload) if upload else ArrayRecord(),
                          "metrics": MetricRecord({**metrics, "client": client.client})})
    return Message(content=content, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    client = _client(message, context)
    server_round = int(message.content["config"]["server-round"])
    metrics = client.evaluate(state_of(message.content["arrays"]), server_round)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from llmrec.recipe import load_recipe

    from .run import serve

    overrides = str(context.run_config.get("overrides", "")).split()
    recipe = load_recipe(str(context.run_config["recipe"]), overrides)
    serve(recipe, grid)
