"""`llmrec federate RECIPE`: a federated run on Flower, and what it leaves in the run directory.

```
<output_dir>/<name>/
  recipe.yaml, status.json, base/     as for `llmrec train`
  federated/round-NNNN/               the global tensors after round N (global.safetensors) and its record
  rounds.jsonl                        one line per round: metrics, per-client train and eval figures, bytes,
                                      accepted / rejected (with reasons) / failed / timed-out clients
  clients/client-K/                   each simulated client's private tensors (what its rule never uploads)
  final/                              the global adapter as a stock PEFT LoRA adapter, with the tokenizer
  metrics.json, curves.png, README.md the final global and local metrics, the curves over rounds, the card
```

The simulation engine (Ray) runs `federated.num_clients` virtual SuperNodes on this machine, started in process
with `flwr.simulation.run_simulation` (deprecated in Flower 1.42 in favour of `flwr run`, which needs a SuperLink
process and a Flower configuration file; the in-process call keeps `llmrec federate` one command). The same apps
run under a SuperLink and SuperNodes (`llmrec.federated.app`, docs/federated-deployment.md). Rerunning the command
resumes after the newest complete round; a complete run only prints its metrics.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir, atomic_save_file, read_json, write_json, write_text
from llmrec.logs import get_logger
from llmrec.rundir import ROUND_RECORD

from .client import EMPTY, initial_model, latest_private, load_adapter_state, lora_scaling
from .rules import build_rule, module_of

logger = get_logger(__name__)

ROUND_STATE = "global.safetensors"


def _run_dir(recipe):
    from llmrec.rundir import RunDir

    return RunDir(recipe.run_dir)


def round_dir(run, server_round: int) -> Path:
    return run.path / "federated" / f"round-{server_round:04d}"


def completed_rounds(run) -> list[int]:
    folder = run.path / "federated"
    rounds = ([int(p.name.split("-")[1]) for p in folder.glob("round-*") if (p / ROUND_RECORD).is_file()]
              if folder.is_dir() else [])
    return sorted(rounds)


def with_absolute_paths(recipe):
    """The recipe with a local model folder made absolute: clients run in other working directories (Ray workers)
    or on other machines (where a missing folder then fails with its full path)."""
    folder = Path(recipe.model.name).expanduser()
    if folder.is_dir():
        recipe = recipe.model_copy(deep=True)
        recipe.model.name = str(folder.resolve())
    return recipe


def prepare(recipe, overwrite: bool = False):
    """The run directory, refusing one that holds a different recipe; its recipe.yaml is written by `start` once
    the model has loaded, so a recipe that cannot start leaves nothing to be refused later."""
    from llmrec.rundir import start_over

    run = _run_dir(recipe)
    if run.path.exists() and (overwrite or start_over(run, recipe)):
        if overwrite:
            logger.info(f"Removing {run.path} (--overwrite).")
        shutil.rmtree(run.path)
    return run


def start(run, recipe):
    """(model, tokenizer, initial adapter tensors), building a tiny base into the run directory; then recipe.yaml."""
    loaded = initial_model(recipe, run.base, run.path)
    if not run.recipe_file.is_file():
        write_text(run.recipe_file, recipe.to_yaml())
    return loaded


def serve(recipe, grid) -> None:
    """The ServerApp's work: resume or start, run the rounds, then write the run's results."""
    from safetensors.torch import load_file

    from .server import AdapterStrategy, run_rounds

    recipe = with_absolute_paths(recipe)
    run = prepare(recipe)
    fed = recipe.federated
    random.seed(recipe.run.seed)  # Flower samples clients with Python's random
    model, tokenizer, initial = start(run, recipe)
    run.set_status("running")
    try:
        rule = build_rule(fed.rule, lora_scaling(model))
        done = completed_rounds(run)
        if done:
            global_state = load_file(round_dir(run, done[-1]) / ROUND_STATE)
            global_state.pop(EMPTY, None)
            logger.info(f"Resuming after round {done[-1]} of {fed.rounds}.")
        else:
            global_state = {} if rule.name == "flora" else rule.upload(initial)
        strategy = AdapterStrategy(rule, initial, fed.num_clients, fed.fraction_train, fed.min_train_clients,
                                   fed.max_failure_fraction, fed.max_update_norm)
        config = {"recipe": recipe.to_yaml(), "run-dir": str(run.path.resolve())}

        def on_round(server_round: int, state: dict, record: dict) -> None:
            with atomic_dir(round_dir(run, server_round)) as tmp:
                atomic_save_file(state or {EMPTY: torch.zeros(0)}, tmp / ROUND_STATE)
                write_json(tmp / ROUND_RECORD, record)

        first = done[-1] + 1 if done else 1
        if first <= fed.rounds:
            global_state = run_rounds(strategy, grid, fed.rounds, global_state, first, config, fed.round_timeout,
                                      on_round)
        records = [read_json(round_dir(run, r) / ROUND_RECORD) for r in completed_rounds(run)]
        finish(run, recipe, rule, model, tokenizer, initial, global_state, records)
    except BaseException as err:
        run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise


def federate(recipe, overwrite: bool = False) -> dict:
    """Run `recipe` with Flower's simulation engine: `federated.num_clients` virtual clients on this machine."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from .app import client_app

    recipe = with_absolute_paths(recipe)
    run = prepare(recipe, overwrite)
    if run.is_complete():
        logger.info(f"{run.path} is already complete; its metrics:")
        print_summary(run.metrics(), recipe)
        return run.metrics()
    fed = recipe.federated
    start(run, recipe)  # a tiny base model is built once here, so the virtual clients only load it
    server_app = ServerApp()
    failure: list[BaseException] = []

    @server_app.main()
    def main(grid, context) -> None:
        try:
            serve(recipe, grid)
        except BaseException as err:  # Flower logs and re-raises a generic error; keep ours for the CLI
            failure.append(err)
            raise

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's future default; silences its warning
    sim = fed.simulation
    backend = {"client_resources": {"num_cpus": sim.client_cpus, "num_gpus": sim.client_gpus},
               "init_args": {"num_cpus": sim.num_cpus or os.cpu_count(), "logging_level": "ERROR",
                             "include_dashboard": False}}
    logger.info(f"Federated run ({fed.rule}): {fed.num_clients} simulated clients, {fed.rounds} rounds.")
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=fed.num_clients,
                       backend_config=backend)
    except BaseException:
        if failure:
            raise failure[0] from None
        raise
    if failure:
        raise failure[0]
    if not run.is_complete():
        raise LLMRecError("the simulation ended before the server finished; see the log above.", str(run.path))
    return run.metrics()


