"""`llmrec merge RUN_DIR RUN_DIR [...] --method M OUT`: finished LoRA runs on one base merged into a new run.

OUT is a run directory like any other (`llmrec eval`, `recommend`, `export`, `push` read it): `final/` holds the
merged adapter as one stock PEFT LoRA adapter, `base/` the tiny base when there is one, `recipe.yaml` the first
input's recipe, `merge.json` what was merged and how (with the per-layer truncation error where the merge
truncates, and AdaMerging's λ per step), and `metrics.json`, `predictions/`, `curves.png` and the card the
evaluation of the merged model.

Endpoints: the inputs may come from different tasks or data (one adapter for next-item ranking, one for like
prediction; one per user group). Each distinct (data, evaluation) of the inputs is an endpoint named after the first
input run that has it; the merged model is evaluated on every endpoint: the first input's as the run's own metrics
(`test/hr@10`, ...), the others under `endpoint/<name>/...` in metrics.json, their predictions in
`predictions/<name>.<split>.jsonl` and their results in the card. `endpoints.json` records each endpoint's recipe,
so the task a request belongs to is known. `llmrec eval OUT` evaluates the first endpoint again.

An input `RUN_DIR#client=K` is client K's personal adapter of a federated run (exported as stock LoRA first); the
merged adapter is one central model, evaluated on the clients' task without federation.

`--surgery-steps` adds Representation Surgery (`llmrec.merging.surgery`): one module per endpoint in `surgery/`,
used when that endpoint is evaluated.

Inputs are refused, with the reason, when they cannot merge: an adapter other than LoRA, different base models
(compared by their weights and tokenizer for a `tiny:` or local base: a second task's run can train on the first
run's `base/` folder as `model.name`), different target modules. Different ranks are fine: every method here
combines the ΔW (see `llmrec.merging.static`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from llmrec.errors import LLMRecError
from llmrec.files import atomic_dir, read_json, write_json, write_text
from llmrec.logs import get_logger

from .adamerging import AdaMergingConfig, learn_coefficients, lora_layers, materialise
from .static import MERGED, MergeConfig, merge_loaded
from .surgery import SurgeryConfig, save_surgery, train_surgery, with_surgery

logger = get_logger(__name__)


CLIENT = "#client="  # RUN_DIR#client=K: client K's personal adapter of a federated run


def _inputs(run_dirs: list[str | Path], workdir: Path):
    """(run, recipe, adapter folder, what it is) of every input; a federated client's adapter is exported into
    `workdir`."""
    from llmrec.recipe import load_recipe
    from llmrec.rundir import RunDir

    if len(run_dirs) < 2:
        raise LLMRecError("give at least two runs to merge.", "RUN_DIR")
    inputs = []
    for index, source in enumerate(map(str, run_dirs)):
        path, _, client = source.partition(CLIENT)
        run = RunDir(path)
        run.require(final=True)
        recipe = load_recipe(run.recipe_file, instantiate=False)
        if recipe.federated is not None:
            if not client.isdigit():
                raise LLMRecError(f"a federated run merges one client's adapter: name it as {path}{CLIENT}K.", source)
            from llmrec.federated.run import export_client

            adapter = workdir / f"input{index}"
            adapter.mkdir(parents=True)
            export_client(run, recipe, adapter, int(client))
            # the merged adapter is one central model: evaluated as the clients' task is without federation
            recipe = load_recipe(run.recipe_file, ["federated=null", f"eval.task={recipe.federated.central_task()}"],
                                 instantiate=False)
        elif client:
            raise LLMRecError(f"{CLIENT}K is for federated runs; this run trained one adapter.", source)
        elif recipe.adapter.method != "lora":
            raise LLMRecError(f"only LoRA runs merge; this run has a {recipe.adapter.method!r} adapter.", source)
        else:
            adapter = run.final
        inputs.append((run, recipe, adapter, str(run.path.resolve()) + (f"{CLIENT}{client}" if client else "")))
    return inputs


def _check_compatible(inputs) -> None:
    from llmrec.models import base_identity

    (first, first_recipe, first_adapter, _), rest = inputs[0], inputs[1:]
    base = base_identity(first, first_recipe)
    targets = sorted(read_json(first_adapter / "adapter_config.json")["target_modules"])
    for run, recipe, adapter, _ in rest:
        if base_identity(run, recipe) != base:
            raise LLMRecError(f"its base model ({recipe.model.name!r}) differs from the first run's "
                              f"({first_recipe.model.name!r}) in weights or tokenizer (a tiny base is built from the "
                              "run's data and seed; train the second run with the first run's base/ folder as "
                              "model.name): adapters merge only on the base they were trained on.", str(run.path))
        theirs = sorted(read_json(adapter / "adapter_config.json")["target_modules"])
        if theirs != targets:
            raise LLMRecError(f"its adapter targets {theirs}, the first run's {targets}: merged adapters must target "
                              "the same modules.", str(run.path))


def _endpoints(inputs) -> list[tuple[str, object]]:
    """(name, recipe) of each distinct (data, evaluation) among the inputs, the first input's first."""
    endpoints, seen = [], []
    for run, recipe, _, _ in inputs:
        key = (recipe.to_dict()["data"], recipe.to_dict()["eval"])
        if key not in seen:
            seen.append(key)
            names = {name for name, _ in endpoints}
            name = run.path.name if run.path.name not in names else f"{run.path.name}-{len(endpoints)}"
            endpoints.append((name, recipe))
    return endpoints


