"""Recipes: one YAML file that composes a run.

```yaml
run:      {name: quickstart, seed: 0, output_dir: runs}
model:    {name: "tiny:qwen2-xs"}                 # or a Hub id / local folder
data:     {source: {format: synthetic}, split: {method: leave_one_out}, task: {history_length: 10}}
adapter:  {method: lora, args: {r: 8, target_modules: all-linear}}   # args = fields of peft.LoraConfig
stages:
  - trainer: sft
    args: {num_train_epochs: 1, learning_rate: 1.0e-3}              # args = fields of trl.SFTConfig
eval:     {ks: [5, 10, 20]}
```

Every key is checked: unknown keys (with a suggestion for the closest valid one), wrong types and values all
raise `LLMRecError` naming the file, line and dotted key. Stage `args` are checked against the stage's real TRL
config dataclass and adapter `args` against the PEFT config dataclass, so every option of those libraries works
and a misspelt one never passes silently. `key=value` overrides use dotted paths with list indices
(`stages.0.args.learning_rate=1e-4`); values are parsed as YAML.

llmrec sets a few stage defaults that differ from TRL's (`STAGE_DEFAULTS`): no external loggers, fp32 and no
activation (gradient) checkpointing unless the recipe asks (GPU recipes set `bf16: true`), and the run's seed. `use_cpu` is
decided at run time from the hardware and is not part of the recipe.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import Field, TypeAdapter, ValidationError

from llmrec.adapters import get_adapter
from llmrec.data import DataConfig
from llmrec.errors import LLMRecError, closest, did_you_mean
from llmrec.eval import EvalConfig
from llmrec.federated.config import FederatedConfig
from llmrec.models import ModelConfig
from llmrec.schema import Section
from llmrec.trainers import get_stage

STAGE_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "bf16": False,
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 50,
    "save_total_limit": 2,
}
RESERVED_STAGE_ARGS = {"output_dir": "the run directory decides where checkpoints go; set run.output_dir instead"}


class RunConfig(Section):
    """`run`: the run's identity."""

    name: str = Field(description="The run directory is <output_dir>/<name>.")
    seed: int = Field(0, description="Seeds data generation, model initialisation and training.")
    output_dir: str = Field("runs", description="Parent folder of run directories.")


class AdapterConfig(Section):
    """`adapter`: how the base model is made trainable."""

    method: str = Field("lora", description="An adapter method (llmrec.adapters.ADAPTERS), or 'none' for full fine-tuning.")
    args: dict[str, Any] = Field(default_factory=dict, description="Fields of the method's config class.")


class StageConfig(Section):
    """One entry of `stages`."""

    trainer: str = Field(description="A trainer (llmrec.trainers.TRAINERS), e.g. 'sft'.")
    name: str | None = Field(None, description="A label for logs and the checkpoint folder.")
    data: dict[str, Any] = Field(default_factory=dict, description="How the stage builds its rows (e.g. negatives).")
    args: dict[str, Any] = Field(default_factory=dict, description="Fields of the trainer's TRL config class.")