# --- results -----------------------------------------------------------------------------------------------------


def finish(run, recipe, rule, model, tokenizer, initial, global_state, records: list[dict]) -> None:
    """final/ (the global adapter as a stock PEFT LoRA), metrics.json, curves.png, the card; status complete."""
    with atomic_dir(run.final) as tmp:
        export_global(rule, model, initial, global_state, tmp)
        tokenizer.save_pretrained(tmp)
    metrics = summarise(records, recipe)
    draw_rounds(run.curves, records, recipe)
    write_text(run.card, card(recipe, metrics, records))
    shutil.copyfile(run.card, run.final / "README.md")
    write_text(run.path / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_json(run.metrics_file, metrics)
    run.set_status("complete")
    print_summary(metrics, recipe)


def export_global(rule, model, initial: dict, global_state: dict, folder: Path) -> None:
    """The global adapter as a stock PEFT LoRA adapter (FLoRA: its stack as one LoRA of the stacked rank, scale 1;
    FedLoRA: A and B materialised with the server's magnitudes)."""
    from peft import LoraConfig

    if rule.name == "flora":
        if not global_state:
            raise LLMRecError("no round finished, so there is no global adapter to export.", "federated.rounds")
        rank = next(t.shape[0] for n, t in global_state.items() if n.endswith("lora_A.weight"))
        modules = sorted({module_of(name).rsplit(".", 1)[-1] for name in global_state})
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, task_type="CAUSAL_LM",
                            base_model_name_or_path=model.peft_config["default"].base_model_name_or_path)
        config.save_pretrained(str(folder))
        atomic_save_file({n: t.contiguous() for n, t in global_state.items()}, folder / "adapter_model.safetensors")
        return
    load_adapter_state(model, {**initial, **global_state})
    if rule.adapter == "fedlora":
        model.to_peft_lora(folder)
    else:
        model.save_pretrained(str(folder), safe_serialization=True)


