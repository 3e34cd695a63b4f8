"""Command-line options derived from the config dataclasses (``config.py``) and the registries.

Each config field becomes ``--field-name`` (or its declared ``flag``), with its default, help
text and choices taken from its declaration; registry-backed fields list the registered names.
Nested configs (``PruneConfig.utility``) are flattened. So a new config field, or a newly
registered method, prior or utility, shows in ``--help`` without an edit here.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from bonsai_prune.core.weights import format_weights, parse_weights

_PARSERS = {"weights": (parse_weights, format_weights)}


def _registry(name: str):
    """The registry a field's names come from (imported here: registries fill on import)."""
    if name == "method":
        from bonsai_prune.methods import METHODS

        return METHODS
    if name == "prior":
        from bonsai_prune.core.priors import PRIORS

        return PRIORS
    if name == "utility":
        from bonsai_prune.utility import UTILITIES

        return UTILITIES
    raise KeyError(name)


def _scalar_type(annotation: Any) -> type:
    """int / float / str / bool of an annotation such as ``int | None``."""
    hints = {"int": int, "float": float, "str": str, "bool": bool}
    if isinstance(annotation, str):
        for part in annotation.split("|"):
            part = part.strip()
            if part in hints:
                return hints[part]
        return str
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}"


def add_config_options(
    parser: argparse.ArgumentParser,
    config_cls: type,
    *,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
    prefix: str = "",
    defaults: Any = None,
) -> None:
    """Add one option per field of ``config_cls`` (recursing into nested configs)."""
    defaults = defaults if defaults is not None else config_cls()
    for f in dataclasses.fields(config_cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            add_config_options(
                parser,
                type(default),
                only=only,
                skip=skip,
                prefix=f"{prefix}{f.name}.",
                defaults=default,
            )
            continue
        meta = f.metadata
        flags = [f"--{meta.get('flag', f.name).replace('_', '-')}", *meta.get("aliases", ())]
        # argparse %-formats help: a literal "%" in a config's help text must reach it as "%%"
        text = meta.get("help", "").replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": _dest(prefix, f.name), "help": text}
        if _scalar_type(f.type) is not bool and "choices" not in meta:
            kwargs["metavar"] = meta.get("flag", f.name).upper()
        kind = _scalar_type(f.type)
        if kind is bool:  # a default of True is turned off with --no-<flag>
            action = argparse.BooleanOptionalAction if default else "store_true"
            if default:
                kwargs["help"] += " (default: on)"
            parser.add_argument(*flags, action=action, default=bool(default), **kwargs)
            continue
        if "parse" in meta:
            shown = _PARSERS[meta["parse"]][1](default)
            kwargs["help"] += f" (default: {shown})".replace("%", "%%")
            parser.add_argument(*flags, default=shown, **kwargs)
            continue
        if "registry" in meta:
            names = ", ".join(_registry(meta["registry"]).names()).replace("%", "%%")
            kwargs["help"] = f"{kwargs['help']} (one of: {names})"
        elif "choices" in meta:
            kwargs["choices"] = list(meta["choices"])
        if default is not None:
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(*flags, type=kind, default=default, **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace, prefix: str = "", **fixed):
    """Build ``config_cls`` from the options :func:`add_config_options` added (and ``fixed``)."""
    values: dict[str, Any] = {}
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        default = getattr(defaults, f.name)
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif dataclasses.is_dataclass(default):
            values[f.name] = config_from_args(type(default), args, f"{prefix}{f.name}.")
        elif hasattr(args, _dest(prefix, f.name)):
            value = getattr(args, _dest(prefix, f.name))
            if "parse" in f.metadata:
                value = _PARSERS[f.metadata["parse"]][0](value)
            values[f.name] = value
    return config_cls(**values)
