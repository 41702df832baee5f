"""A ConfigMap volume as the kubelet writes it, for tests of what reads one (the relays'
--regions-file, the directory the operator writes) without a kubelet."""
from __future__ import annotations

import os
import pathlib
import shutil


def kubelet_write(directory: pathlib.Path, text: str, stamp: str, name: str = "regions.toml") -> None:
    """An update as the kubelet's AtomicWriter makes it: the new content in a fresh
    `..TIMESTAMP` directory, `..data` swapped to it by a rename, the old one removed; the file
    itself stays a link through `..data` (created on the first write)."""
    fresh = directory / f"..{stamp}"
    fresh.mkdir()
    (fresh / name).write_text(text)
    data = directory / "..data"
    old = os.readlink(data) if data.is_symlink() else None
    os.symlink(fresh.name, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", data)
    if old:
        shutil.rmtree(directory / old)
    if not (directory / name).is_symlink():
        os.symlink(f"..data/{name}", directory / name)
