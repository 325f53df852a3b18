"""Recipes: one YAML file that composes a run, and its schema.

```yaml
run:      {name: quickstart, seed: 0, output_dir: runs}
model:    {name: "tiny:qwen2-xs"}                 # or a Hub id / local folder
data:     {source: {format: synthetic}, split: {method: leave_one_out}, task: {history_length: 10}}
adapter:  {method: lora, args: {r: 8, target_modules: all-linear}}   # args = fields of peft.LoraConfig
stages:
  - trainer: sft
    args: {num_train_epochs: 1, learning_rate: 1.0e-3}              # args = fields of trl.SFTConfig
eval:     {ks: [5, 10, 20]}                                          # task: ranking (llmrec.tasks.TASKS)
```

Every key is checked: unknown keys (with a suggestion for the closest valid one), wrong types and values all
raise `LLMRecError` naming the file, line and dotted key (`llmrec.recipe.loader` reads the YAML and names places).
Stage `args` are checked against the stage's real TRL config dataclass and adapter `args` against the PEFT config
dataclass, so every option of those libraries works and a misspelt one never passes silently. `key=value`
overrides use dotted paths with list indices (`stages.0.args.learning_rate=1e-4`); values are parsed as YAML.

Owners declare what the schema holds and needs, so this module imports none of them at the top: each task
(`llmrec.tasks.TASKS`) brings its `data.<section>`, `SECTIONS` names the top-level sections of other packages
(`federated`), and adapters, trainers, tasks and sections return what they need from the rest of the recipe
(`recipe_needs` / `needs`), reported with their place before anything runs. `recipe_schema()` assembles the
pydantic model from the registries as they are when a recipe is loaded.

llmrec sets a few stage defaults that differ from TRL's (`STAGE_DEFAULTS`): no external loggers, `bf16: false` and no
activation (gradient) checkpointing unless the recipe asks (GPU recipes set `bf16: true`), and the run's seed.
`bf16: false` means fp32 unless an accelerate config's `mixed_precision` says otherwise (a stage's `bf16`/`fp16:
true` wins over the launcher's setting, `false` does not: see accelerate_configs/). `use_cpu` is decided at run
time from the hardware and is not part of the recipe.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import tempfile
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, create_model

from llmrec.data import DataConfig as BaseDataConfig
from llmrec.errors import LLMRecError, closest
from llmrec.eval import EvalConfig
from llmrec.models import ModelConfig
from llmrec.schema import Section

from .loader import (
    Places,
    apply_override,
    check_dataclass_args,
    check_section,
    dump_yaml,
    dump_yaml_with_comments,
    load_yaml,
    parse_value,
    pydantic_message,
    pydantic_path,
    split_key,
    unknown_keys,
)

STAGE_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "bf16": False,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
}
RESERVED_STAGE_ARGS = {"output_dir": "the run directory decides where checkpoints go; set run.output_dir instead"}


def _positive(value) -> bool:
    return value > 0


def _at_least_one(value) -> bool:
    return value >= 1


def _not_negative(value) -> bool:
    return value >= 0


def _unset_or(check):
    return lambda value: value is None or check(value)


# Values that TRL, transformers and PEFT accept without a word but that cannot train (a negative learning rate, a
# batch of zero, a rank of -4), checked wherever a stage's or the adapter's args set a field of this name:
# {field: (test, what the value must be)}.
ARG_RANGES: dict[str, tuple] = {
    "learning_rate": (_positive, "a positive number"),
    "per_device_train_batch_size": (_at_least_one, "at least 1"),
    "per_device_eval_batch_size": (_at_least_one, "at least 1"),
    "gradient_accumulation_steps": (_at_least_one, "at least 1"),
    "num_train_epochs": (_positive, "a positive number"),
    "max_steps": (lambda value: value == -1 or value >= 1, "at least 1, or -1 to train for num_train_epochs"),
    "warmup_steps": (_not_negative, "0 or more"),
    "weight_decay": (_not_negative, "0 or more"),
    "max_grad_norm": (_not_negative, "0 or more"),
    "save_steps": (_positive, "a positive number"),
    "eval_steps": (_unset_or(_positive), "a positive number (or null)"),
    "save_total_limit": (_unset_or(_at_least_one), "at least 1 (or null to keep every checkpoint)"),
    "max_length": (_unset_or(_at_least_one), "at least 1 (or null)"),
    "max_completion_length": (_unset_or(_at_least_one), "at least 1 (or null)"),
    "num_generations": (_at_least_one, "at least 1"),
    "beta": (_not_negative, "0 or more"),
    "temperature": (_positive, "a positive number"),
    "r": (_at_least_one, "at least 1"),
    "lora_alpha": (_positive, "a positive number"),
    "lora_dropout": (lambda value: 0 <= value < 1, "at least 0 and below 1"),
    "num_virtual_tokens": (_at_least_one, "at least 1"),
}


def check_ranges(args: dict, where: tuple, places: Places) -> list[str]:
    """Errors for the values of `args` outside `ARG_RANGES` (values of the wrong type are reported elsewhere)."""
    errors = []
    for key, value in args.items():
        if key not in ARG_RANGES or isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            continue
        test, wanted = ARG_RANGES[key]
        try:
            ok = test(value)
        except TypeError:  # None where a number is required: a type error, reported by the type check
            continue
        if not ok:
            errors.append(f"{places((*where, key))}: {value!r} cannot train: {key} must be {wanted}.")
    return errors

# Optional top-level sections that other packages own: key -> ("module:Class", description). The class may define
# `needs(recipe) -> [(key path, message)]`, and `deals_out_rows = True` when the run it describes deals the data
# sections' rows out itself (a federated run), so a data section need not be the one `eval.task` evaluates.
SECTIONS: dict[str, tuple[str, str]] = {
    "federated": ("llmrec.federated.config:FederatedConfig",
                  "A federated run (`llmrec federate`): rule, clients, rounds, partitions, robustness."),
}


class RunConfig(Section):
    """`run`: the run's identity."""

    name: str = Field(description="The run directory is <output_dir>/<name>.")
    seed: int = Field(0, description="Seeds data generation, model initialisation and training.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")


