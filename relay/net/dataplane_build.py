"""Builds `relay.net._dataplane`, the native UDP data plane, with cffi's API mode: one C
source (dataplane.c) compiled for whichever runtime builds it, CPython or PyPy.

`pip install .` runs it (setup.py's `cffi_modules`); by hand, from the checkout's root:
`python relay/net/dataplane_build.py` writes the module next to this file.
TURNRELAY_NATIVE_CFLAGS adds compiler flags, for example `-fsanitize=address,undefined -g`
for the sanitizer build the interop tests run against once (bench/asan.sh).
"""
import hashlib
import os
import shlex
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent


def source_digest() -> str:
    """What the module is built from: relay.net.dataplane compares it with the sources beside
    it, so a checkout updated without a rebuild falls back to the Python data plane instead of
    calling C functions whose signatures changed."""
    return hashlib.sha256(b"".join((HERE / name).read_bytes()
                                   for name in ("dataplane.h", "dataplane.c"))).hexdigest()


ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "dataplane.h").read_text() + "\nconst char *dp_source_digest(void);")
_flags = shlex.split(os.environ.get("TURNRELAY_NATIVE_CFLAGS", ""))
ffibuilder.set_source(
    "relay.net._dataplane",
    '#include "dataplane.c"\n'
    f'const char *dp_source_digest(void) {{ return "{source_digest()}"; }}',
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(HERE / "dataplane.c"), os.path.relpath(HERE / "dataplane.h")],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra",
                        "-Werror=implicit-function-declaration"] + _flags,
    extra_link_args=[flag for flag in _flags if flag.startswith("-fsanitize")],
    libraries=["pthread"],
)

if __name__ == "__main__":
    os.chdir(HERE.parent.parent)
    ffibuilder.compile(verbose=False)
