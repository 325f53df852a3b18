"""The `llmrec` command line: thin commands over the library.

    llmrec train RECIPE [key=value ...] [--overwrite]          run a recipe (resumes an interrupted run)
    llmrec federate RECIPE [key=value ...] [--overwrite]       a federated recipe on Flower's simulation engine
    llmrec eval RUN_DIR [--split SPLIT]                        evaluate a finished run again
    llmrec recommend RUN_DIR --user USER_ID [-k 10] [--engine transformers|vllm]
                                                               top-K items for one user (ranking runs)
    llmrec export RUN_DIR OUT [--to peft-lora|peft-prompt-tuning] [--user U [--item I] | --client K]
                                                               the trained adapter in a stock PEFT format
    llmrec push RUN_DIR REPO_ID [--private] [--revision BRANCH] [--user U [--item I] | --client K]
                [--include-base] [--license ID] [--commit-message M] [--dry-run]
                                                               publish the run on the Hugging Face Hub
    llmrec merge RUN_DIR RUN_DIR [...] --method M [--weights W,W,...] [--density D] [--rank R]
                 [--granularity task|layer --steps N] [--surgery-steps N] OUT
    llmrec merge MERGE_RECIPE [key=value ...]                 the same from a recipe (recipes/merging/*.yaml)
                                                               LoRA runs on one base merged into a new run
    llmrec serve RUN_DIR [RUN_DIR ...] [--host H] [--port N] [--gpu-memory-utilization F] [--dry-run] [-- VLLM_ARGS]
                                                               vLLM's OpenAI server with each run's adapter,
                                                               and POST /v1/recommend (llmrec.serve.recommend)
    llmrec recipe check|show RECIPE [key=value ...] [--all]    validate, or print the resolved recipe
    llmrec data stats RECIPE [key=value ...]                   counts per split and an example row

RUN_DIR may be `hf://owner/repo[@revision]` for `eval`, `recommend` and `export`: a pushed run, fetched through
huggingface_hub's cache (`eval` then prints the metrics and writes nothing).

Many processes: `accelerate launch --config_file accelerate_configs/ddp.yaml -m llmrec train RECIPE`.
Mistakes in the input print one paragraph naming the place and exit with status 2; `--debug` adds the traceback.
What a command does for a task (rows, evaluation, tables, recommendations) is the task's (`llmrec.tasks`).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.logs import get_logger, setup_logging

logger = get_logger(__name__)


DEBUG_HELP = "show tracebacks, debug logs, and the libraries' progress bars and warnings"


class _Commands:
    """`add_parser` that gives every (sub)command the `--debug` flag, so it may follow the command too."""

    def __init__(self, subparsers):
        self.subparsers = subparsers

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        parser = self.subparsers.add_parser(name, **kwargs)
        # SUPPRESS: absent after the command, it leaves the value `llmrec --debug` set
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description="Fine-tune and align LLMs for recommendation.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = _Commands(parser.add_subparsers(dest="command", required=True))

    train = commands.add_parser("train", help="run a recipe (resumes an interrupted run)")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")

    federate = commands.add_parser("federate", help="run a federated recipe on Flower's simulation engine (resumes)")
    federate.add_argument("recipe")
    federate.add_argument("overrides", nargs="*", metavar="key=value")
    federate.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")

    evaluate = commands.add_parser("eval", help="evaluate a finished run again")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=["test", "valid", "ood_popularity", "ood_temporal", "ood_environment"],
                          default=None,
                          help="one split (default: every split of the recipe's eval.splits)")

    recommend = commands.add_parser("recommend", help="top-K items for a user of a finished run, or for a history")
    recommend.add_argument("run_dir")
    who = recommend.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user of the run's data")
    who.add_argument("--history", nargs="+", metavar="ITEM", help="a new user's items, oldest first (ids or titles)")
    recommend.add_argument("-k", type=int, default=10, help="how many items (the top k of the evaluation's ranking)")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    recommend.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                           help="rank with the model in this process, or on an in-process vLLM engine (the ranking "
                           "`llmrec serve`'s /v1/recommend computes)")

    export = commands.add_parser("export", help="a finished run's adapter in a stock format")
    export.add_argument("run_dir")
    export.add_argument("--to", choices=["peft-lora", "peft-prompt-tuning"], default="peft-lora",
                        help="the format: a PEFT LoRA adapter (LoRA, CoRA) or prompt-tuning adapter (EPT, LAMP)")
    export.add_argument("--user", help="CoRA: the user whose weights are materialised")
    export.add_argument("--item", help="CoRA conditioned on (user, item): the item")
    export.add_argument("--client", type=int, help="a federated run: this client's personal adapter (default: the "
                        "global one)")
    export.add_argument("out", help="the new adapter folder")

    push = commands.add_parser("push", help="publish a finished run on the Hugging Face Hub (one commit)")
    push.add_argument("run_dir")
    push.add_argument("repo_id", help="owner/name on the Hub")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="the branch to commit to (created from main when missing)")
    push_who = push.add_mutually_exclusive_group()
    push_who.add_argument("--user", help="CoRA: publish this user's weights as a stock PEFT LoRA adapter")
    push.add_argument("--item", help="CoRA conditioned on (user, item): the item")
    push_who.add_argument("--client", type=int, help="a federated run: this client's personal adapter")
    push.add_argument("--include-base", action="store_true",
                      help="also upload a base model that is on no Hub (a tiny: preset or a local folder) as base/")
    push.add_argument("--license", help="the licence id for the card (default: other)")
    push.add_argument("--commit-message", help="the commit message")
    push.add_argument("--dry-run", action="store_true", help="list the files and print the card; contact nothing")

    merge = commands.add_parser("merge", help="merge finished LoRA runs on one base into a new, evaluated run")
    merge.add_argument("paths", nargs="+", metavar="RUN_DIR ... OUT",
                       help="two or more finished LoRA runs, then the new run directory; or a merge recipe "
                       "(recipes/merging/*.yaml) and key=value overrides")
    merge.add_argument("--method", choices=["task_arithmetic", "ties", "dare_linear", "dare_ties",
                                                           "svd", "cat", "adamerging"])
    merge.add_argument("--weights", help="one weight per run, comma-separated, e.g. 0.7,0.3 (default: 1 each)")
    merge.add_argument("--density", type=float, help="ties, dare_*: the share of each task vector kept")
    merge.add_argument("--rank", type=int, help="the merged rank (default: the sum of the ranks, exact)")
    merge.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops and AdaMerging's batches")
    merge.add_argument("--granularity", choices=["task", "layer"], default="task",
                       help="adamerging: one λ per run, or per run and LoRA layer")
    merge.add_argument("--steps", type=int, default=100, help="adamerging: Adam steps on unlabelled prompts")
    merge.add_argument("--lr", type=float, default=1e-3, help="adamerging: Adam's learning rate for λ")
    merge.add_argument("--init", type=float, default=0.3, help="adamerging: the starting λ")
    merge.add_argument("--surgery-steps", type=int, help="also train a Representation Surgery module per endpoint "
                       "(each input a different task or data) for this many steps")
    merge.add_argument("--surgery-rank", type=int, default=16, help="the Surgery modules' bottleneck width")

    serve = commands.add_parser("serve", help="vLLM's OpenAI-compatible server with the runs' adapters (multi-LoRA)")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished runs on one base model")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--gpu-memory-utilization", type=float, dest="memory_share",
                       help="vLLM's memory share (default: vLLM's on a GPU; 0.25 of the RAM on the CPU build)")
    serve.add_argument("--dry-run", action="store_true", help="print the vLLM command and the adapters; start nothing")

    recipe = commands.add_parser("recipe", help="check or print a recipe")
    recipe_commands = _Commands(recipe.add_subparsers(dest="recipe_command", required=True))
    for name, text in (("check", "validate without running"), ("show", "print the resolved recipe with defaults")):
        sub = recipe_commands.add_parser(name, help=text)
        sub.add_argument("recipe")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "show":
            sub.add_argument("--all", action="store_true", help="also list every field of each stage's TRL config, "
                             "and describe every key in a comment above it")
        else:
            sub.add_argument("--deep", action="store_true", help="also check the world: the data files load, the "
                             "model is available offline, the optional libraries are installed")

    data = commands.add_parser("data", help="inspect a recipe's data")
    data_commands = _Commands(data.add_subparsers(dest="data_command", required=True))
    stats = data_commands.add_parser("stats", help="load, filter and split the data; print counts and a prompt")
    stats.add_argument("recipe")
    stats.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = argv[argv.index("--") + 1:] if "--" in argv else []  # `llmrec serve ... -- VLLM_ARGS`
    args, extra = parser.parse_known_args(argv[:len(argv) - len(passed_on) - (1 if "--" in argv else 0)])
    if passed_on and args.command != "serve":
        parser.error("arguments after -- are passed to vLLM by `llmrec serve` only")
    args.passed_on = passed_on
    if extra and args.command == "merge" and not any(e.startswith("-") for e in extra):
        args.paths += extra  # argparse takes one run of positionals; OUT may follow the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    setup_logging(args.debug)
    try:
        _dispatch(args)
    except LLMRecError as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Leave a launched process group cleanly (torch warns about leaked resources otherwise)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "recipe":
        _recipe_command(args)
    elif args.command == "data":
        _data_stats(args)
    elif args.command == "train":
        from llmrec.recipe import load_recipe
        from llmrec.run import train

        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.federated is not None:
            raise LLMRecError("this recipe has a federated section; run it with `llmrec federate`.", args.recipe)
        train(recipe, overwrite=args.overwrite)
    elif args.command == "federate":
        _federate(args)
    elif args.command == "eval":
        _eval(args)
    elif args.command == "recommend":
        _recommend(args)
    elif args.command == "export":
        _export(args)
    elif args.command == "merge":
        _merge(args)
    elif args.command == "serve":
        _serve(args)
    elif args.command == "push":
        from llmrec.publish.push import push

        if args.item and not args.user:
            raise LLMRecError("--item needs --user (CoRA conditioned on a user-item pair).", "--item")
        print(push(args.run_dir, args.repo_id, private=args.private, revision=args.revision, user=args.user,
                   item=args.item, client=args.client, commit_message=args.commit_message, dry_run=args.dry_run,
                   include_base=args.include_base, license=args.license))


def _federate(args: argparse.Namespace) -> None:
    from llmrec.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.federated is None:
        raise LLMRecError("this recipe has no federated section (rule, clients, rounds); run it with `llmrec train`.",
                          args.recipe)
    try:
        from llmrec.federated.run import federate
    except ImportError as err:
        raise LLMRecError(f"federated runs need Flower's simulation engine: pip install 'llmrec[flower]' ({err}).",
                          "federated") from None
    federate(recipe, overwrite=args.overwrite)


def _recipe_command(args: argparse.Namespace) -> None:
    from llmrec.recipe import all_stage_fields, dump_yaml, dump_yaml_with_comments, field_descriptions, load_recipe

    if args.recipe_command == "check" and _is_merge_recipe(args.recipe):
        from llmrec.merging.recipe import load_merge_recipe

        recipe, merge, _, _ = load_merge_recipe(args.recipe, args.overrides)
        for source in recipe.inputs:  # input recipes are checked too; run directories are checked when merged
            if Path(source.split("#")[0]).suffix in (".yaml", ".yml"):
                load_recipe(source.split("#")[0])
        print(f"{args.recipe}: ok (merge recipe: {merge.method} of {len(recipe.inputs)} inputs)")
        return
    recipe = load_recipe(args.recipe, args.overrides, deep=getattr(args, "deep", False))
    if args.recipe_command == "check":
        trainers = ", ".join(stage.trainer for stage in recipe.stages) or "none"
        print(f"{args.recipe}: ok ({len(recipe.stages)} stage(s): {trainers})")
        return
    resolved = recipe.to_dict()
    if not args.all:
        print(dump_yaml(resolved), end="")
        return
    for index, stage in enumerate(resolved["stages"]):
        stage["args"] = all_stage_fields(recipe, index)
    print(dump_yaml_with_comments(resolved, field_descriptions(recipe)), end="")


def _is_merge_recipe(path: str) -> bool:
    """Whether `path` is a merge recipe (top-level `inputs` and `merge`) rather than a training recipe."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # load_recipe reports the problem with its place
    return isinstance(raw, dict) and "inputs" in raw and "merge" in raw