class AdapterConfig(Section):
    """`adapter`: how the base model is made trainable."""

    method: str = Field("lora", description="An adapter method (llmrec.adapters.ADAPTERS), or 'none' for full "
                        "fine-tuning.")
    args: dict[str, Any] = Field(default_factory=dict, description="Fields of the method's config class.")


class StageConfig(Section):
    """One entry of `stages`."""

    trainer: str = Field(description="A trainer (llmrec.trainers.TRAINERS), e.g. 'sft'.")
    name: str | None = Field(None, description="A label for logs and the checkpoint folder.")
    data: dict[str, Any] = Field(default_factory=dict, description="How the stage builds its rows (e.g. negatives).")
    args: dict[str, Any] = Field(default_factory=dict, description="Fields of the trainer's TRL config class.")


def _stage(name: str, key: str):
    from llmrec.trainers import get_stage

    return get_stage(name, key)


class Recipe(Section):
    """A whole recipe. `recipe_schema()` extends it with the task sections of `data` and the `SECTIONS`."""

    run: RunConfig
    model: ModelConfig
    data: BaseDataConfig = Field(default_factory=BaseDataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def stage_label(self, index: int) -> str:
        stage = self.stages[index]
        return f"stage{index}-{stage.name or stage.trainer}"

    def stage_args(self, index: int) -> dict[str, Any]:
        """The stage's arguments: llmrec's defaults, the run seed, then the recipe's own args."""
        args = self.stages[index].args
        defaults = {**STAGE_DEFAULTS, "seed": self.run.seed}
        if not {"activation_checkpointing", "gradient_checkpointing"} & set(args):
            # TRL turns checkpointing on by default; off unless asked. transformers 5 renamed the field.
            config_class = _stage(self.stages[index].trainer, f"stages.{index}.trainer").config_class
            names = {f.name for f in dataclasses.fields(config_class)}
            field = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
            defaults[field] = False
        return {**defaults, **args}

    def stage_data(self, index: int):
        """The stage's `data` section, validated by its trainer's data model (None when it takes none)."""
        spec = _stage(self.stages[index].trainer, f"stages.{index}.trainer")
        return spec.data_config.model_validate(self.stages[index].data) if spec.data_config else None

    def stage_config(self, index: int, output_dir: str | Path, **overrides: Any):
        """The stage's TRL config object (`overrides`: fields llmrec sets for this use, e.g. a federated round's)."""
        import torch

        spec = _stage(self.stages[index].trainer, f"stages.{index}.trainer")
        args = {**self.stage_args(index), **overrides}
        if "use_cpu" not in args and not torch.cuda.is_available():
            args["use_cpu"] = True  # also selects the gloo backend when several CPU processes are launched
        return spec.config_class(output_dir=str(output_dir), **args)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every section with its defaults, stage args with llmrec's defaults."""
        resolved = self.model_dump(mode="json")
        for index, stage in enumerate(resolved["stages"]):
            data = self.stage_data(index)
            # an optional section at its defaults stays out, so recipes written before it existed resolve the same
            if data is None or (getattr(data, "omitted_when_default", False) and data == type(data)()):
                del stage["data"]
            else:
                stage["data"] = data.model_dump(mode="json")
            stage["args"] = self.stage_args(index)
        return resolved

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


# --- the schema, from the registries --------------------------------------------------------------------------


def _import(entry: str):
    module, attr = entry.split(":")
    return getattr(importlib.import_module(module), attr)


def recipe_schema() -> type[Recipe]:
    """The Recipe model with `data.<section>` for every registered task that has one, then the `SECTIONS`."""
    from llmrec.tasks import registered_tasks

    tasks = tuple((t.section, t.section_class, t.section_help) for t in registered_tasks() if t.section)
    sections = tuple((key, _import(entry), description) for key, (entry, description) in SECTIONS.items())
    return _schema(tasks, sections)


@functools.cache
def _schema(tasks: tuple, sections: tuple) -> type[Recipe]:
    data_class = create_model(
        "DataConfig", __base__=BaseDataConfig, __module__=__name__,
        **{name: (section | None, Field(None, description=help_text)) for name, section, help_text in tasks},
    )
    return create_model(
        "Recipe", __base__=Recipe, __module__=__name__,
        data=(data_class, Field(default_factory=data_class)),
        **{key: (section | None, Field(None, description=description)) for key, section, description in sections},
    )


def __getattr__(name: str):
    # `llmrec.recipe.DataConfig`: the `data` section with every registered task's section, as recipes are read
    if name == "DataConfig":
        return recipe_schema().model_fields["data"].annotation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- loading ---------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), instantiate: bool = True,
                deep: bool = False) -> Recipe:
    """Read, override and validate a recipe; raise one `LLMRecError` listing every problem found.

    With `instantiate`, each stage's TRL config object is also built once, so checks that TRL and transformers
    do across fields (in `__post_init__`) are reported now rather than after data loading, and so are the needs of
    the adapter, the stages, the task and the other sections. With `deep`, the world is checked too
    (`llmrec.recipe.deep`): the data files load, the model is available, the optional libraries are installed.
    """
    path = Path(path)
    if not path.is_file():
        raise LLMRecError(f"recipe file not found: {path.resolve()}.", str(path))
    raw, lines = load_yaml(path)
    if not isinstance(raw, dict):
        raise LLMRecError("a recipe is a mapping with sections run, model, data, adapter, stages, eval.", str(path))
    places = Places(path, lines)
    for override in overrides:
        apply_override(raw, override, places)

    schema = recipe_schema()
    errors = [f"{places(where)}: {message}" for where, message in unknown_keys(schema, raw, ())]
    if errors:
        raise LLMRecError("\n".join(errors))
    try:
        recipe = schema.model_validate(raw)
    except ValidationError as err:
        messages = [f"{places(pydantic_path(e['loc'], schema))}: {pydantic_message(e)}" for e in err.errors()]
        raise LLMRecError("\n".join(dict.fromkeys(messages))) from None

    try:
        recipe.model.check()
    except LLMRecError as err:
        raise LLMRecError(err.message, places(split_key(err.place or "model"))) from None
    errors = _check_registered(recipe, places)
    if errors:
        raise LLMRecError("\n".join(errors))
    if instantiate:
        _instantiate(recipe, places)
    if deep:
        from llmrec.logs import get_logger

        from .deep import deep_notes, deep_problems

        problems = deep_problems(recipe, path)
        if problems:
            raise LLMRecError("\n".join(f"{places(where)}: {message}" for where, message in problems))
        for where, message in deep_notes(recipe, path):
            get_logger(__name__).warning(f"{places(where)}: note: {message}")
    return recipe


