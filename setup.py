"""Build the C extensions: seq_cst atomics on shared buffers and the core's fused
steps (shmcounter/_atomic.c), and the memcg layer's legacy steps
(shmcounter/memcg/_legacy.c); both share shmcounter/_slots.h."""
from setuptools import Extension, setup

FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension("shmcounter._atomic", sources=["shmcounter/_atomic.c"],
                  depends=["shmcounter/_slots.h"], extra_compile_args=FLAGS),
        Extension("shmcounter.memcg._legacy", sources=["shmcounter/memcg/_legacy.c"],
                  depends=["shmcounter/_slots.h"], extra_compile_args=FLAGS),
    ]
)
