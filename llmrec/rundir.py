"""The run directory: its layout, its state, and reloading a finished run.

```
<output_dir>/<name>/
  recipe.yaml        the resolved recipe (what `llmrec recipe show` prints)
  status.json        running / failed (with the error) / complete
  base/              tiny models only: the generated base model and its tokenizer
  checkpoints/
    stage0-sft/
      checkpoint-50/ transformers Trainer checkpoints; only those with llmrec_commit.json are complete
      result/        the model at the end of the stage (adapter or full weights) + llmrec_stage.json
  final/             the trained adapter (or model) and tokenizer: what eval, recommend and export load
  predictions/       the evaluated examples of every split (JSON Lines)
  metrics.json       written last; its presence with status "complete" means the run finished
  curves.png         training loss and evaluation metrics against the baselines
  README.md          the model card
  federated/         a federated run's rounds: round-NNNN/ with the global tensors and record.json
```

A run directory holding a different recipe's run is refused when it holds trained work (`trained_work`) and
cleared when it holds none (`start_over`): a run that failed before its first checkpoint can be rerun with a
corrected recipe.

`llmrec train` (`llmrec.run`) and `llmrec federate` (`llmrec.federated.run`) write it; `eval`, `recommend` and
`export` read it through `load_trained`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from llmrec.errors import LLMRecError
from llmrec.files import read_json, write_json
from llmrec.logs import get_logger

logger = get_logger(__name__)

COMMIT_MARKER = "llmrec_commit.json"
RESULT_MARKER = "llmrec_stage.json"
ROUND_RECORD = "record.json"  # a federated round's folder is complete once it holds this
# what final/ holds once a run has trained: an adapter's weights, or a full model's
FINAL_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")


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
        return _read_record(self.status_file) if self.status_file.is_file() else {}

    def is_complete(self) -> bool:
        return self.status().get("state") == "complete" and self.metrics_file.is_file()

    def stage_dir(self, recipe, index: int) -> Path:
        return self.checkpoints / recipe.stage_label(index)

    def stage_result(self, recipe, index: int) -> Path:
        return self.stage_dir(recipe, index) / "result"

    def stage_done(self, recipe, index: int) -> bool:
        return (self.stage_result(recipe, index) / RESULT_MARKER).is_file()

    def set_status(self, state: str, **extra: Any) -> None:
        write_json(self.status_file, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})

    def trained_work(self) -> list[str]:
        """What training left here that `--overwrite` would delete: finished stages, committed checkpoints,
        completed federated rounds, the final model, the metrics."""
        work = []
        for stage_dir in sorted(p for p in self.checkpoints.glob("*") if p.is_dir()):
            steps = sorted(int(c.name.rsplit("-", 1)[1]) for c in stage_dir.glob("checkpoint-*")
                           if (c / COMMIT_MARKER).is_file() and c.name.rsplit("-", 1)[1].isdigit())
            if (stage_dir / "result" / RESULT_MARKER).is_file():
                work.append(f"the finished stage {stage_dir.name}")
            elif steps:
                work.append(f"{len(steps)} checkpoint(s) of {stage_dir.name} (up to step {steps[-1]})")
        rounds = [r for r in self.path.glob("federated/round-*") if (r / ROUND_RECORD).is_file()]
        if rounds:
            work.append(f"{len(rounds)} completed federated round(s)")
        if any((self.final / name).is_file() for name in FINAL_WEIGHTS):
            work.append("the trained model in final/")
        if self.metrics_file.is_file():
            work.append("metrics.json")
        return work

    def metrics(self) -> dict:
        """metrics.json, with the keys of runs written by older versions renamed to today's (`llmrec.eval.keys`)."""
        from llmrec.eval.keys import upgrade_keys

        return upgrade_keys(_read_record(self.metrics_file)) if self.metrics_file.is_file() else {}

    def require(self, final: bool = False) -> None:
        """Refuse, before any work, a folder that is not a run directory, a damaged status.json or metrics.json
        (a later write would merge into it), and, with `final`, a run without a trained model in final/."""
        if not self.recipe_file.is_file():
            what = "does not exist" if not self.path.exists() else "is not a run directory (no recipe.yaml)"
            raise LLMRecError(f"{what}; give the folder that `llmrec train` made (<run.output_dir>/<run.name>).",
                              str(self.path))
        self.status()
        self.metrics()
        if final and not any((self.final / name).is_file() for name in FINAL_WEIGHTS):
            status = self.status()
            why = (f" (it failed: {status.get('error', 'see its log')})" if status.get("state") == "failed"
                   else " (it is unfinished or still running)")
            raise LLMRecError(f"the run has no final/ model yet{why}; finish training first (rerun `llmrec train` "
                              "with the same recipe, or `llmrec federate` for a federated run).", str(self.path))