def _check_registered(recipe: Recipe, places: Places) -> list[str]:
    """The adapter, trainers and task exist, and their arguments are theirs."""
    from llmrec.adapters import get_adapter
    from llmrec.tasks import get_task

    errors = []
    try:
        adapter = get_adapter(recipe.adapter.method)
    except LLMRecError as err:
        errors.append(f"{places(('adapter', 'method'))}: {err.message}")
    else:
        if adapter.config_class is None and recipe.adapter.args:
            errors.append(f"{places(('adapter', 'args'))}: method {recipe.adapter.method!r} takes no args.")
        elif adapter.config_class is not None:
            errors += check_dataclass_args(adapter.config_class, recipe.adapter.args, ("adapter", "args"), places)
            errors += check_ranges(recipe.adapter.args, ("adapter", "args"), places)
    for index, stage in enumerate(recipe.stages):
        try:
            spec = _stage(stage.trainer, f"stages.{index}.trainer")
        except LLMRecError as err:
            errors.append(f"{places(('stages', index, 'trainer'))}: {err.message}")
            continue
        where = ("stages", index, "data")
        if spec.data_config is not None:
            errors += check_section(spec.data_config, stage.data, where, places)
        elif stage.data:
            errors.append(f"{places(where)}: this trainer builds its own rows and takes no data section.")
        errors += check_dataclass_args(spec.config_class, stage.args, ("stages", index, "args"), places,
                                       RESERVED_STAGE_ARGS)
        errors += check_ranges(stage.args, ("stages", index, "args"), places)
    try:
        get_task(recipe.eval.task)
    except LLMRecError as err:
        errors.append(f"{places(('eval', 'task'))}: {err.message}")
    for split in recipe.eval.splits:
        if split.startswith("ood_") and recipe.data.shift(split.removeprefix("ood_")) is None:
            errors.append(f"{places(('eval', 'splits'))}: {split!r} needs a {split.removeprefix('ood_')} entry in "
                          "data.shifts.")
    return errors


