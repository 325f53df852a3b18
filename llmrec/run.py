"""Runs a recipe and keeps its run directory.

```
<output_dir>/<name>/
  recipe.yaml        the resolved recipe (what `llmrec recipe show` prints)
  status.json        running / failed (with the error) / complete
  base/              tiny models only: the generated base model and its tokenizer
  checkpoints/
    stage0-sft/
      checkpoint-50/ transformers Trainer checkpoints; only those with llmrec_commit.json are complete
      result/        the model at the end of the stage (adapter or full weights) + log_history.json
  final/             the trained adapter (or model) and tokenizer: what eval, recommend and export load
  predictions/       the ranked items for every evaluated target (JSON Lines)
  metrics.json       written last; its presence with status "complete" means the run finished
  curves.png         training loss and evaluation metrics against the baselines
  README.md          the model card
```

Rerunning the same command resumes: finished stages are skipped (their `result/` is loaded), an unfinished stage
resumes from its newest committed checkpoint (model, optimizer, scheduler, RNG and data order, through
`Trainer.train(resume_from_checkpoint=...)`), and a finished run only reports its metrics. A different recipe for
an existing run directory is refused rather than mixed in.

Checkpoints are atomic: transformers writes `checkpoint-N/` in place, so a kill during a save leaves a partial
folder. After each save every process reaches a barrier and the main process writes `llmrec_commit.json`
(itself atomically); resuming ignores and deletes folders without it. Every other file is written to a
temporary name and renamed. Only the main process writes; the others train and evaluate their share.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from accelerate.utils import is_peft_model
from transformers import PreTrainedModel

from llmrec.adapters import AdapterContext, get_adapter
from llmrec.data import RecData, load_data
from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir, read_json, write_json, write_text
from llmrec.logs import get_logger
from llmrec.recipe import Recipe, load_recipe
from llmrec.trainers import StageContext, get_stage

logger = get_logger(__name__)

COMMIT_MARKER = "llmrec_commit.json"
RESULT_MARKER = "llmrec_stage.json"


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.recipe_file = self.path / "recipe.yaml"
        self.status_file = self.path / "status.json"
        self.metrics_file = self.path / "metrics.json"
        self.base = self.path / "base"
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.predictions = self.path / "predictions"
        self.curves = self.path / "curves.png"
        self.card = self.path / "README.md"

    def status(self) -> dict:
        return read_json(self.status_file) if self.status_file.is_file() else {}

    def is_complete(self) -> bool:
        return self.status().get("state") == "complete" and self.metrics_file.is_file()

    def stage_dir(self, recipe: Recipe, index: int) -> Path:
        return self.checkpoints / recipe.stage_label(index)

    def stage_result(self, recipe: Recipe, index: int) -> Path:
        return self.stage_dir(recipe, index) / "result"

    def stage_done(self, recipe: Recipe, index: int) -> bool:
        return (self.stage_result(recipe, index) / RESULT_MARKER).is_file()

    def set_status(self, state: str, **extra: Any) -> None:
        write_json(self.status_file, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    def metrics(self) -> dict:
        return read_json(self.metrics_file) if self.metrics_file.is_file() else {}


def _wrote(path: Path) -> None:
    logger.info(f"wrote {path}", extra={"all_ranks": True})


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def committed_checkpoint(stage_dir: Path, main_process: bool) -> Path | None:
    """The newest checkpoint with a commit marker; the main process deletes uncommitted ones."""
    best, best_step = None, -1
    for folder in sorted(stage_dir.glob("checkpoint-*")):
        step = folder.name.rsplit("-", 1)[-1]
        if not step.isdigit():
            continue
        if (folder / COMMIT_MARKER).is_file():
            if int(step) > best_step:
                best, best_step = folder, int(step)
        elif main_process:
            logger.warning(f"Removing the incomplete checkpoint {folder} (the run stopped while writing it).")
            shutil.rmtree(folder, ignore_errors=True)
    return best


def _callbacks():
    from transformers import TrainerCallback

    class CommitCheckpoint(TrainerCallback):
        """Mark a checkpoint complete once every process has finished writing it."""

        def on_save(self, args, state, control, **kwargs):
            process = _state()
            process.wait_for_everyone()
            if process.is_main_process:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                write_json(folder / COMMIT_MARKER, {"global_step": state.global_step})

    class StepReport(TrainerCallback):
        """Under several processes, each rank reports its progress (single-process runs have the tqdm bar)."""

        def on_step_end(self, args, state, control, **kwargs):
            if args.world_size > 1 and (state.global_step % max(1, int(args.logging_steps)) == 0 or state.global_step == state.max_steps):
                logger.info(f"finished step {state.global_step}/{state.max_steps}", extra={"all_ranks": True})

    return [CommitCheckpoint(), StepReport()]


def tokenizer_texts(recipe: Recipe, data: RecData):
    """What a tiny model's tokenizer is trained on: the titles, the prompt templates (repeated so their words
    become whole tokens) and, with a classification, reasoning, summary or instruction task, its rows."""
    task = recipe.data.task
    fixed = [task.prompt_template.replace("{history}", task.history_separator.join(["{title}"] * 2))]
    if recipe.data.ctr is not None:
        from llmrec.data import ctr_tokenizer_texts

        fixed += ctr_tokenizer_texts(recipe.data.ctr)

    def texts() -> list[str]:
        rows = []
        if recipe.data.classification is not None:
            from llmrec.data import classification_tokenizer_texts

            rows = classification_tokenizer_texts(recipe.data.classification, recipe.run.seed)
        if recipe.data.reasoning is not None:
            from llmrec.data import reasoning_tokenizer_texts

            rows = reasoning_tokenizer_texts(recipe.data.reasoning, recipe.run.seed)
        if recipe.data.summaries is not None:
            from llmrec.data import summaries_tokenizer_texts

            rows = summaries_tokenizer_texts(recipe.data.summaries, recipe.run.seed, data)
        if recipe.data.instructions is not None:
            from llmrec.data import instruction_tokenizer_texts

            rows = instruction_tokenizer_texts(recipe.data.instructions, recipe.run.seed)
        return [*data.titles.values(), *(fixed * 200), *rows]

    return texts


def check_same_recipe(run: RunDir, recipe: Recipe) -> None:
    # The stored recipe goes through today's schema too, so a field added to llmrec since (with its default) is
    # not a difference.
    stored = yaml.safe_load(load_recipe(run.recipe_file, instantiate=False).to_yaml())
    current = yaml.safe_load(recipe.to_yaml())
    if stored != current:
        differences = sorted(_differences(stored, current))
        raise LLMRecError(
            f"the run directory holds a run of a different recipe (differences at {', '.join(differences[:8])}). "
            "Resume it with the same recipe and overrides, pick another run.name, or pass --overwrite to start over.",
            str(run.path),
        )


_ABSENT = object()


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{where}.{key}" if where else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}.{i}")]
    return [] if a == b else [where or "(top level)"]


def train(recipe: Recipe, overwrite: bool = False) -> dict:
    """Run every stage of `recipe`, evaluate, and return the metrics (resuming where a previous run stopped)."""
    from transformers import set_seed

    state = _state()
    run = RunDir(recipe.run_dir)
    set_seed(recipe.run.seed)

    if run.path.exists() and overwrite:
        if state.is_main_process:
            logger.info(f"Removing {run.path} (--overwrite).")
            shutil.rmtree(run.path)
        state.wait_for_everyone()
    if run.recipe_file.is_file():
        check_same_recipe(run, recipe)
        if run.is_complete():
            logger.info(f"{run.path} is already complete; its metrics:")
            metrics = run.metrics()
            print_summary(metrics, recipe)
            return metrics

    data = load_data(recipe.data, recipe.run.seed)
    logger.info("Data: " + ", ".join(f"{k}={v}" for k, v in data.stats().items()))

    if state.is_main_process:
        run.path.mkdir(parents=True, exist_ok=True)
        if not run.recipe_file.is_file():
            write_text(run.recipe_file, recipe.to_yaml())
            _wrote(run.recipe_file)
        run.set_status("running")
    state.wait_for_everyone()
    try:
        metrics = _train_and_evaluate(recipe, run, data, state)
    except BaseException as err:
        if state.is_main_process:
            run.set_status("failed", error=f"{type(err).__name__}: {err}")
        raise
    return metrics


def _load_model(recipe: Recipe, run: RunDir, data: RecData, state):
    from llmrec.models import load_base

    with state.main_process_first():
        model, tokenizer = load_base(
            recipe.model, run.base, tokenizer_texts(recipe, data), recipe.run.seed, state.is_main_process
        )
    return model, tokenizer


def _train_and_evaluate(recipe: Recipe, run: RunDir, data: RecData, state) -> dict:
    model, tokenizer = _load_model(recipe, run, data, state)
    adapter = get_adapter(recipe.adapter.method)
    done = [i for i in range(len(recipe.stages)) if run.stage_done(recipe, i)]
    first = len(done) if done == list(range(len(done))) else 0
    if first:
        logger.info(f"Stages 0..{first - 1} are finished; loading {run.stage_result(recipe, first - 1)}.")
        model = adapter.load(model, run.stage_result(recipe, first - 1), trainable=True)
    else:
        model = adapter.attach(model, recipe.adapter.args, AdapterContext(recipe, data, run.path))

    stage_metrics: dict[str, Any] = {}
    for index in range(first, len(recipe.stages)):
        source = str(run.stage_result(recipe, index - 1)) if index else _base_source(recipe, run)
        model, stage_metrics[recipe.stage_label(index)] = _run_stage(recipe, run, data, model, tokenizer, index, state, source)
    for index in range(first):
        history = read_json(run.stage_result(recipe, index) / RESULT_MARKER)
        stage_metrics[recipe.stage_label(index)] = history["summary"]

    if first == len(recipe.stages):  # nothing trained in this process, so the model is still where it was loaded
        model.to(state.device)
    if state.is_main_process:
        with atomic_dir(run.final) as tmp:
            if recipe.stages:
                shutil.copytree(run.stage_result(recipe, len(recipe.stages) - 1), tmp, dirs_exist_ok=True)
                (tmp / RESULT_MARKER).unlink(missing_ok=True)
            else:
                adapter.save(model, tmp)
                tokenizer.save_pretrained(tmp)
        _wrote(run.final)
    state.wait_for_everyone()

    eval_metrics, predictions = {}, {}
    for split in recipe.eval.splits:
        split_metrics, predictions[split] = evaluate_split(model, tokenizer, data, recipe, split)
        eval_metrics.update(split_metrics)
    metrics = {
        **eval_metrics,
        **{f"train/{label}/{k}": v for label, summary in stage_metrics.items() for k, v in summary.items()},
        "run/world_size": state.num_processes,
        "run/seed": recipe.run.seed,
    }
    if state.is_main_process:
        finish(run, recipe, data, metrics, predictions)
    state.wait_for_everyone()
    return metrics


def evaluate_split(model, tokenizer, data: RecData, recipe: Recipe, split: str) -> tuple[dict, list[dict]]:
    """Metrics and predictions of one split, by the recipe's evaluation task."""
    if recipe.eval.task == "ctr":
        from llmrec.eval.ctr import evaluate_ctr

        return evaluate_ctr(model, tokenizer, data, recipe, split)
    if recipe.eval.task == "classification":
        from llmrec.eval.classification import evaluate_classification

        return evaluate_classification(model, tokenizer, recipe, split)
    if recipe.eval.task == "reasoning":
        from llmrec.eval.reasoning import evaluate_reasoning

        return evaluate_reasoning(model, tokenizer, recipe, split)
    if recipe.eval.task == "preference_summary":
        from llmrec.eval.preference_summary import evaluate_summaries

        return evaluate_summaries(model, tokenizer, data, recipe, split)
    if recipe.eval.task == "instructions":
        from llmrec.eval.instructions import evaluate_instructions

        return evaluate_instructions(model, tokenizer, recipe, split)
    from llmrec.eval.ranking import evaluate_ranking

    return evaluate_ranking(model, tokenizer, data, recipe.data.task, recipe.eval, recipe.run.seed, split, recipe.data.shifts)


