"""Builds `relay.util._keyed_hmac`, the native HMAC of relay.util.keyed_hmac, with cffi's API
mode against OpenSSL's libcrypto, for whichever runtime builds it, CPython or PyPy.

`pip install .` runs it (setup.py's `cffi_modules`); by hand, from the checkout's root:
`python relay/util/keyed_hmac_build.py` writes the module next to this file.  The module is
optional: without OpenSSL's headers (Debian: `libssl-dev`) the install goes on without it and
the HMACs are made by `hashlib`.  TURNRELAY_NATIVE_CFLAGS adds compiler flags (bench/asan.sh).
"""
import os
import shlex
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent

ffibuilder = cffi.FFI()
ffibuilder.cdef((HERE / "keyed_hmac.h").read_text())
_flags = shlex.split(os.environ.get("TURNRELAY_NATIVE_CFLAGS", ""))
ffibuilder.set_source(
    "relay.util._keyed_hmac",
    '#include "keyed_hmac.c"',
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(HERE / "keyed_hmac.c"), os.path.relpath(HERE / "keyed_hmac.h")],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra",
                        "-Werror=implicit-function-declaration"] + _flags,
    extra_link_args=[flag for flag in _flags if flag.startswith("-fsanitize")],
    libraries=["crypto"],
    optional=True,
)

if __name__ == "__main__":
    os.chdir(HERE.parent.parent)
    ffibuilder.compile(verbose=False)
