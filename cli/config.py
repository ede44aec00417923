"""Command-line options generated from a config dataclass: one option per field, named after it (or its
`flags` metadata), typed from its annotation, with the docstring under the field as its help."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Callable

import click

from lorsa_surgery.lorsa.config import check_number

MAX_THREADS = 4096
"""More CPU threads than any machine has; torch refuses a count it cannot hold with a traceback."""


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, from a --threads option (None: torch's choice)."""
    if threads is not None:
        check_number(threads, "--threads", integer=True, minimum=1, maximum=MAX_THREADS)  # before torch loads
        import torch

        torch.set_num_threads(threads)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass, whitespace collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(getattr(after, "value", None), ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _unwrap(annotation) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


class _ListOf(click.ParamType):
    """Numbers, repeated or comma-separated: `--layer 3 --layer 17` or `--layers 3,17`."""

    def __init__(self, item: type):
        self.item, self.name = item, f"{item.__name__.upper()}[,{item.__name__.upper()}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return [value]
        try:
            return [self.item(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__}s", param, ctx)


def config_options(cls: type, positional: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                   overrides: bool = False) -> Callable[[Callable], Callable]:
    """A decorator adding an argument per `positional` field and an option per other field of `cls` but those in
    `exclude`; the command receives them under the field names (lists of numbers flattened into tuples). With
    `overrides`, every option defaults to None (an empty tuple for lists): the command overrides only what was
    given, e.g. on a named preset. A list field with `files` in its metadata takes paths of existing files; one with
    `spec` takes strings the config parses (repeated or comma-separated)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    params = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind, optional = _unwrap(hints[f.name])
        if f.name in positional:
            params.append(click.Argument([f.name]))
            continue
        flags = list(f.metadata.get("flags", ())) or ["--" + f.name.replace("_", "-")]
        has_default = f.default is not dataclasses.MISSING and not overrides
        default = f.default if has_default else None
        settings: dict[str, Any] = {"help": docs.get(f.name, ""), "required": not has_default and not overrides,
                                    "show_default": has_default and default not in (None, ())}
        if kind is bool:
            stem = flags[0][2:]
            params.append(click.Option([f"--{stem}/--no-{stem}", f.name], default=default, **settings))
            continue
        if f.metadata.get("spec"):  # numbers, ranges and words the config parses itself (layers: "0-5,12", "all")
            settings.update(multiple=True, default=(), type=click.STRING)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            files = click.Path(exists=True, dir_okay=False) if f.metadata.get("files") else click.STRING
            settings.update(multiple=True, default=(), type=_ListOf(item) if item in (int, float) else files)
        elif typing.get_origin(kind) is typing.Literal:
            settings.update(type=click.Choice([str(c) for c in typing.get_args(kind)]), default=default)
        else:
            settings.update(type=kind, default=default)
        params.append(click.Option([*flags, f.name], **settings))

    def decorate(command: Callable) -> Callable:
        def flatten(**values):
            for f in dataclasses.fields(cls):
                value = values.get(f.name)
                if isinstance(value, tuple) and value and isinstance(value[0], list):
                    values[f.name] = tuple(v for part in value for v in part)
            return command(**values)

        flatten.__name__, flatten.__doc__ = command.__name__, command.__doc__
        # After the parameters of the decorators below, as click lists those of a decorator where it stands.
        flatten.__click_params__ = getattr(command, "__click_params__", []) + list(reversed(params))
        return flatten

    return decorate
