"""Runs a recipe as a straight line: stages in order, evaluation, then the run's outputs (`llmrec train`).

The run directory's layout is `llmrec.rundir`. The recipe's task (`llmrec.tasks`) gives the stages their rows,
evaluates each split, and writes its part of the console summary, the card and curves.png; nothing here depends on
which task it is.

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

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from accelerate.utils import is_peft_model
from transformers import PreTrainedModel

from llmrec.adapters import AdapterContext, get_adapter
from llmrec.data import RecData, load_data
from llmrec.errors import LLMRecError
from llmrec.eval.keys import stage_prefix
from llmrec.files import atomic_dir, read_json, write_json, write_text
from llmrec.logs import get_logger
from llmrec.recipe import Recipe
from llmrec.rundir import COMMIT_MARKER, RESULT_MARKER, RunDir, load_base_model, process_state, start_over
from llmrec.tasks import task_of
from llmrec.trainers import StageContext, get_stage

logger = get_logger(__name__)


def _wrote(path: Path) -> None:
    logger.info(f"wrote {path}", extra={"all_ranks": True})


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
            process = process_state()
            process.wait_for_everyone()
            if process.is_main_process:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                write_json(folder / COMMIT_MARKER, {"global_step": state.global_step})

    class StepReport(TrainerCallback):
        """Under several processes, each rank reports its progress (single-process runs have the tqdm bar)."""

        def on_step_end(self, args, state, control, **kwargs):
            logged = state.global_step % max(1, int(args.logging_steps)) == 0 or state.global_step == state.max_steps
            if args.world_size > 1 and logged:
                logger.info(f"finished step {state.global_step}/{state.max_steps}", extra={"all_ranks": True})

    return [CommitCheckpoint(), StepReport()]


def train(recipe: Recipe, overwrite: bool = False) -> dict:
    """Run every stage of `recipe`, evaluate, and return the metrics (resuming where a previous run stopped)."""
    from transformers import set_seed

    state = process_state()
    run = RunDir(recipe.run_dir)
    set_seed(recipe.run.seed)

    if run.path.exists() and (overwrite or start_over(run, recipe)):
        if state.is_main_process:
            if overwrite:
                logger.info(f"Removing {run.path} (--overwrite).")
            shutil.rmtree(run.path)
        state.wait_for_everyone()
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


def evaluation_task(recipe: Recipe, run_path: Path):
    """The recipe's task; with `eval.engine: vllm` it ranks on a vLLM engine of the run at `run_path` (its final/
    adapter), which this layer provides so that the task needs no serving code."""
    task = task_of(recipe)
    if recipe.eval.engine == "vllm":
        from llmrec.serve.engine import rank_on_vllm

        task.engine_ranker = functools.partial(rank_on_vllm, run_path)
    return task


def _train_and_evaluate(recipe: Recipe, run: RunDir, data: RecData, state) -> dict:
    model, tokenizer = load_base_model(recipe, run, data, state)
    task = evaluation_task(recipe, run.path)
    task.check_tokenizer(tokenizer)  # before any training: a task it cannot score fails now
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
        model, stage_metrics[recipe.stage_label(index)] = _run_stage(recipe, run, data, model, tokenizer, index, state,
                                                                     source)
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
        split_metrics, predictions[split] = task.evaluate(model, tokenizer, data, split)
        eval_metrics.update(split_metrics)
    metrics = {
        **eval_metrics,
        **{stage_prefix(label) + k: v for label, summary in stage_metrics.items() for k, v in summary.items()},
        "run/world_size": state.num_processes,
        "run/seed": recipe.run.seed,
    }
    if state.is_main_process:
        finish(run, recipe, data, metrics, predictions)
    state.wait_for_everyone()
    return metrics


def _base_source(recipe: Recipe, run: RunDir) -> str:
    from llmrec.models.packaged import is_packaged, packaged_folder
    from llmrec.models.tiny import is_tiny

    if is_tiny(recipe.model.name):
        return str(run.base)
    return str(packaged_folder(recipe.model.name)) if is_packaged(recipe.model.name) else recipe.model.name


def _run_stage(recipe: Recipe, run: RunDir, data: RecData, model, tokenizer, index: int, state, model_source: str):
    from llmrec.rollout.grpo import release_engine

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
    release_engine(trainer)
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
    task = task_of(recipe)
    panels = [functools.partial(task.plot, metrics=merged, split=split) for split in task.plot_splits(merged)]
    draw_curves(run.curves, histories, panels)
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
    """The metrics of the model and the task's baselines, side by side, on stdout (one table per split)."""
    print(task_of(recipe).summary(metrics, splits or recipe.eval.splits))
