"""The `llmrec` command line.

    llmrec train RECIPE [key=value ...] [--overwrite]
    llmrec federate RECIPE [key=value ...] [--overwrite]
    llmrec eval RUN_DIR [--split test|valid]
    llmrec recommend RUN_DIR --user USER_ID [-k 10]
    llmrec recipe check|show RECIPE [key=value ...] [--all]
    llmrec data stats RECIPE [key=value ...]

Many processes: `accelerate launch --config_file accelerate_configs/ddp.yaml -m llmrec train RECIPE`.
Mistakes in the input print one paragraph naming the place and exit with status 2; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from llmrec.errors import LLMRecError, did_you_mean
from llmrec.logs import get_logger, setup_logging

logger = get_logger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmrec", description="Fine-tune and align LLMs for recommendation.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

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
    evaluate.add_argument("--split", choices=["test", "valid", "ood_popularity", "ood_temporal", "ood_environment"], default=None,
                          help="one split (default: every split of the recipe's eval.splits)")

    recommend = commands.add_parser("recommend", help="top-K items for one user of a finished run")
    recommend.add_argument("run_dir")
    recommend.add_argument("--user", required=True)
    recommend.add_argument("-k", type=int, default=10)

    export = commands.add_parser("export", help="a finished run's adapter in a stock format")
    export.add_argument("run_dir")
    export.add_argument("--to", choices=["peft-lora", "peft-prompt-tuning"], default="peft-lora",
                        help="the format: a PEFT LoRA adapter (LoRA, CoRA) or prompt-tuning adapter (EPT, LAMP)")
    export.add_argument("--user", help="CoRA: the user whose weights are materialised")
    export.add_argument("--item", help="CoRA conditioned on (user, item): the item")
    export.add_argument("--client", type=int, help="a federated run: this client's personal adapter (default: the "
                        "global one)")
    export.add_argument("out", help="the new adapter folder")

    recipe = commands.add_parser("recipe", help="check or print a recipe")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True)
    for name, text in (("check", "validate without running"), ("show", "print the resolved recipe with defaults")):
        sub = recipe_commands.add_parser(name, help=text)
        sub.add_argument("recipe")
        sub.add_argument("overrides", nargs="*", metavar="key=value")
        if name == "show":
            sub.add_argument("--all", action="store_true", help="also list every field of each stage's TRL config")

    data = commands.add_parser("data", help="inspect a recipe's data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    stats = data_commands.add_parser("stats", help="load, filter and split the data; print counts and a prompt")
    stats.add_argument("recipe")
    stats.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        from llmrec.publish.export import export_peft_lora, export_peft_prompt_tuning

        if args.to == "peft-prompt-tuning":
            print(export_peft_prompt_tuning(args.run_dir, args.out))
        else:
            print(export_peft_lora(args.run_dir, args.out, args.user, args.item, args.client))


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
    from llmrec.recipe import all_stage_fields, dump_yaml, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.recipe_command == "check":
        print(f"{args.recipe}: ok ({len(recipe.stages)} stage(s): {', '.join(s.trainer for s in recipe.stages) or 'none'})")
        return
    resolved = recipe.to_dict()
    if args.all:
        for index, stage in enumerate(resolved["stages"]):
            stage["args"] = all_stage_fields(recipe, index)
    print(dump_yaml(resolved), end="")


def _data_stats(args: argparse.Namespace) -> None:
    from llmrec.data import load_data, next_item_examples
    from llmrec.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides, instantiate=False)
    if recipe.federated is not None:
        _federated_stats(recipe)
        return
    if recipe.data.classification is not None:  # its rows do not come from the interactions
        _classification_stats(recipe)
        return
    if recipe.data.reasoning is not None:
        _reasoning_stats(recipe)
        return
    data = load_data(recipe.data, recipe.run.seed)
    if recipe.data.summaries is not None:
        _summaries_stats(recipe, data)
        return
    for key, value in data.stats().items():
        print(f"{key:>20}: {value}")
    if recipe.data.ctr is not None:
        from llmrec.data import ctr_examples

        train = ctr_examples(data, "train", recipe.data.ctr, recipe.run.seed)
        print(f"{'train CTR rows':>20}: {len(train)} ({sum(train['label'])} liked)")
    else:
        train = next_item_examples(data, "train", recipe.data.task)
        print(f"{'train examples':>20}: {len(train)}")
    if len(train):
        print("\nexample prompt:\n" + train[0]["prompt"] + "\nexample completion:\n" + train[0]["completion"])


def _federated_stats(recipe) -> None:
    from collections import Counter

    from llmrec.federated.client import client_rows

    fed = recipe.federated
    print(f"{'rule':>20}: {fed.rule}")
    print(f"{'partition':>20}: by {fed.partition.by}, Dirichlet alpha {fed.partition.alpha}")
    example = None
    for client in range(fed.num_clients):
        train, test = client_rows(recipe, client)
        counts = Counter(row["category"] for row in train + test)
        shown = ", ".join(f"{name} {n}" for name, n in counts.most_common(3))
        top_share = counts.most_common(1)[0][1] / (len(train) + len(test))
        print(f"{'client ' + str(client):>20}: {len(train)} train, {len(test)} test rows; {len(counts)} categories, "
              f"top share {top_share:.2f} ({shown}{', ...' if len(counts) > 3 else ''})")
        example = example or train[0]
    print("\nexample prompt:\n" + example["prompt"] + "\nexample completion:\n" + example["completion"])


def _classification_stats(recipe) -> None:
    from collections import Counter

    from llmrec.data import classification_examples

    config = recipe.data.classification
    print(f"{'task':>20}: {config.name}")
    for split in ("train", "valid", "test"):
        rows = classification_examples(config, split, recipe.run.seed)
        counts = Counter(rows["label"])
        print(f"{split + ' rows':>20}: {len(rows)} ("
              + ", ".join(f"{counts[k]} {word.strip()!r}" for k, word in enumerate(config.label_words)) + ")")
    train = classification_examples(config, "train", recipe.run.seed)
    print("\nexample prompt:\n" + train[0]["prompt"] + "\nexample completion:\n" + train[0]["completion"])


def _reasoning_stats(recipe) -> None:
    from collections import Counter

    from llmrec.data import reasoning_examples

    config = recipe.data.reasoning
    print(f"{'source':>20}: {config.source}")
    for split in ("train", "valid", "test"):
        rows = reasoning_examples(config, split, recipe.run.seed)
        levels = Counter(rows["level"])
        print(f"{split + ' problems':>20}: {len(rows)}" + (" (levels " + ", ".join(f"{k}: {levels[k]}" for k in sorted(levels)) + ")"
                                                             if len(rows) else ""))
    rows = reasoning_examples(config, "train", recipe.run.seed)
    rows = rows if len(rows) else reasoning_examples(config, "test", recipe.run.seed)
    print("\nexample prompt:\n" + rows[0]["prompt"] + "\nexample completion:\n" + rows[0]["completion"])


def _summaries_stats(recipe, data) -> None:
    from llmrec.data.preference_summaries import format_prompt, summary_users

    config = recipe.data.summaries
    for split in ("train", "valid", "test"):
        users = summary_users(config, recipe.run.seed, split, data)
        counts = [len(u.behaviours) for u in users]
        print(f"{split + ' users':>20}: {len(users)}" + (f" ({min(counts)}-{max(counts)} behaviours each)" if counts else ""))
    if config.ood is not None:
        print(f"{'out-of-domain users':>20}: {len(summary_users(config, recipe.run.seed, 'test', data, ood=True))}")
    user = summary_users(config, recipe.run.seed, "train", data)[0]
    print("\nexample prompt (part 1 of a training user):\n" + format_prompt(None, user.parts(config.behaviours.fractions)[0]))


def _eval(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from llmrec.run import evaluate_split, finish, load_trained

    recipe, data, model, tokenizer, run = load_trained(args.run_dir)
    if args.split and args.split.startswith("ood_") and recipe.data.shift(args.split.removeprefix("ood_")) is None:
        raise LLMRecError(f"this run's data have no {args.split.removeprefix('ood_')} shift (see data.shifts).", "--split")
    metrics, predictions = {}, {}
    for split in [args.split] if args.split else recipe.eval.splits:
        split_metrics, predictions[split] = evaluate_split(model, tokenizer, data, recipe, split)
        metrics.update(split_metrics)
    if PartialState().is_main_process:
        finish(run, recipe, data, metrics, predictions)


def _recommend(args: argparse.Namespace) -> None:
    from llmrec.data.tasks import format_prompt
    from llmrec.eval.ranking import build_trie, rank_with_model
    from llmrec.run import load_trained

    if args.k < 1:
        raise LLMRecError("must be at least 1.", "-k")
    recipe, data, model, tokenizer, _ = load_trained(args.run_dir)
    if recipe.eval.task != "ranking":
        raise LLMRecError(f"this run is evaluated on eval.task: {recipe.eval.task}, it does not rank items; use `llmrec eval`.",
                          args.run_dir)
    sequences = data.user_sequences()
    if args.user not in sequences:
        raise LLMRecError(
            f"user {args.user!r} has no interactions in this run's data ({len(sequences)} users, e.g. "
            f"{', '.join(list(sequences)[:3])}).{did_you_mean(args.user, sequences)}",
            "--user",
        )
    history = [item for item, _ in sequences[args.user]]
    trie = build_trie(tokenizer, data, recipe.data.task)
    k = min(args.k, trie.available(trie.banned_counts(history) if recipe.eval.exclude_history else None))
    prompt = format_prompt(recipe.data.task, history, data.titles)
    ranked = rank_with_model(
        model, tokenizer, trie, [prompt], [history] if recipe.eval.exclude_history else None, k, 1, progress=False
    )[0]
    titles = data.titles
    print(f"user {args.user}: {len(history)} interactions; last: {titles[history[-1]]}")
    print(f"{'rank':>4}  {'item_id':<12} {'log-prob':>9}  title")
    for rank, (item, score) in enumerate(ranked[: args.k], start=1):
        print(f"{rank:>4}  {item:<12} {score:>9.3f}  {titles[item]}")

