"""Build the one C extension: seq_cst atomics on shared buffers (shmcounter/_atomic.c)."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shmcounter._atomic",
            sources=["shmcounter/_atomic.c"],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
