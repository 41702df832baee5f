"""Everything but the native data plane's build lives in setup.cfg: `cffi_modules` has no
setup.cfg form."""
from setuptools import setup

setup(cffi_modules=["relay/net/dataplane_build.py:ffibuilder"])
