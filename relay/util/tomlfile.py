"""Reading the TOML files an operator gives (--config, --users-file, --regions-file,
--rate-table): `tomllib` where the standard library has it (3.11+), else its backport `tomli`
(3.9/3.10 and PyPy), and one error naming the file for one it cannot open or parse."""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10 and PyPy
    import tomli as tomllib


def read_toml(path: str, parse_float: Callable[[str], Any] = float) -> Dict[str, Any]:
    """The document in the TOML file at `path`, its floats read by `parse_float`.

    Raises ValueError "cannot read PATH: REASON" for a file that cannot be opened or is not
    TOML; callers put the flag or file in front of it.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f, parse_float=parse_float)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"cannot read {path}: {err}") from None