def _data_stats(args: argparse.Namespace) -> None:
    from llmrec.data import load_data
    from llmrec.recipe import load_recipe
    from llmrec.tasks import task_of

    recipe = load_recipe(args.recipe, args.overrides, instantiate=False)
    if recipe.federated is not None:
        from llmrec.federated.client import partition_stats

        print("\n".join(partition_stats(recipe)))
        return
    task = task_of(recipe)
    data = load_data(recipe.data, recipe.run.seed) if task.uses_interactions else None
    print("\n".join(task.stats(data)))


def _eval(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from llmrec.hub import is_hub_ref
    from llmrec.run import evaluation_task, finish, print_summary
    from llmrec.rundir import load_trained

    recipe, data, model, tokenizer, run = load_trained(args.run_dir)
    if args.split and args.split.startswith("ood_") and recipe.data.shift(args.split.removeprefix("ood_")) is None:
        raise LLMRecError(f"this run's data have no {args.split.removeprefix('ood_')} shift (see data.shifts).",
                          "--split")
    task = evaluation_task(recipe, run.path)
    metrics, predictions = {}, {}
    for split in [args.split] if args.split else recipe.eval.splits:
        split_metrics, predictions[split] = task.evaluate(model, tokenizer, data, split)
        metrics.update(split_metrics)
    if not PartialState().is_main_process:
        return
    if is_hub_ref(args.run_dir):  # a published run is read-only: print its metrics, write nothing
        print_summary(metrics, recipe, list(predictions))
    else:
        finish(run, recipe, data, metrics, predictions)


def _recommend(args: argparse.Namespace) -> None:
    import json

    from llmrec.rundir import load_trained
    from llmrec.tasks import task_of

    if args.k < 1:
        raise LLMRecError("must be at least 1.", "-k")
    recipe, data, model, tokenizer, run = load_trained(args.run_dir)
    llm = lora_request = None
    if args.engine == "vllm":
        from llmrec.serve.engine import offline_engine

        llm, lora_request = offline_engine(run.path)
    result = task_of(recipe).recommend(model, tokenizer, data, args.k, args.user, args.history, llm, lora_request)
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
        return
    history = result["history"]
    who = f"user {args.user}" if args.user else "the given history"
    print(f"{who}: {len(history)} interactions; last: {history[-1]['title'] if history else '-'}")
    print(f"{'rank':>4}  {'item_id':<12} {'log-prob':>9}  title")
    for row in result["ranked"]:
        print(f"{row['rank']:>4}  {row['item_id']:<12} {row['logprob']:>9.3f}  {row['title']}")


def _merge(args: argparse.Namespace) -> None:
    from llmrec.merging import AdaMergingConfig, MergeConfig
    from llmrec.merging.recipe import run_merge_recipe
    from llmrec.merging.runs import merge_runs
    from llmrec.merging.surgery import SurgeryConfig

    if args.paths[0].endswith((".yaml", ".yml")):
        if args.method:
            raise LLMRecError("a merge recipe sets merge.method; override it as merge.method=...", "--method")
        print(run_merge_recipe(args.paths[0], args.paths[1:]))
        return
    if not args.method:
        raise LLMRecError("choose how to merge: --method task_arithmetic, ties, dare_linear, dare_ties, svd, cat "
                          "or adamerging (or give a merge recipe).", "--method")
    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    except ValueError:
        raise LLMRecError(f"{args.weights!r} is not a comma-separated list of numbers.", "--weights") from None
    config = MergeConfig(method=args.method, weights=weights, density=args.density, rank=args.rank,
                         seed=args.seed)
    adamerging = AdaMergingConfig(granularity=args.granularity, init=args.init, steps=args.steps,
                                  learning_rate=args.lr, seed=args.seed)
    *runs, out = args.paths
    surgery = (SurgeryConfig(rank=args.surgery_rank, steps=args.surgery_steps, seed=args.seed)
               if args.surgery_steps else None)
    print(merge_runs(runs, out, config, adamerging, surgery))


def _serve(args: argparse.Namespace) -> None:
    import shlex

    from llmrec.serve import plan_serving, serve

    plan = plan_serving(args.run_dirs, args.host, args.port, args.memory_share, args.passed_on)
    if args.dry_run:
        for name, folder in plan.adapters.items():
            print(f"adapter {name}: {folder}")
        for name, spec in plan.per_user.items():
            print(f"per-user adapters {name}@<user>: {spec['run']} (exported on first request into {spec['cache']})")
        environment = [f"{key}={shlex.quote(value)}" for key, value in plan.environment().items()]
        print(shlex.join(plan.command()) if not environment else " ".join([*environment, shlex.join(plan.command())]))
        return
    serve(plan)


def _export(args: argparse.Namespace) -> None:
    from llmrec.publish.export import export_peft_lora, export_peft_prompt_tuning

    if args.to == "peft-prompt-tuning":
        print(export_peft_prompt_tuning(args.run_dir, args.out))
    else:
        print(export_peft_lora(args.run_dir, args.out, args.user, args.item, args.client))