def _read_record(path: Path) -> dict:
    """A JSON file of the run directory; a damaged one is an error that names it, never a traceback."""
    import json

    try:
        record = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LLMRecError(f"this file is damaged (not valid JSON: {err}). Move it away to keep it, or delete it; "
                          "`llmrec eval` writes the metrics again.", str(path)) from None
    if not isinstance(record, dict):
        raise LLMRecError("this file is damaged (a JSON object was expected).", str(path))
    return record


def start_over(run: RunDir, recipe) -> bool:
    """Whether a run directory that holds a different recipe's run must be cleared before `recipe` runs in it.

    The same recipe (as today's schema resolves both) resumes: False. A different one is refused, naming
    `--overwrite` and what it would delete, when the directory holds trained work; when it holds none (the run
    failed or was stopped before its first checkpoint), it is True: the caller clears the directory and starts over,
    since nothing is lost and the corrected recipe is what the user wants to run.
    """
    from llmrec.recipe import load_recipe

    if not run.recipe_file.is_file():
        return False
    try:
        # The stored recipe goes through today's schema too, so a field added to llmrec since (with its default) is
        # not a difference.
        stored = yaml.safe_load(load_recipe(run.recipe_file, instantiate=False).to_yaml())
    except LLMRecError as err:
        stored, unreadable = None, err
    current = yaml.safe_load(recipe.to_yaml())
    if stored == current:
        return False
    differences = sorted(_differences(stored, current)) if stored is not None else []
    where = (f"differences at {', '.join(differences[:8])}" if stored is not None
             else f"its recipe.yaml no longer loads: {unreadable}")
    work = run.trained_work()
    if work:
        raise LLMRecError(
            f"the run directory holds a run of a different recipe ({where}) with {'; '.join(work)}. Resume it with "
            "the same recipe and overrides, pick another run.name, or pass --overwrite to delete all of it and "
            "start over.",
            str(run.path),
        )
    status = run.status()
    state = f"it {status['state']}" if status.get("state") else "it has no status"
    logger.warning(f"{run.path} holds a run of a different recipe ({where}) that trained nothing ({state}, no "
                   "checkpoint); starting over with this recipe.")
    return True


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


def process_state():
    """accelerate's view of this process (CPU-only when there is no GPU)."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def load_base_model(recipe, run: RunDir, data, state):
    """(model, tokenizer) of the recipe's base; a tiny one is built into `run.base` once, by the main process."""
    from llmrec.models import load_base
    from llmrec.tasks import tokenizer_texts

    with state.main_process_first():
        return load_base(recipe.model, run.base, tokenizer_texts(recipe, data), recipe.run.seed, state.is_main_process)


def load_trained(run_dir: str | Path):
    """(recipe, data, model, tokenizer, run) of a finished run, reloaded from its run directory (or from a pushed
    run, `hf://owner/repo[@revision]`)."""
    from llmrec.adapters import get_adapter
    from llmrec.data import load_data
    from llmrec.hub import local_run_dir
    from llmrec.recipe import load_recipe

    run = RunDir(local_run_dir(run_dir))
    run.require(final=True)
    recipe = load_recipe(run.recipe_file, instantiate=False)
    state = process_state()
    data = load_data(recipe.data, recipe.run.seed)
    model, tokenizer = load_base_model(recipe, run, data, state)
    model = get_adapter(recipe.adapter.method).load(model, run.final, trainable=False)
    model.to(state.device)
    return recipe, data, model, tokenizer, run