def _instantiate(recipe: Recipe, places: Places) -> None:
    import warnings

    from llmrec.adapters import get_adapter

    for index in range(len(recipe.stages)):
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                recipe.stage_config(index, scratch)
            except (ValueError, TypeError) as err:
                raise LLMRecError(
                    f"{recipe.stages[index].trainer}'s config rejected these arguments: {err}",
                    places(("stages", index, "args")),
                ) from None
            except ImportError as err:  # e.g. `deepspeed` set without the library installed
                raise LLMRecError(
                    f"{recipe.stages[index].trainer}'s config needs a library that is not installed ({err}); install "
                    'the extra it belongs to, e.g. pip install "llmrec[deepspeed]".',
                    places(("stages", index, "args")),
                ) from None
    adapter = get_adapter(recipe.adapter.method)
    if adapter.config_class is not None:
        try:
            adapter.config_class(task_type="CAUSAL_LM", **recipe.adapter.args)
        except (ValueError, TypeError) as err:
            raise LLMRecError(f"{adapter.config_class.__name__} rejected these arguments: {err}",
                              places(("adapter", "args"))) from None
    needs = recipe_needs(recipe)
    if needs:
        first = dict(reversed(needs))  # one message per place: the first one given
        raise LLMRecError("\n".join(f"{places(where)}: {message}" for where, message in reversed(first.items())))


