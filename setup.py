"""Builds csrc/mapper.cpp (the native mapping thread, loaded with ctypes). Metadata: pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "vllm_vattention._mapper", ["csrc/mapper.cpp"], language="c++",
    extra_compile_args=["-O2", "-std=c++17", "-fvisibility=default"], extra_link_args=["-pthread"])])
