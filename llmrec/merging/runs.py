"""`llmrec merge RUN_DIR RUN_DIR [...] --method M OUT`: finished LoRA runs on one base merged into a new run.

OUT is a run directory like any other (`llmrec eval`, `recommend`, `export`, `push` read it): `final/` holds the
merged adapter as one stock PEFT LoRA adapter, `base/` the tiny base when there is one, `recipe.yaml` the first
input's recipe (its task, data and evaluation), `merge.json` what was merged and how (with the per-layer truncation
error where the merge truncates), and `metrics.json`, `predictions/`, `curves.png` and the card the evaluation of
the merged model on that task.

Inputs are refused, with the reason, when they cannot merge: an adapter other than LoRA, different base models (a
`tiny:` base must be the same weights and tokenizer), different target modules, or different tasks or data (the
merged run is evaluated on one task; evaluating several tasks in one run is not built yet). Different ranks are
fine: every method here combines the ΔW (see `llmrec.merging.static`).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir, read_json, write_json, write_text
from llmrec.logs import get_logger

from .adamerging import AdaMergingConfig, learn_coefficients, lora_layers, materialise
from .static import MERGED, MergeConfig, merge_loaded

logger = get_logger(__name__)


def _inputs(run_dirs: list[str | Path]):
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    if len(run_dirs) < 2:
        raise LLMRecError("give at least two runs to merge.", "RUN_DIR")
    runs = []
    for run_dir in run_dirs:
        run = RunDir(run_dir)
        run.require(final=True)
        recipe = load_recipe(run.recipe_file, instantiate=False)
        if recipe.adapter.method != "lora" or recipe.federated is not None:
            what = "a federated run" if recipe.federated is not None else f"a {recipe.adapter.method!r} adapter"
            raise LLMRecError(f"only LoRA runs merge; this run has {what} (export a federated client with "
                              "`llmrec export --client K` to merge its LoRA).", str(run.path))
        runs.append((run, recipe))
    return runs


def _check_compatible(runs) -> None:
    from llmrec.models.tiny import is_tiny

    (first, first_recipe), rest = runs[0], runs[1:]
    targets = sorted(read_json(first.final / "adapter_config.json")["target_modules"])
    for run, recipe in rest:
        model, first_model = recipe.model, first_recipe.model
        if (model.name, model.revision) != (first_model.name, first_model.revision):
            raise LLMRecError(f"its base model is {model.name!r}, the first run's {first_model.name!r}: adapters "
                              "merge only on the base they were trained on.", str(run.path))
        if is_tiny(model.name) and any(_digest(run.base / f) != _digest(first.base / f)
                                       for f in ("model.safetensors", "tokenizer.json")):
            raise LLMRecError(f"its {model.name} base differs from the first run's (a tiny base is built from the "
                              "run's data and seed): adapters merge only on the same weights and tokenizer.",
                              str(run.path))
        theirs = sorted(read_json(run.final / "adapter_config.json")["target_modules"])
        if theirs != targets:
            raise LLMRecError(f"its adapter targets {theirs}, the first run's {targets}: merged adapters must target "
                              "the same modules.", str(run.path))
        if any(recipe.to_dict()[key] != first_recipe.to_dict()[key] for key in ("data", "eval")):
            raise LLMRecError("its data or evaluation differ from the first run's; the merged run is evaluated on one "
                              "task and data (evaluating several tasks in one run is not built yet).", str(run.path))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def merge_runs(run_dirs: list[str | Path], out: str | Path, config: MergeConfig,
               adamerging: AdaMergingConfig | None = None) -> Path:
    """Merge the runs' adapters into the run directory `out` and evaluate it; returns `out`. AdaMerging learns its
    coefficients on the unlabelled prompts of the recipe's first evaluation split."""
    from peft import PeftModel

    from llmrec.data import load_data
    from llmrec.models.tiny import is_tiny
    from llmrec.recipe import load_recipe
    from llmrec.run import finish
    from llmrec.rundir import RunDir, load_base_model, process_state
    from llmrec.tasks import task_of

    runs = _inputs(run_dirs)
    _check_compatible(runs)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LLMRecError("the output folder exists and is not empty; choose a new one.", str(out))
    first = runs[0][0]
    recipe = load_recipe(first.recipe_file, [f"run.name={out.name}", f"run.output_dir={out.parent}"],
                         instantiate=False)
    state = process_state()
    data = load_data(recipe.data, recipe.run.seed)
    base, tokenizer = load_base_model(recipe, first, data, state)
    names = [f"input{k}" for k in range(len(runs))]
    model = PeftModel.from_pretrained(base, str(first.final), adapter_name=names[0])
    for name, (run, _) in zip(names[1:], runs[1:]):
        model.load_adapter(str(run.final), adapter_name=name)
    task = task_of(recipe)
    learned = {}
    if config.method == "adamerging":
        adamerging = adamerging or AdaMergingConfig()
        prompts, answers = task.unlabelled_answers(tokenizer, data, recipe.eval.splits[0])
        lambdas, history = learn_coefficients(model, names, tokenizer, prompts, answers, adamerging)
        materialise(model, names, lambdas)
        errors = {}
        learned = {"adamerging": {**asdict(adamerging), "split": recipe.eval.splits[0], "prompts": len(prompts),
                                  "lambda": lambdas.tolist(), "history": history}}
    else:
        errors = merge_loaded(model, names, config)
    for name in names:
        model.delete_adapter(name)
    model.eval()
    record = {"inputs": [str(run.path.resolve()) for run, _ in runs], **asdict(config),
              "peft_combination": config.combination(), "rank": model.peft_config[MERGED].r,
              "relative_frobenius_error": errors, **learned}
    with atomic_dir(out) as tmp:
        target = RunDir(tmp)
        if is_tiny(recipe.model.name):
            shutil.copytree(first.base, target.base)
        model.save_pretrained(str(target.final), safe_serialization=True)
        tokenizer.save_pretrained(str(target.final))
        write_text(target.recipe_file, recipe.to_yaml())
        write_json(tmp / "merge.json", record)
        if learned:
            from llmrec.merging.plots import draw_lambdas

            draw_lambdas(tmp / "adamerging.png", learned["adamerging"]["history"],
                         [layer for layer, _ in lora_layers(model)], [run.path.name for run, _ in runs])
        metrics, predictions = {}, {}
        for split in recipe.eval.splits:
            split_metrics, predictions[split] = task.evaluate(model, tokenizer, data, split)
            metrics.update(split_metrics)
        finish(target, recipe, data, metrics, predictions)
        card = target.card.read_text()
        write_text(target.card, card + _merge_section(record))
    worst = max(errors.values(), default=0.0)
    logger.info(f"wrote {out}: {len(runs)} adapters merged by {config.method} (rank {record['rank']}"
                + (f", worst layer's relative error {worst:.2e}" if errors else "") + ")")
    return out


