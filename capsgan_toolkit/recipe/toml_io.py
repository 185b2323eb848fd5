"""Reading and writing TOML: recipe files with clear errors, resolved recipes back to text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib

from capsgan_toolkit.errors import RecipeError


def read_toml(path: str | Path) -> dict:
    """Read a TOML file, turning every failure into a RecipeError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file. Check the path (recipes live in recipes/).") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        if "(at end of document)" in message:  # tomllib gives no line and column there
            lines = text.split("\n")
            message = message.replace("(at end of document)",
                                      f"(at line {len(lines)}, column {len(lines[-1]) + 1}: the end of the file)")
        raise RecipeError(f"{path}: not valid TOML: {message}. Fix the syntax at that line and column.") from None


def dumps_toml(data: dict, _prefix: str = "") -> str:
    """Write a dict of plain values as TOML (enough for resolved recipes)."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            scalars.append(f"{_toml_key(key)} = {toml_value(value)}")
    out = []
    if _prefix and scalars:
        out.append(f"[{_prefix}]")
    out.extend(scalars)
    for key, value in tables:
        name = f"{_prefix}.{_toml_key(key)}" if _prefix else _toml_key(key)
        block = dumps_toml(value, name) or f"[{name}]"  # an empty table still says it is there
        out.append("")
        out.append(block)
    return "\n".join(out).strip("\n")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def toml_value(value: Any) -> str:
    """Write a plain value as an inline TOML value (what ``--set key=value`` parses back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + (f" {items} " if items else "") + "}"
    if value is None:
        raise ValueError("TOML has no null")
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