def merge_runs(run_dirs: list[str | Path], out: str | Path, config: MergeConfig,
               adamerging: AdaMergingConfig | None = None, surgery: SurgeryConfig | None = None) -> Path:
    """Merge the runs' adapters into the run directory `out` and evaluate it on every endpoint; returns `out`.
    AdaMerging learns its coefficients, and Surgery its modules, on the unlabelled prompts of each endpoint's first
    evaluation split."""


    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise LLMRecError("the output folder exists and is not empty; choose a new one.", str(out))
    with tempfile.TemporaryDirectory(prefix="llmrec-merge-") as workdir:
        inputs = _inputs(run_dirs, Path(workdir))
        _check_compatible(inputs)
        return _merge(inputs, out, config, adamerging, surgery)


def _merge(inputs, out: Path, config: MergeConfig, adamerging: AdaMergingConfig | None,
           surgery: SurgeryConfig | None) -> Path:
    from peft import PeftModel

    from llmrec.data import load_data
    from llmrec.models.tiny import is_tiny
    from llmrec.recipe import load_recipe
    from llmrec.run import finish
    from llmrec.rundir import RunDir, load_base_model, process_state
    from llmrec.tasks import task_of

    first = inputs[0][0]
    recipe = load_recipe(first.recipe_file, [f"run.name={out.name}", f"run.output_dir={out.parent}"],
                         instantiate=False)
    endpoints = _endpoints(inputs)
    if surgery is not None and len(endpoints) != len(inputs):
        raise LLMRecError("Surgery aligns each endpoint with its expert, so every input must be a different endpoint "
                          "(other data or evaluation); here several inputs share one.", "--surgery-steps")
    state = process_state()
    datas = [load_data(endpoint.data, endpoint.run.seed) for _, endpoint in endpoints]
    base, tokenizer = load_base_model(recipe, first, datas[0], state)
    names = [f"input{k}" for k in range(len(inputs))]
    model = PeftModel.from_pretrained(base, str(inputs[0][2]), adapter_name=names[0])
    for name, (_, _, adapter, _) in zip(names[1:], inputs[1:]):
        model.load_adapter(str(adapter), adapter_name=name)
    learned = {}
    if config.method == "adamerging":
        adamerging = adamerging or AdaMergingConfig()
        sources = [task_of(endpoint).unlabelled_answers(tokenizer, data, endpoint.eval.splits[0])
                   for (_, endpoint), data in zip(endpoints, datas)]
        lambdas, history = learn_coefficients(model, names, tokenizer, sources, adamerging)
        materialise(model, names, lambdas)
        errors = {}
        learned = {"adamerging": {**asdict(adamerging), "prompts": sum(len(p) for p, _ in sources),
                                  "lambda": lambdas.tolist(), "history": history}}
    else:
        errors = merge_loaded(model, names, config)
    corrections = {}
    if surgery is not None:  # endpoint k's expert is input k (one input per endpoint)
        for name, (endpoint_name, endpoint), data in zip(names, endpoints, datas):
            prompts, _ = task_of(endpoint).unlabelled_answers(tokenizer, data, endpoint.eval.splits[0])
            module, losses = train_surgery(model, name, tokenizer, prompts, surgery)
            corrections[endpoint_name] = module
            learned.setdefault("surgery", {**asdict(surgery), "l1": {}})["l1"][endpoint_name] = losses
    for name in names:
        model.delete_adapter(name)
    model.eval()
    record = {"inputs": [what for _, _, _, what in inputs], **asdict(config),
              "peft_combination": config.combination(), "rank": model.peft_config[MERGED].r,
              "endpoints": [name for name, _ in endpoints], "relative_frobenius_error": errors, **learned}
    with atomic_dir(out) as tmp:
        target = RunDir(tmp)
        if is_tiny(recipe.model.name):
            shutil.copytree(first.base, target.base)
        model.save_pretrained(str(target.final), safe_serialization=True)
        tokenizer.save_pretrained(str(target.final))
        write_text(target.recipe_file, recipe.to_yaml())
        write_json(tmp / "merge.json", record)
        write_json(tmp / "endpoints.json", {name: endpoint.to_dict() for name, endpoint in endpoints})
        if learned:
            from llmrec.merging.plots import draw_lambdas

            draw_lambdas(tmp / "adamerging.png", learned["adamerging"]["history"],
                         [layer for layer, _ in lora_layers(model)], [f"input{k}" for k in range(len(inputs))])
        for name, module in corrections.items():
            save_surgery(module, tmp / "surgery", name)
        metrics, predictions, sections = {}, {}, []
        for index, ((name, endpoint), data) in enumerate(zip(endpoints, datas)):
            task, found = task_of(endpoint), {}
            for split in endpoint.eval.splits:
                with with_surgery(model, corrections.get(name)):
                    split_metrics, rows = task.evaluate(model, tokenizer, data, split)
                found.update(split_metrics)
                if index == 0:
                    predictions[split] = rows
                else:
                    write_text(target.predictions / f"{name}.{split}.jsonl",
                               "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            if index == 0:
                metrics.update(found)
                continue
            metrics.update({f"endpoint/{name}/{key}": value for key, value in found.items()})
            print(f"\nendpoint {name} ({task.name}):\n{task.summary(found, endpoint.eval.splits)}")
            sections.append(f"## Endpoint `{name}`: {task.description}\n\n{task.card_results(found)}")
        finish(target, recipe, datas[0], metrics, predictions)
        card = target.card.read_text()
        write_text(target.card, card + "".join(f"\n{section}\n" for section in sections) + _merge_section(record))
    worst = max(errors.values(), default=0.0)
    logger.info(f"wrote {out}: {len(inputs)} adapters merged by {config.method} (rank {record['rank']}"
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
                  f"the answer entropy on {learned['prompts']} unlabelled prompts of the endpoints' first evaluation "
                  "splits (no labels); λ per step is in `merge.json`, drawn in `adamerging.png`."]
    if "surgery" in record:
        l1 = record["surgery"]["l1"]
        lines += ["", "Representation Surgery: each endpoint's final-layer representations are corrected by its own "
                  f"rank-{record['surgery']['rank']} module (`surgery/<endpoint>.safetensors`, llmrec's format, not a "
                  "stock PEFT adapter; it needs the endpoint at inference), trained without labels towards the "
                  "expert's representations. Mean L1 distance, first step → last: "
                  + "; ".join(f"{name} {losses[0]:.4f} → {losses[-1]:.4f}" for name, losses in l1.items()) + ". "
                  "The metrics above are with each endpoint's module."]
    if record["relative_frobenius_error"]:
        worst = max(record["relative_frobenius_error"].values())
        lines += ["", f"The rank truncation's largest relative Frobenius error over the layers is {worst:.3e} "
                  "(each layer's in `merge.json`)."]
    lines += ["", f"Endpoints: {', '.join(record['endpoints'])}. The recipe above is the first input run's (the first "
              "endpoint's task, data and evaluation); `endpoints.json` holds every endpoint's.", ""]
    return "\n".join(lines)