def _base_source(recipe: Recipe, run: RunDir) -> str:
    from llmrec.models.tiny import is_tiny

    return str(run.base) if is_tiny(recipe.model.name) else recipe.model.name


def _run_stage(recipe: Recipe, run: RunDir, data: RecData, model, tokenizer, index: int, state, model_source: str):
    spec = get_stage(recipe.stages[index].trainer, f"stages.{index}.trainer")
    stage_dir = run.stage_dir(recipe, index)
    config = recipe.stage_config(index, stage_dir)
    context = StageContext(
        recipe,
        data,
        model,
        tokenizer,
        index,
        wants_eval=config.eval_strategy != "no",
        data_config=recipe.stage_data(index),
        model_source=model_source,
        args=config,
    )
    train_dataset, eval_dataset = spec.build_datasets(context)
    if len(train_dataset) == 0:
        raise LLMRecError(
            f"stage {index} ({spec.description}) has no training examples; the data are too small after filtering "
            "and splitting.",
            f"stages.{index}",
        )
    logger.info(f"Stage {index} ({recipe.stages[index].trainer}): {spec.description}; {len(train_dataset)} examples.")
    trainer = spec.trainer_class(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=_callbacks(),
        **spec.trainer_kwargs(context),
    )
    resume = committed_checkpoint(stage_dir, state.is_main_process)
    state.wait_for_everyone()
    if resume is not None:
        logger.info(f"Resuming stage {index} from {resume}.")
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if is_peft_model(trainer.model) and "ref" in trainer.model.peft_config:
        trainer.model.delete_adapter("ref")  # TRL's frozen reference copy; the stage's result is the policy alone

    partial = stage_dir / "result.partial"
    if state.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_model(str(partial))  # every process: ZeRO-3 and FSDP gather the weights here
    summary = stage_summary(trainer.state.log_history, trainer.state.global_step)
    if state.is_main_process:
        trained = trainer.accelerator.unwrap_model(trainer.model)
        if not isinstance(trained, PreTrainedModel) and not is_peft_model(trained):
            # llmrec's own adapters (CoRA, EPT, LAMP): transformers wrote their bare state dict as model.safetensors;
            # the stage result is the adapter folder that `adapter.load` reads
            (partial / "model.safetensors").unlink(missing_ok=True)
            get_adapter(recipe.adapter.method).save(trained, partial)
        tokenizer.save_pretrained(partial)
        (partial / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved recipe says the same
        write_json(partial / RESULT_MARKER, {"summary": summary, "log_history": trainer.state.log_history})
        result = run.stage_result(recipe, index)
        shutil.rmtree(result, ignore_errors=True)
        partial.rename(result)
        _wrote(result)
    state.wait_for_everyone()
    return trainer.model, summary


def stage_summary(log_history: list[dict], global_step: int) -> dict:
    """Loss figures from the logged history, which a resumed run restores whole (transformers' own `train_loss`
    averages only the steps since the resume, so it is not used)."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]
    summary: dict[str, float] = {"global_step": global_step}
    if losses:
        summary.update(final_loss=losses[-1], mean_loss=sum(losses) / len(losses))
    if eval_losses:
        summary["final_eval_loss"] = eval_losses[-1]
    return summary


def finish(run: RunDir, recipe: Recipe, data: RecData, metrics: dict, predictions: dict[str, list[dict]]) -> None:
    """Write predictions (per split), merge metrics.json, draw curves.png, write the model card, mark the run
    complete."""
    from llmrec.eval.plots import draw_curves
    from llmrec.publish.card import write_card

    for split, rows in predictions.items():
        write_text(run.predictions / f"{split}.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in rows))
    merged = {**run.metrics(), **metrics}
    histories = {}
    for index in range(len(recipe.stages)):
        marker = run.stage_result(recipe, index) / RESULT_MARKER
        if marker.is_file():
            histories[recipe.stage_label(index)] = read_json(marker)["log_history"]
    draw_curves(run.curves, histories, merged)
    _wrote(run.curves)
    write_card(run.card, recipe, data, merged)
    if run.final.is_dir():
        shutil.copyfile(run.card, run.final / "README.md")
    _wrote(run.card)
    write_json(run.metrics_file, merged)
    _wrote(run.metrics_file)
    run.set_status("complete")
    print_summary(merged, recipe, list(predictions))


def print_summary(metrics: dict, recipe: Recipe, splits: list[str] | None = None) -> None:
    """The metrics of the model and the baselines, side by side, on stdout (one table per split)."""
    from llmrec.eval.ranking import baseline_prefix

    if recipe.eval.task == "ctr":
        _print_ctr_summary(metrics, splits or recipe.eval.splits)
        return
    if recipe.eval.task == "classification":
        _print_classification_summary(metrics, splits or recipe.eval.splits, recipe)
        return
    if recipe.eval.task == "reasoning":
        _print_reasoning_summary(metrics, splits or recipe.eval.splits, recipe)
        return
    if recipe.eval.task == "preference_summary":
        _print_summary_accuracy(metrics, splits or recipe.eval.splits)
        return
    if recipe.eval.task == "instructions":
        _print_instruction_summary(metrics, splits or recipe.eval.splits)
        return
    for split in splits or recipe.eval.splits:
        names = [("model", f"{split}/")] + [(name, baseline_prefix(name, split)) for name in recipe.eval.baselines]
        columns = [f"{m}@{k}" for k in sorted(recipe.eval.ks) for m in ("hr", "ndcg")]
        columns.append(f"over_rec@{max(recipe.eval.ks)}")
        rows = [f"{'':<12}" + "".join(f"{c:>12}" for c in columns)]
        for name, prefix in names:
            values = [metrics.get(prefix + c) for c in columns]
            rows.append(f"{name:<12}" + "".join(f"{v:>12.4f}" if isinstance(v, float) else f"{'-':>12}" for v in values))
        print(f"\n{split} ranking over {metrics.get(f'{split}/catalog_items', '?')} items, "
              f"{metrics.get(f'{split}/targets', '?')} targets:")
        print("\n".join(rows))
        ratio = metrics.get(f"{split}/valid_item_ratio")
        if ratio is not None:
            print(f"valid-item ratio of unconstrained generation: {ratio:.4f}")


def _print_ctr_summary(metrics: dict, splits: list[str]) -> None:
    from llmrec.eval.ranking import baseline_prefix

    for split in splits:
        if f"{split}/auc" not in metrics:
            continue
        print(f"\n{split} like prediction: {metrics[f'{split}/rows']} rows, {metrics[f'{split}/positive_rate']:.1%} liked, "
              f"UAUC over {metrics[f'{split}/uauc_users']} users:")
        print(f"{'':<12}{'auc':>10}{'uauc':>10}")
        for name, prefix in [("model", f"{split}/")] + [(b, baseline_prefix(b, split)) for b in ("cf", "popularity")]:
            if prefix + "auc" in metrics:
                print(f"{name:<12}" + "".join(f"{metrics.get(prefix + m, float('nan')):>10.4f}" for m in ("auc", "uauc")))


def _print_classification_summary(metrics: dict, splits: list[str], recipe: Recipe) -> None:
    from llmrec.eval.ranking import baseline_prefix

    config = recipe.data.classification
    for split in splits:
        if f"{split}/accuracy" not in metrics:
            continue
        print(f"\n{split} {config.name} classification: {metrics[f'{split}/rows']} rows, {config.num_classes} classes:")
        print(f"{'':<12}{'accuracy':>10}")
        for name, prefix in (("model", f"{split}/"), ("majority", baseline_prefix("majority", split))):
            print(f"{name:<12}{metrics.get(prefix + 'accuracy', float('nan')):>10.4f}")


def _print_reasoning_summary(metrics: dict, splits: list[str], recipe: Recipe) -> None:
    columns = ("mean_accuracy", "majority_accuracy", "pass_accuracy", "answered", "completion_tokens")
    for split in splits:
        if f"{split}/mean_accuracy" not in metrics:
            continue
        print(f"\n{split} {recipe.data.reasoning.source}: {metrics[f'{split}/questions']} questions, "
              f"{metrics[f'{split}/samples']} samples each at temperature {recipe.eval.temperature}:")
        print("".join(f"{c.removesuffix('_accuracy'):>12}" for c in columns))
        print("".join(f"{metrics[f'{split}/{c}']:>12.4f}" for c in columns))


def _print_instruction_summary(metrics: dict, splits: list[str]) -> None:
    for split in splits:
        if f"{split}/exact_match" not in metrics:
            continue
        print(f"\n{split} instructions: {metrics[f'{split}/rows']} rows")
        print(f"{'exact_match':>12}{'rouge_l':>12}{'loss':>12}")
        print("".join(f"{metrics[f'{split}/{m}']:>12.4f}" for m in ("exact_match", "rouge_l", "loss")))
        categories = sorted(k.rsplit("/", 1)[1] for k in metrics if k.startswith(f"{split}/exact_match/"))
        print("by category: " + ", ".join(f"{c} {metrics[f'{split}/exact_match/{c}']:.2f}" for c in categories))


def _print_summary_accuracy(metrics: dict, splits: list[str]) -> None:
    columns = ("no_summary", "model", "streaming", "oracle", "format_ok")
    for population in [*splits, "ood"]:
        if f"{population}/model" not in metrics:
            continue
        print(f"\n{population}: judge accuracy over {metrics[f'{population}/questions']} questions of "
              f"{metrics[f'{population}/users']} users:")
        print("".join(f"{c:>12}" for c in columns))
        print("".join(f"{metrics[f'{population}/{c}']:>12.4f}" if f"{population}/{c}" in metrics else f"{'-':>12}"
                      for c in columns))
        for key in sorted(k for k in metrics if k.startswith(f"{population}/transfer/")):
            print(f"{key}: {metrics[key]:.4f}")


def load_trained(run_dir: str | Path):
    """(recipe, data, model, tokenizer) of a finished run, reloaded from its run directory."""
    run = RunDir(run_dir)
    if not run.recipe_file.is_file():
        raise LLMRecError("not a run directory (no recipe.yaml).", str(run.path))
    if not run.final.is_dir():
        raise LLMRecError("the run has no final/ model yet; finish training first (rerun `llmrec train`).", str(run.path))
    recipe = load_recipe(run.recipe_file, instantiate=False)
    state = _state()
    data = load_data(recipe.data, recipe.run.seed)
    model, tokenizer = _load_model(recipe, run, data, state)
    model = get_adapter(recipe.adapter.method).load(model, run.final, trainable=False)
    model.to(state.device)
    return recipe, data, model, tokenizer, run
