# cffi's setuptools hook needs setup(cffi_modules=...); everything else lives in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["xmp/sharedmem/_build_fast.py:ffibuilder"])
