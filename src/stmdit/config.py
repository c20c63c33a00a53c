"""Typed YAML configuration: one base class and one loader for every ``stmdit`` config.

A config is a pydantic model that refuses unknown keys, takes values of the declared type
only (``"32"`` is not a batch size, ``32.7`` is not a tile size) and refuses NaN and
infinities. Loading a file turns every problem into one :class:`~stmdit.errors.ConfigError`
whose lines name the file, the line, the key path (``model.hidden_size``), the value given
and what was expected; a YAML syntax error names the file, line and column.

YAML 1.1, which PyYAML implements, reads ``1e-4`` as a string; the loader here reads it as
the number every other YAML 1.2 tool (and every user) means.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from stmdit.errors import ConfigError


def _as_path_text(value):
    return os.fspath(value) if isinstance(value, os.PathLike) else value


# A file or folder path; a ``pathlib.Path`` given from Python is taken as its text.
PathStr = Annotated[str, BeforeValidator(_as_path_text)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats (``1e-4``, ``5E3``) read as numbers."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: str | os.PathLike) -> tuple[Any, yaml.Node | None]:
    """The document of a YAML file and its node tree (for line numbers); a syntax error
    becomes a :class:`ConfigError` naming the file, line and column."""
    path = Path(path)
    text = path.read_text()
    loader = ConfigLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = " ".join(p for p in (err.context, err.problem) if p)
        raise ConfigError(f"{path}: YAML syntax error at {where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    finally:
        loader.dispose()
    return data, node


class ConfigModel(BaseModel):
    """Base of every config: unknown keys, values of another type and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)

    # How messages call this config ("training config").
    config_name: ClassVar[str] = "config"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides):
        """Load ``path``; ``overrides`` that are not None (command-line options) replace its keys."""
        return load_config(cls, path, **overrides)

    def to_dict(self) -> dict:
        return self.model_dump(mode="python")


def load_config(cls: type[ConfigModel], path: str | os.PathLike, **overrides):
    data, node = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: a {cls.config_name} must be a mapping of keys to values; got {_kind(data)}"
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            describe_validation_error(err, cls, source=str(path), node=node, overridden=set(given))
        ) from None


def describe_validation_error(
    err: ValidationError,
    cls: type[BaseModel] | None = None,
    source: str | None = None,
    node: yaml.Node | None = None,
    overridden: set[str] = frozenset(),
    inline: bool = False,
) -> str:
    """One line per problem: ``FILE, line N: key.path: what was expected; got VALUE``
    (``inline``: the problems alone, joined by "; ", to go inside another message)."""
    name = cls.config_name if cls is not None and hasattr(cls, "config_name") else err.title
    lines = []
    for e in err.errors():
        keys, allowed = _walk(cls, e["loc"]) if cls is not None else (list(e["loc"]), None)
        key = ".".join(str(k) for k in keys) or "(top level)"
        where, line = source or name, None
        if keys and keys[0] in overridden:
            where = "command line"
        elif node is not None:
            line = _line_of(node, keys)
            if line is not None:
                where = f"{where}, line {line}"
        if e["type"] == "extra_forbidden":
            text = f"{key}: unknown key"
            if allowed:
                close = difflib.get_close_matches(str(keys[-1]), allowed, n=1)
                text += f" (did you mean {close[0]!r}?)" if close else ""
                text += f"; known keys here: {', '.join(sorted(allowed))}"
        elif e["type"] == "missing":
            text = f"{key}: required key is missing"
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            text = f"{key}: expected a mapping of keys to values; got {_show(e.get('input'))}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            text = f"{key}: {msg[0].lower() + msg[1:]}"
            value = e.get("input")
            # Our own validators' messages already show the value (or the entry's problems).
            if not (e["type"] == "value_error" and (isinstance(value, (dict, list)) or str(value) in msg)):
                text += f"; got {_show(value)}"
        lines.append((line or 0, text if inline else f"{where}: {text}"))
    lines = [text for _, text in sorted(lines, key=lambda item: item[0])]  # in file order
    if inline:
        return "; ".join(lines)
    header = f"invalid {name} ({len(lines)} problem{'s' * (len(lines) > 1)}):\n  " if len(lines) > 1 else ""
    return header + "\n  ".join(lines)


def _show(value) -> str:
    if isinstance(value, dict):
        return f"a mapping with keys {sorted(map(str, value))}"
    text = repr(value)
    return (text[:77] + "...") if len(text) > 80 else f"{text} ({_kind(value)})"


def _kind(value) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "text",
        bool: "true/false",
        int: "an integer",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)


def _walk(cls, loc) -> tuple[list, list[str] | None]:
    """The key path of an error location as the user wrote it (pydantic adds union tags and
    type names to locations), and the keys of the last mapping model on the way (for an
    unknown key: the keys it could have been)."""
    keys: list = []
    holder = None
    current: Any = cls
    for part in loc:
        current = _unwrap(current)
        origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            holder = current
            keys.append(part)
            field = current.model_fields.get(part)
            current = field.annotation if field is not None else None
        elif origin in (list, tuple) and isinstance(part, int):
            keys.append(part)
            args = typing.get_args(current)
            current = args[0] if args else None
        elif origin is dict:
            keys.append(part)
            args = typing.get_args(current)
            current = args[1] if len(args) == 2 else None
        elif origin in (typing.Union, types.UnionType):
            names = {m: (_tag(m), getattr(_unwrap(m), "__name__", None)) for m in typing.get_args(current)}
            members = [m for m, labels in names.items() if part in labels]
            if members:  # a union's tag or member name, not a key
                current = members[0]
            elif not (isinstance(part, str) and not part.isidentifier()):  # e.g. "list[float]"
                keys.append(part)
                current = None
        elif not (isinstance(part, str) and not part.isidentifier()):
            keys.append(part)
            current = None
    return keys, (list(holder.model_fields) if holder is not None else None)


def _unwrap(annotation):
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(annotation) if m is not type(None)]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _tag(member) -> str | None:
    member = _unwrap(member)
    if isinstance(member, type) and issubclass(member, BaseModel):
        return getattr(member, "tag", None)
    return None


def _line_of(node: yaml.Node, keys: list) -> int | None:
    """1-based line of the deepest node along ``keys`` that exists in the file."""
    line = None
    for key in keys:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == str(key)), None)
            if match is None:
                key_node = next((k for k, _ in node.value if getattr(k, "value", None) == str(key)), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            line = next(k for k, v in node.value if v is match).start_mark.line + 1
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line
