"""Builds the C++ extensions (shared helpers, Beta kernel, id index, cache table, arm table, event ring); metadata
lives in pyproject.toml.

Environment overrides:
    MAB_CFLAGS      replaces the optimisation flags (default ``-O3``)
    MAB_DEBUG=1     ``-O0 -g``, Cython annotation and line tracing (coverage of .pyx lines)
    MAB_SANITIZE=1  AddressSanitizer and UndefinedBehaviorSanitizer
"""

from __future__ import annotations

import os

import numpy
from Cython import __version__ as cython_version
from Cython.Build import cythonize
from setuptools import Extension, setup

if int(cython_version.split(".")[0]) < 3:
    raise RuntimeError(f"mab-service needs Cython >= 3.0 to build (found {cython_version})")

DEBUG = os.environ.get("MAB_DEBUG") == "1"
SANITIZE = os.environ.get("MAB_SANITIZE") == "1"

# -ffp-contract=off keeps every instruction-set build of the kernel bit-identical (no fused multiply-add
# in one and not another); -fno-math-errno lets sqrt compile to one vector instruction.
compile_args = ["-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-psabi"]
compile_args += os.environ.get("MAB_CFLAGS", "-O0 -g" if DEBUG else "-O3").split()
link_args: list[str] = []
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
directives = {"language_level": "3", "embedsignature": True}
if DEBUG:
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]
    directives["linetrace"] = True
if SANITIZE:
    compile_args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    link_args += ["-fsanitize=address,undefined"]


def extension(name: str, sources: list[str], depends: list[str]) -> Extension:
    """A C++ extension built with the flags above, shared by every compiled module."""
    return Extension(
        name,
        sources=sources,
        depends=depends,
        include_dirs=["csrc", numpy.get_include()],
        define_macros=macros,
        language="c++",
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


# The helpers every other module cimports (id views, scratch, parameter checks); the cold ones are compiled here.
cyutil = extension("mab_service._cyutil", sources=["mab_service/_cyutil.pyx"], depends=["mab_service/_cyutil.pxd"])
kernel = extension(
    "mab_service.policy._kernel",
    sources=["mab_service/policy/_kernel.pyx", "csrc/mab/kernel.cpp"],
    depends=["csrc/mab/kernel.hpp", "csrc/mab/rng.hpp", "csrc/mab/beta_simd.inc", "mab_service/policy/_kernel.pxd"],
)
index = extension(
    "mab_service.features._index",
    sources=["mab_service/features/_index.pyx", "csrc/mab/id_index.cpp"],
    depends=["csrc/mab/id_index.hpp", "mab_service/features/_index.pxd", "mab_service/_cyutil.pxd"],
)
# The cache table hashes with the id index's seeded hash (hash_id), so it links id_index.cpp too.
cache = extension(
    "mab_service.features._cache",
    sources=["mab_service/features/_cache.pyx", "csrc/mab/cache_table.cpp", "csrc/mab/id_index.cpp"],
    depends=[
        "csrc/mab/cache_table.hpp",
        "csrc/mab/id_index.hpp",
        "mab_service/features/_cache.pxd",
        "mab_service/_cyutil.pxd",
    ],
)
# The event ring hashes with the id index's keyed hash (hash_id_keyed), so it links id_index.cpp too.
events = extension(
    "mab_service.learning._events",
    sources=["mab_service/learning/_events.pyx", "csrc/mab/event_ring.cpp", "csrc/mab/id_index.cpp"],
    depends=[
        "csrc/mab/event_ring.hpp",
        "csrc/mab/id_index.hpp",
        "mab_service/learning/_events.pxd",
        "mab_service/_cyutil.pxd",
    ],
)

# The arm table hashes with the id index's keyed hash (hash_id_keyed, inline) and draws its key with
# draw_hash_key, so it links id_index.cpp too.
arms = extension(
    "mab_service.learning._arms",
    sources=["mab_service/learning/_arms.pyx", "csrc/mab/arm_table.cpp", "csrc/mab/id_index.cpp"],
    depends=[
        "csrc/mab/arm_table.hpp",
        "csrc/mab/id_index.hpp",
        "mab_service/learning/_arms.pxd",
        "mab_service/_cyutil.pxd",
    ],
)

# Feature Store 2.0 answers decoded from their wire bytes: Cython alone, no C++ sources.
answer = extension(
    "mab_service.learning._answer",
    sources=[
        "mab_service/learning/_answer.pyx",
        "csrc/mab/answer.cpp",
        "csrc/mab/arm_table.cpp",
        "csrc/mab/event_ring.cpp",
        "csrc/mab/id_index.cpp",
        "csrc/mab/kernel.cpp",
        "csrc/yyjson/yyjson.c",
    ],
    depends=[
        "csrc/mab/answer.hpp",
        "csrc/mab/arm_table.hpp",
        "csrc/mab/event_ring.hpp",
        "csrc/mab/id_index.hpp",
        "csrc/mab/kernel.hpp",
        "csrc/mab/rng.hpp",
        "csrc/mab/beta_simd.inc",
        "csrc/yyjson/yyjson.h",
        "mab_service/learning/_arms.pxd",
        "mab_service/learning/_events.pxd",
        "mab_service/policy/_kernel.pxd",
        "mab_service/_cyutil.pxd",
    ],
)

wire = extension("mab_service.features._wire", sources=["mab_service/features/_wire.pyx"], depends=[])
# The check of the parameters a source read, before sampling: Cython alone.
params = extension(
    "mab_service.features._params", sources=["mab_service/features/_params.pyx"], depends=["mab_service/_cyutil.pxd"]
)

modules = [cyutil, kernel, index, cache, arms, events, answer, wire, params]
setup(ext_modules=cythonize(modules, compiler_directives=directives, annotate=DEBUG))