def recipe_needs(recipe: Recipe) -> list[tuple[tuple, str]]:
    """(key path, message) for everything one part of the recipe needs from another: the adapter's, each stage's,
    the task's, the other sections', and one task per recipe."""
    from llmrec.adapters import get_adapter
    from llmrec.tasks import registered_tasks, task_of

    needs = [*getattr(get_adapter(recipe.adapter.method), "recipe_needs", lambda r: [])(recipe)]
    task = task_of(recipe)
    for index, stage in enumerate(recipe.stages):
        spec = _stage(stage.trainer, f"stages.{index}.trainer")
        needs += spec.recipe_needs(recipe)
        if spec.task_rows is not None and spec.task_rows not in task.row_kinds:
            needs.append((("stages", index, "trainer"), f"trainer {stage.trainer} trains on the task's "
                          f"{spec.task_rows} rows, which the {task.name} task does not have; its stages are trainers "
                          f"of its own (see llmrec.tasks.{task.name})."))
    needs += task.needs()
    sections = [getattr(recipe, key) for key in SECTIONS if getattr(recipe, key) is not None]
    # tasks whose rows an sft stage mixes in (multi-task training) may have their sections beside the recipe's task
    mixed = {name for stage in recipe.stages if isinstance(stage.data, dict) for name in stage.data.get("tasks") or []}
    if not any(getattr(section, "deals_out_rows", False) for section in sections):
        for other in registered_tasks():
            if (other.name != task.name and other.name not in mixed and other.section
                    and getattr(recipe.data, other.section) is not None):
                needs.append((("eval", "task"), f"with data.{other.section}, {other.section_trains}; evaluate it with "
                              f"eval.task: {other.name} (or remove data.{other.section})."))
    for section in sections:
        if hasattr(section, "needs"):
            needs += section.needs(recipe)
    return needs


def field_descriptions(recipe: Recipe) -> dict[tuple, str]:
    """{key path: description} for every key of `recipe.to_dict()` that has one: the sections' field descriptions,
    and the help of the TRL / PEFT config fields set in stage and adapter args (for `recipe show --all`)."""
    from pydantic import BaseModel

    from llmrec.adapters import get_adapter

    found: dict[tuple, str] = {}

    def walk(section: BaseModel, where: tuple) -> None:
        for name, field in type(section).model_fields.items():
            if field.description:
                found[(*where, name)] = field.description
            value = getattr(section, name)
            if isinstance(value, BaseModel):
                walk(value, (*where, name))
            elif isinstance(value, list):
                for index, item in enumerate(value):
                    if isinstance(item, BaseModel):
                        walk(item, (*where, name, index))

    def helps(config_class: type | None, where: tuple) -> None:
        for field in dataclasses.fields(config_class) if config_class else ():
            text = field.metadata.get("help")
            if text:
                found[(*where, field.name)] = text

    walk(recipe, ())
    for index, stage in enumerate(recipe.stages):
        spec = _stage(stage.trainer, f"stages.{index}.trainer")
        helps(spec.config_class, ("stages", index, "args"))
        data = recipe.stage_data(index)
        if data is not None:
            walk(data, ("stages", index, "data"))
    helps(get_adapter(recipe.adapter.method).config_class, ("adapter", "args"))
    return found


def all_stage_fields(recipe: Recipe, index: int) -> dict[str, Any]:
    """Every field of the stage's TRL config with the value the stage will use (for `recipe show --all`)."""
    with tempfile.TemporaryDirectory() as scratch:
        config = recipe.stage_config(index, scratch)
    values = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name == "output_dir":
            continue
        value = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        if not isinstance(value, (str, int, float, bool, type(None), list, dict)):
            value = str(value)
        values[f.name] = value
    return values


__all__ = ["Recipe", "STAGE_DEFAULTS", "apply_override", "closest", "dump_yaml", "dump_yaml_with_comments",
           "field_descriptions", "load_recipe", "parse_value", "recipe_needs", "recipe_schema"]
