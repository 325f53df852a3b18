"""Reading recipes: YAML with the line of every key, `key=value` overrides, and errors that name their place.

Nothing here knows what a recipe holds: `llmrec.recipe` (the schema) hands its section classes to `unknown_keys`,
`pydantic_errors`, `check_dataclass_args` and `check_section`, which turn every problem into `<place>: <message>`,
the place being `file:line: dotted.key` or `override 'k=v': dotted.key`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import TypeAdapter, ValidationError

from llmrec.errors import LLMRecError, did_you_mean
from llmrec.schema import Section


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (prompt templates) as literal blocks, the way people write them, and strings of
    whitespace only (a separator "\n") in double quotes, where they are visible."""


def _string_style(text: str) -> str | None:
    if "\n" in text:
        return "|" if text.strip() else '"'
    return None


_Dumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style=_string_style(text))
)


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def dump_yaml_with_comments(obj: dict, comments: dict[tuple, str], width: int = 116) -> str:
    """`obj` as block YAML with `comments[key path]` written as `# ...` lines above each key (wrapped at `width`)."""
    import textwrap

    def lines_of(mapping: dict, where: tuple, indent: str) -> list[str]:
        out = []
        for key, value in mapping.items():
            path = (*where, key)
            note = comments.get(path)
            if note:
                out += [f"{indent}# {line}" for line in textwrap.wrap(" ".join(note.split()), width - len(indent) - 2)]
            if isinstance(value, dict) and value:
                out += [f"{indent}{key}:", *lines_of(value, path, indent + "  ")]
            elif isinstance(value, list) and value and all(isinstance(v, dict) and v for v in value):
                out.append(f"{indent}{key}:")
                for index, item in enumerate(value):
                    item_lines = lines_of(item, (*path, index), indent + "  ")
                    first = next(i for i, line in enumerate(item_lines) if not line.lstrip().startswith("#"))
                    item_lines[first] = f"{indent}- {item_lines[first][len(indent) + 2:]}"
                    out += item_lines
            else:
                out += [indent + line for line in dump_yaml({key: value}).rstrip("\n").split("\n")]
        return out

    return "\n".join(lines_of(obj, (), "")) + "\n"


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

Path_ = tuple[str | int, ...]


def parse_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: Path) -> tuple[Any, dict[Path_, int]]:
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


class Places:
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


def split_key(key: str) -> Path_:
    return tuple(int(part) if part.isdigit() else part for part in key.split("."))


def apply_override(raw: dict, override: str, places: Places) -> None:
    if "=" not in override:
        raise LLMRecError("expected key=value, e.g. stages.0.args.learning_rate=1e-4.", f"override {override!r}")
    key, text = override.split("=", 1)
    where = split_key(key.strip())
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
        if all(name in m.model_fields and get_origin(m.model_fields[name].annotation) is typing.Literal
               for m in members):
            return name, {tag: m for m in members for tag in get_args(m.model_fields[name].annotation)}
    return None


def unknown_keys(annotation: Any, raw: Any, where: Path_) -> list[tuple[Path_, str]]:
    """(path, message) for every key the schema does not know, with the closest valid spelling."""
    problems: list[tuple[Path_, str]] = []
    union = _union_sections(annotation)
    if union is not None:
        tag, members = union
        if isinstance(raw, dict) and raw.get(tag) in members:
            return unknown_keys(members[raw[tag]], raw, where)
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
                problems.extend(unknown_keys(fields[key].annotation, value, (*where, key)))
    elif get_origin(annotation) is list and isinstance(raw, list):
        for i, value in enumerate(raw):
            problems.extend(unknown_keys(get_args(annotation)[0], value, (*where, i)))
    return problems


def pydantic_path(loc: tuple, annotation: Any) -> Path_:
    """A pydantic error location without the union tags it inserts."""
    out: list = []
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


def pydantic_message(error: dict) -> str:
    kind, message = error["type"], error["msg"]
    if kind == "missing":
        return "this key is required but missing."
    if kind == "union_tag_invalid":
        context = error.get("ctx", {})
        tags = context.get("expected_tags", "")
        tag = context.get("tag", "")
        suggestion = did_you_mean(tag, re.findall(r"[\w-]+", tags))
        discriminator = context.get("discriminator", "tag").strip(chr(39))
        return f"unknown {discriminator} {tag!r}; expected one of {tags}.{suggestion}"
    if kind == "union_tag_not_found":
        context = error.get("ctx", {})
        return (f"a {context.get('discriminator', 'tag')} key is required here; expected one of "
                f"{context.get('expected_tags', '')}.")
    message = message.removeprefix("Value error, ")
    shown = error.get("input")
    if not isinstance(shown, (dict, list)):
        message += f" (got {shown!r})"
    return message[0].lower() + message[1:] + ("" if message.endswith((".", ")")) else ".")


# --- dataclass args (TRL configs, PEFT configs) --------------------------------------------------------------


def check_dataclass_args(config_class: type, args: dict, where: Path_, places: Places,
                         reserved: dict[str, str] | None = None) -> list[str]:
    """Errors for `args` against a dataclass: unknown fields, wrong types, values outside `choices`, and keys
    `reserved` says cannot be set there ({key: why})."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.init}
    errors = []
    for key, value in args.items():
        place = places((*where, key))
        if reserved and key in reserved:
            errors.append(f"{place}: cannot be set here: {reserved[key]}.")
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


def check_section(section_class: type[Section], data: dict, where: Path_, places: Places) -> list[str]:
    """Errors for `data` against a section class: unknown keys first, then pydantic's."""
    errors = [f"{places(at)}: {message}" for at, message in unknown_keys(section_class, data, where)]
    if not errors:
        try:
            section_class.model_validate(data)
        except ValidationError as err:
            errors = [
                f"{places((*where, *pydantic_path(e['loc'], section_class)))}: {pydantic_message(e)}"
                for e in err.errors()
            ]
    return errors


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None")