def _merge_section(record: dict) -> str:
    weights = record["weights"] or [1.0] * len(record["inputs"])
    lines = ["", "## Merge", "",
             f"This adapter was not trained: `llmrec merge --method {record['method']}` combined the adapters of "
             f"{len(record['inputs'])} runs (PEFT combination `{record['peft_combination']}`, rank {record['rank']}"
             + (f", density {record['density']}" if record["density"] is not None else "") + "):", ""]
    lines += [f"- `{path}` (weight {weight:g})" for path, weight in zip(record["inputs"], weights)]
    if "adamerging" in record:
        learned = record["adamerging"]
        lines += ["", f"AdaMerging learned {learned['granularity']}-wise λ in {learned['steps']} steps by minimising "
                  f"the answer entropy on {learned['prompts']} unlabelled {learned['split']} prompts (no labels); "
                  "λ per step is in `merge.json`, drawn in `adamerging.png`."]
    if record["relative_frobenius_error"]:
        worst = max(record["relative_frobenius_error"].values())
        lines += ["", f"The rank truncation's largest relative Frobenius error over the layers is {worst:.3e} "
                  "(each layer's in `merge.json`)."]
    lines += ["", "The recipe above is the first input run's: its task, data and evaluation.", ""]
    return "\n".join(lines)
