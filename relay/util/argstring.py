"""strcred-style argument strings: `name=value,name=value` after a plugin's name."""
from __future__ import annotations

import re
from typing import Dict, Iterable


def parse_arguments(argstring: str, allowed: Iterable[str]) -> Dict[str, str]:
    allowed = set(allowed)
    arguments: Dict[str, str] = {}
    for part in filter(None, re.split(r",(?=[\w-]+=)", argstring)):
        name, sep, value = part.partition("=")
        if not sep or name not in allowed:
            raise ValueError(f"unknown argument {name!r}; expected {', '.join(sorted(allowed))}")
        arguments[name] = value
    return arguments


def single_argument(argstring: str, name: str) -> str:
    """The value of `name`, the one argument a built-in backend takes; ValueError without it."""
    value = parse_arguments(argstring, (name,)).get(name)
    if not value:
        raise ValueError(f"{name}=... is required")
    return value