def export_client(run, recipe, folder: Path, client: int | None) -> str:
    """Write a federated run's global adapter (client None) or client `client`'s personal one, as stock PEFT LoRA,
    into `folder`; returns what it is, in words. `llmrec.publish.export.export_peft_lora` calls it inside its
    atomic folder and then makes the export portable (base, tokenizer, README)."""
    from safetensors.torch import load_file

    done = completed_rounds(run)
    if not run.is_complete() or not done:
        raise LLMRecError("the federated run is not complete; rerun `llmrec federate` first.", str(run.path))
    if client is not None and not 0 <= client < recipe.federated.num_clients:
        raise LLMRecError(f"clients are 0..{recipe.federated.num_clients - 1}.", "--client")
    model, _, initial = initial_model(recipe, run.base, run.path)
    rule = build_rule(recipe.federated.rule, lora_scaling(model))
    global_state = load_file(round_dir(run, done[-1]) / ROUND_STATE)
    global_state.pop(EMPTY, None)
    if client is not None and rule.personal:
        work_dir = run.path / "clients" / f"client-{client}"
        private = latest_private(work_dir, done[-1] + 1)
        if private is None:
            raise LLMRecError(f"client {client} kept no tensors in {work_dir} (it never trained, or ran on another "
                              "machine: export there).", "--client")
        initial = {**initial, **private}
    export_global(rule, model, initial, global_state, folder)
    fed = recipe.federated
    if client is None:
        what = "the global adapter"
    elif rule.personal:
        what = f"client {client}'s personal adapter (the global tensors and the tensors its rule kept on the client)"
    else:
        what = f"client {client}'s adapter, which is the global adapter ({fed.rule} keeps nothing on the clients)"
    return f"{what} of a federated run ({fed.rule}, {fed.num_clients} clients, after round {done[-1]})"


def summarise(records: list[dict], recipe) -> dict:
    """metrics.json: the last round's pooled metrics, communication per round, and what went wrong."""
    last = records[-1]
    trained = [r for r in records if r["round"] > 0]
    metrics = {f"test/{k}": v for k, v in last["metrics"].items()}
    metrics.update({f"initial/{k}": v for k, v in records[0]["metrics"].items()} if records[0]["round"] == 0 else {})
    if trained:
        metrics["federated/bytes_up_per_round"] = sum(r["bytes_up"] for r in trained) / len(trained)
        metrics["federated/bytes_down_per_round"] = sum(r["bytes_down"] for r in trained) / len(trained)
        metrics["federated/bytes_per_round"] = (metrics["federated/bytes_up_per_round"]
                                                + metrics["federated/bytes_down_per_round"])
        metrics["federated/rejected_updates"] = sum(len(r["rejected"]) for r in trained)
        metrics["federated/failed_clients"] = sum(len(r["failed"]) + r["timed_out"] for r in trained)
        metrics["federated/seconds_per_round"] = sum(r.get("seconds", 0.0) for r in trained) / len(trained)
    metrics.update({"federated/rounds": len(trained), "federated/clients": recipe.federated.num_clients,
                    "federated/rule": recipe.federated.rule, "run/seed": recipe.run.seed})
    return metrics