class Recipe(Section):
    run: RunConfig
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    federated: FederatedConfig | None = Field(
        None, description="A federated run (`llmrec federate`): rule, clients, rounds, partitions, robustness."
    )

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
            config_class = get_stage(self.stages[index].trainer, f"stages.{index}.trainer").config_class
            names = {f.name for f in dataclasses.fields(config_class)}
            defaults["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = False
        return {**defaults, **args}

    def stage_data(self, index: int):
        """The stage's `data` section, validated by its trainer's data model (None when it takes none)."""
        spec = get_stage(self.stages[index].trainer, f"stages.{index}.trainer")
        return spec.data_config.model_validate(self.stages[index].data) if spec.data_config else None

    def stage_config(self, index: int, output_dir: str | Path, **overrides: Any):
        """The stage's TRL config object (`overrides`: fields llmrec sets for this use, e.g. a federated round's)."""
        import torch

        spec = get_stage(self.stages[index].trainer, f"stages.{index}.trainer")
        args = {**self.stage_args(index), **overrides}
        if "use_cpu" not in args and not torch.cuda.is_available():
            args["use_cpu"] = True  # also selects the gloo backend when several CPU processes are launched
        return spec.config_class(output_dir=str(output_dir), **args)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every section with its defaults, stage args with llmrec's defaults."""
        resolved = self.model_dump(mode="json")
        for index, stage in enumerate(resolved["stages"]):
            data = self.stage_data(index)
            if data is None:
                del stage["data"]
            else:
                stage["data"] = data.model_dump(mode="json")
            stage["args"] = self.stage_args(index)
        return resolved

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (prompt templates) as literal blocks, the way people write them."""


_Dumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


# --- YAML with line numbers ------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 as a float (YAML 1.1 requires a dot: 1.0e-4)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

Path_ = tuple[Union[str, int], ...]


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _load_yaml(path: Path) -> tuple[Any, dict[Path_, int]]:
    """The document and the line of every key (1-based)."""
    text = path.read_text(encoding="utf-8")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Path_, int] = {}

        def build(node: yaml.Node, where: Path_) -> Any:
            lines.setdefault(where, node.start_mark.line + 1)
            if isinstance(node, yaml.MappingNode):
                out: dict[Any, Any] = {}
                for key_node, value_node in node.value:
                    key = loader.construct_object(key_node, deep=True)
                    if key in out:
                        raise LLMRecError(
                            f"key {key!r} appears twice in the same section.", f"{path}:{key_node.start_mark.line + 1}"
                        )
                    lines[(*where, key)] = key_node.start_mark.line + 1
                    out[key] = build(value_node, (*where, key))
                return out
            if isinstance(node, yaml.SequenceNode):
                return [build(child, (*where, i)) for i, child in enumerate(node.value)]
            return loader.construct_object(node, deep=True)

        return (build(node, ()) if node is not None else {}), lines
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        place = f"{path}:{mark.line + 1}" if mark else str(path)
        raise LLMRecError(f"not valid YAML: {getattr(err, 'problem', None) or err}.", place) from None
    finally:
        loader.dispose()


def dotted(where: Path_) -> str:
    return ".".join(str(part) for part in where) or "(top level)"


class _Places:
    """Where each dotted key came from: a file line or a command-line override."""

    def __init__(self, path: Path, lines: dict[Path_, int]):
        self.path, self.lines, self.overrides = path, lines, {}

    def __call__(self, where: Path_) -> str:
        for end in range(len(where), -1, -1):
            prefix = tuple(where[:end])
            if prefix in self.overrides:
                return f"override {self.overrides[prefix]!r}: {dotted(where)}"
            if prefix in self.lines:
                return f"{self.path}:{self.lines[prefix]}: {dotted(where)}"
        return f"{self.path}: {dotted(where)}"


def _split_key(key: str) -> Path_:
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def apply_override(raw: dict, override: str, places: _Places) -> None:
    if "=" not in override:
        raise LLMRecError("expected key=value, e.g. stages.0.args.learning_rate=1e-4.", f"override {override!r}")
    key, text = override.split("=", 1)
    where = _split_key(key.strip())
    if not key.strip() or "" in where:
        raise LLMRecError("the key is empty or has an empty part.", f"override {override!r}")
    target: Any = raw
    for depth, part in enumerate(where[:-1]):
        here = dotted(where[: depth + 1])
        if isinstance(target, list):
            if not isinstance(part, int) or part >= len(target):
                raise LLMRecError(
                    f"{dotted(where[:depth])} is a list of {len(target)} entries; use an index below {len(target)}.",
                    f"override {override!r}",
                )
            target = target[part]
        elif isinstance(target, dict):
            target = target.setdefault(part, {})
        else:
            raise LLMRecError(f"{here} is not a section, so it has no keys.", f"override {override!r}")
    last = where[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last >= len(target):
            raise LLMRecError(f"index {last} is out of range.", f"override {override!r}")
        target[last] = parse_value(text)
    elif isinstance(target, dict):
        target[last] = parse_value(text)
    else:
        raise LLMRecError(f"{dotted(where[:-1])} is not a section, so it has no keys.", f"override {override!r}")
    places.overrides[where] = override


# --- schema walking ------------------------------------------------------------------------------------------


def _unwrap(annotation: Any) -> Any:
    while get_origin(annotation) is typing.Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _union_sections(annotation: Any) -> tuple[str, dict[Any, type[Section]]] | None:
    """(tag field, {tag: section class}) when `annotation` is a union of sections told apart by a Literal field
    (`format` for data sources, `kind` for shifts)."""
    annotation = _unwrap(annotation)
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    members = [m for m in get_args(annotation) if isinstance(m, type) and issubclass(m, Section)]
    if len(members) < 2:
        return None
    for name in members[0].model_fields:
        if all(name in m.model_fields and get_origin(m.model_fields[name].annotation) is typing.Literal for m in members):
            return name, {tag: m for m in members for tag in get_args(m.model_fields[name].annotation)}
    return None


def _unknown_keys(annotation: Any, raw: Any, where: Path_) -> list[tuple[Path_, str]]:
    """(path, message) for every key the schema does not know, with the closest valid spelling."""
    problems: list[tuple[Path_, str]] = []
    union = _union_sections(annotation)
    if union is not None:
        tag, members = union
        if isinstance(raw, dict) and raw.get(tag) in members:
            return _unknown_keys(members[raw[tag]], raw, where)
        return problems
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, Section) and isinstance(raw, dict):
        fields = annotation.model_fields
        for key, value in raw.items():
            if key not in fields:
                problems.append(
                    ((*where, key), f"unknown key {key!r} in {dotted(where)}; valid keys are "
                     f"{', '.join(fields)}.{did_you_mean(key, fields)}")
                )
            else:
                problems.extend(_unknown_keys(fields[key].annotation, value, (*where, key)))
    elif get_origin(annotation) is list and isinstance(raw, list):
        for i, value in enumerate(raw):
            problems.extend(_unknown_keys(get_args(annotation)[0], value, (*where, i)))
    return problems


def _pydantic_path(loc: tuple, annotation: Any = None) -> Path_:
    """A pydantic error location without the union tags it inserts."""
    out: list = []
    annotation = Recipe if annotation is None else annotation
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        union = _union_sections(annotation)
        if union is not None and part in union[1]:
            annotation = union[1][part]
            continue
        out.append(part)
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, Section):
            field = annotation.model_fields.get(part)
            annotation = field.annotation if field else None
        elif get_origin(annotation) in (list, dict):
            annotation = get_args(annotation)[-1]
        else:
            annotation = None
    return tuple(out)


def _pydantic_message(error: dict) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "missing":
        return "this key is required but missing."
    if kind == "union_tag_invalid":
        context = error.get("ctx", {})
        tags = context.get("expected_tags", "")
        tag = context.get("tag", "")
        suggestion = did_you_mean(tag, re.findall(r"[\w-]+", tags))
        return f"unknown {context.get('discriminator', 'tag').strip(chr(39))} {tag!r}; expected one of {tags}.{suggestion}"
    if kind == "union_tag_not_found":
        context = error.get("ctx", {})
        return f"a {context.get('discriminator', 'tag')} key is required here; expected one of {context.get('expected_tags', '')}."
    message = message.removeprefix("Value error, ")
    shown = error.get("input")
    if not isinstance(shown, (dict, list)):
        message += f" (got {shown!r})"
    return message[0].lower() + message[1:] + ("" if message.endswith((".", ")")) else ".")


# --- dataclass args (TRL configs, PEFT configs) --------------------------------------------------------------


def check_dataclass_args(config_class: type, args: dict, where: Path_, places: _Places) -> list[str]:
    """Errors for `args` against a dataclass: unknown fields, wrong types, values outside `choices`."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    errors = []
    for key, value in args.items():
        place = places((*where, key))
        if key in RESERVED_STAGE_ARGS and where[0] == "stages":
            errors.append(f"{place}: cannot be set here: {RESERVED_STAGE_ARGS[key]}.")
            continue
        if key not in fields:
            errors.append(
                f"{place}: unknown key {key!r} for {config_class.__name__}.{did_you_mean(key, fields)} "
                f"Keys here are the fields of {config_class.__module__}.{config_class.__name__}."
            )
            continue
        annotation = hints.get(key, Any)
        try:
            TypeAdapter(annotation).validate_python(value)
        except ValidationError as err:
            detail = err.errors()[0]["msg"]
            errors.append(f"{place}: expected {_type_name(annotation)}, got {value!r} ({detail}).")
            continue
        except Exception:  # annotations pydantic cannot build a validator for are left to the dataclass itself
            pass
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices and not isinstance(value, (list, dict)):
            errors.append(
                f"{place}: {value!r} is not one of {', '.join(map(str, choices))}.{did_you_mean(value, choices)}"
            )
    return errors


def _check_stage_data(spec, data: dict, where: Path_, places: _Places) -> list[str]:
    if spec.data_config is None:
        return [f"{places(where)}: this trainer builds its own rows and takes no data section."] if data else []
    errors = [f"{places(at)}: {message}" for at, message in _unknown_keys(spec.data_config, data, where)]
    if not errors:
        try:
            spec.data_config.model_validate(data)
        except ValidationError as err:
            errors = [
                f"{places((*where, *_pydantic_path(e['loc'], spec.data_config)))}: {_pydantic_message(e)}" for e in err.errors()
            ]
    return errors


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


# --- loading ---------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), instantiate: bool = True) -> Recipe:
    """Read, override and validate a recipe; raise one `LLMRecError` listing every problem found.

    With `instantiate`, each stage's TRL config object is also built once, so checks that TRL and transformers
    do across fields (in `__post_init__`) are reported now rather than after data loading.
    """
    path = Path(path)
    if not path.is_file():
        raise LLMRecError(f"recipe file not found: {path.resolve()}.", str(path))
    raw, lines = _load_yaml(path)
    if not isinstance(raw, dict):
        raise LLMRecError("a recipe is a mapping with sections run, model, data, adapter, stages, eval.", str(path))
    places = _Places(path, lines)
    for override in overrides:
        apply_override(raw, override, places)

    errors = [f"{places(where)}: {message}" for where, message in _unknown_keys(Recipe, raw, ())]
    if errors:
        raise LLMRecError("\n".join(errors))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        messages = [f"{places(_pydantic_path(e['loc']))}: {_pydantic_message(e)}" for e in err.errors()]
        raise LLMRecError("\n".join(dict.fromkeys(messages))) from None

    try:
        recipe.model.check()
    except LLMRecError as err:
        raise LLMRecError(err.message, places(_split_key(err.place or "model"))) from None
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
    for index, stage in enumerate(recipe.stages):
        try:
            spec = get_stage(stage.trainer, f"stages.{index}.trainer")
        except LLMRecError as err:
            errors.append(f"{places(('stages', index, 'trainer'))}: {err.message}")
            continue
        errors += _check_stage_data(spec, stage.data, ("stages", index, "data"), places)
        errors += check_dataclass_args(spec.config_class, stage.args, ("stages", index, "args"), places)
    for split in recipe.eval.splits:
        if split.startswith("ood_") and recipe.data.shift(split.removeprefix("ood_")) is None:
            errors.append(f"{places(('eval', 'splits'))}: {split!r} needs a {split.removeprefix('ood_')} entry in data.shifts.")
    if errors:
        raise LLMRecError("\n".join(errors))
    if instantiate:
        _instantiate(recipe, places)
    return recipe


def _instantiate(recipe: Recipe, places: _Places) -> None:
    import warnings

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
    adapter = get_adapter(recipe.adapter.method)
    if adapter.config_class is not None:
        try:
            adapter.config_class(task_type="CAUSAL_LM", **recipe.adapter.args)
        except (ValueError, TypeError) as err:
            raise LLMRecError(f"{adapter.config_class.__name__} rejected these arguments: {err}", places(("adapter", "args"))) from None
    # what a method needs from the rest of the recipe (CoRA: the CTR task), checked before anything runs
    needs = [*getattr(adapter, "recipe_needs", lambda r: [])(recipe)]
    for stage in recipe.stages:
        needs += get_stage(stage.trainer, "stages").recipe_needs(recipe)
    if recipe.eval.task == "ctr" and recipe.data.ctr is None:
        needs.append((("eval", "task"), "the CTR evaluation needs a data.ctr section (how rated interactions become Yes/No rows)."))
    if recipe.eval.task == "classification":
        if recipe.data.classification is None:
            needs.append((("eval", "task"), "the classification evaluation needs a data.classification section (the "
                          "task, its prompt template and label words)."))
        others = [split for split in recipe.eval.splits if split not in ("test", "valid")]
        if others:
            needs.append((("eval", "splits"), f"a classification task has test and valid splits only, not {others[0]!r}."))
    elif recipe.data.classification is not None:
        needs.append((("eval", "task"), "with data.classification, trainer sft trains on classification rows; evaluate "
                      "them with eval.task: classification (or remove data.classification)."))
    needs += _text_task_needs(recipe)
    needs += _federated_needs(recipe)
    if needs:
        first = {where: message for where, message in reversed(needs)}  # one message per place
        raise LLMRecError("\n".join(f"{places(where)}: {message}" for where, message in reversed(first.items())))


# evaluation task -> (its data section, what the section holds)
TEXT_TASKS = {"reasoning": ("reasoning", "the problems and their prompt template"),
              "preference_summary": ("summaries", "behaviours and judge"),
              "instructions": ("instructions", "the instruction rows")}


def _text_task_needs(recipe: Recipe) -> list[tuple[tuple, str]]:
    """A text task's data section and its evaluation come together, and a recipe has at most one text task."""
    needs = []
    for task, (section, holds) in TEXT_TASKS.items():
        present = getattr(recipe.data, section) is not None
        if recipe.eval.task == task and not present:
            needs.append((("eval", "task"), f"the {task} evaluation needs a data.{section} section ({holds})."))
        elif recipe.eval.task != task and present and recipe.federated is None:  # federated runs evaluate themselves
            needs.append((("eval", "task"), f"with data.{section}, the stages train on that task; evaluate it with "
                          f"eval.task: {task} (or remove data.{section})."))
    if recipe.eval.task == "instructions" and recipe.eval.splits != ["test"]:
        needs.append((("eval", "splits"), "the instruction task has a test split only (eval.splits: [test])."))
    sections = [name for name in ("classification", "reasoning", "summaries", "instructions") if getattr(recipe.data, name) is not None]
    if len(sections) > 1:
        needs.append((("data", sections[1]), f"a recipe has one text task, not data.{' and data.'.join(sections)}."))
    return needs


def _federated_needs(recipe: Recipe) -> list[tuple[tuple, str]]:
    """A federated recipe trains one SFT stage locally with the adapter its rule works on, on data it can deal out."""
    fed = recipe.federated
    if fed is None:
        return []
    from llmrec.federated.rules import build_rule

    needs = []
    rule = build_rule(fed.rule)
    if recipe.adapter.method != rule.adapter:
        needs.append((("adapter", "method"), f"federated.rule {fed.rule!r} works on adapter.method {rule.adapter!r}, "
                      f"not {recipe.adapter.method!r}."))
    if len(recipe.stages) != 1 or recipe.stages[0].trainer != "sft":
        needs.append((("stages",), "a federated recipe has one stage, `trainer: sft`: the clients' local training "
                      "(its max_steps = local steps per round)."))
    elif "max_steps" not in recipe.stages[0].args:
        needs.append((("stages", 0, "args"), "set max_steps: the number of local training steps per round."))
    if fed.partition.by == "category" and recipe.data.instructions is None:
        needs.append((("federated", "partition", "by"), "partitions by category deal out the examples of "
                      "data.instructions; add that section (or partition by user_group)."))
    return needs


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


__all__ = ["Recipe", "load_recipe", "parse_value", "closest", "STAGE_DEFAULTS"]
