"""Build the C extensions: seq_cst atomics on shared buffers, the core's fused steps
(shmcounter/_atomic.c) and its whole ops (shmcounter/_counter.c), and the memcg
layer's legacy steps (shmcounter/memcg/_legacy.c); all share shmcounter/_slots.h
and the op kernel shmcounter/_op.h."""
from setuptools import Extension, setup

FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension("shmcounter._atomic", sources=["shmcounter/_atomic.c", "shmcounter/_counter.c"],
                  depends=["shmcounter/_slots.h", "shmcounter/_op.h"], extra_compile_args=FLAGS),
        Extension("shmcounter.memcg._legacy", sources=["shmcounter/memcg/_legacy.c"],
                  depends=["shmcounter/_slots.h", "shmcounter/_op.h"], extra_compile_args=FLAGS),
    ]
)