def draw_rounds(path: Path, records: list[dict], recipe) -> None:
    """Global and local exact match and loss over rounds, and the bytes each round moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in records]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for axis, metric in zip(axes[:2], ("exact_match", "loss")):
        for scope, style in (("global", "-o"), ("local", "--s")):
            axis.plot(rounds, [r["metrics"][f"{scope}_{metric}"] for r in records], style, label=f"{scope} adapter")
        axis.set_xlabel("round")
        axis.set_title(f"test {metric.replace('_', ' ')} (pooled over clients)")
        axis.legend()
    trained = [r for r in records if r["round"] > 0]
    axes[2].bar([r["round"] - 0.2 for r in trained], [r["bytes_up"] / 1e6 for r in trained], 0.4, label="up")
    axes[2].bar([r["round"] + 0.2 for r in trained], [r["bytes_down"] / 1e6 for r in trained], 0.4, label="down")
    axes[2].set_xlabel("round")
    axes[2].set_title("communication (MB)")
    axes[2].legend()
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{recipe.run.name}: {recipe.federated.rule}, {recipe.federated.num_clients} clients")
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


def card(recipe, metrics: dict, records: list[dict]) -> str:
    from llmrec.versions import library_versions

    from .rules import RULES

    fed = recipe.federated
    lines = [f"# {recipe.run.name}", "",
             f"A {recipe.adapter.method} adapter of `{recipe.model.name}` trained by federated learning on Flower: "
             f"{RULES[fed.rule]}; {fed.num_clients} clients, {fed.rounds} rounds, "
             f"{recipe.stages[0].args.get('max_steps', '?')} local steps per round; data dealt to clients by "
             f"{fed.partition.by} with Dirichlet alpha {fed.partition.alpha}.", "",
             "`final/` is the global adapter as a stock PEFT LoRA adapter. Local = each client's personal adapter "
             "(global tensors + the tensors it never uploads) on its own test split; global = the global adapter "
             "on every client's test split; both pooled over clients.", "",
             "| round | global exact match | local exact match | global loss | local loss | MB up | MB down |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        m = r["metrics"]
        lines.append(f"| {r['round']} | {m['global_exact_match']:.4f} | {m['local_exact_match']:.4f} | "
                     f"{m['global_loss']:.4f} | {m['local_loss']:.4f} | {r['bytes_up'] / 1e6:.3f} | "
                     f"{r['bytes_down'] / 1e6:.3f} |")
    rejected = metrics.get("federated/rejected_updates", 0)
    failed = metrics.get("federated/failed_clients", 0)
    lines += ["", f"Rejected updates: {rejected}; failed or timed-out clients: {failed} (details in rounds.jsonl).",
              "", "Library versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()), ""]
    return "\n".join(lines)


def print_summary(metrics: dict, recipe) -> None:
    print(f"\nfederated {recipe.federated.rule}: {recipe.federated.num_clients} clients, "
          f"{metrics.get('federated/rounds')} rounds; pooled over the clients' test rows:")
    print(f"{'':<10}{'exact_match':>13}{'rouge_l':>10}{'loss':>10}")
    for scope in ("global", "local"):
        print(f"{scope:<10}" + "".join(f"{metrics.get(f'test/{scope}_{m}', float('nan')):>{w}.4f}"
                                       for m, w in (("exact_match", 13), ("rouge_l", 10), ("loss", 10))))
    if "initial/global_exact_match" in metrics:
        print(f"{'initial':<10}{metrics['initial/global_exact_match']:>13.4f}{metrics['initial/global_rouge_l']:>10.4f}"
              f"{metrics['initial/global_loss']:>10.4f}")
    if "federated/bytes_per_round" in metrics:
        print(f"communication: {metrics['federated/bytes_up_per_round'] / 1e6:.3f} MB up, "
              f"{metrics['federated/bytes_down_per_round'] / 1e6:.3f} MB down per round; "
              f"{metrics['federated/rejected_updates']} updates rejected, "
              f"{metrics['federated/failed_clients']} clients failed")
