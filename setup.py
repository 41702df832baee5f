"""Everything but the native modules' builds lives in setup.cfg: `cffi_modules` has no
setup.cfg form."""
from setuptools import setup

setup(cffi_modules=["relay/net/dataplane_build.py:ffibuilder",
                    "relay/util/keyed_hmac_build.py:ffibuilder"])
