"""Secret files: one secret a line, the first one signs, every one verifies (rotation)."""
from __future__ import annotations

from typing import List


def read_secrets(path: str) -> List[bytes]:
    """The secrets in `path`; OSError when unreadable, ValueError when it holds none."""
    with open(path, "rb") as f:
        secrets = [line.strip() for line in f.read().splitlines() if line.strip()]
    if not secrets:
        raise ValueError(f"{path} holds no secret")
    return secrets
