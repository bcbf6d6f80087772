"""Which llama.cpp build and load options are safe on a CPU, from what the CPU reports.

Pure functions over text (``/proc/cpuinfo``, ``llama_print_system_info()``): the build
script, the engine runner and ``meshnode doctor`` feed them what they read, and the tests
feed them the text of machines we do not have (an AMX Xeon, say).

Why this exists: on CPUs with AMX (Intel Sapphire Rapids and newer) a llama.cpp built
with ``-march=native`` compiles its AMX "extra buffer type"; Q4_K/Q8_0 weights are then
repacked into it and ``llama_decode`` segfaults (ggml-org/llama.cpp#20824, ollama#17006).
Two ways out: build without AMX (keeps the CPU REPACK buffer, which makes Q4 matmuls
faster), or load with ``use_extra_bufts = False`` (drops AMX and REPACK both). The build
profiles here take the first; the runner applies the second only when the llama.cpp it
finds has AMX compiled in on a CPU that has it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

# /proc/cpuinfo flag -> the ggml CMake option that compiles kernels for it. Order matters
# only for readability of the generated command line.
GGML_ISA_OPTIONS: tuple[tuple[str, str], ...] = (
    ("sse4_2", "GGML_SSE42"),
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("bmi2", "GGML_BMI2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),  # the kernel spells this one without "_"
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
)
# Never compiled by our profiles: the AMX buffer type is what crashes (see module doc).
GGML_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# CPU flags that mean "this CPU can run AMX kernels" (either is enough for ggml's AMX path).
AMX_CPU_FLAGS = frozenset({"amx_tile", "amx_int8", "amx_bf16"})
# The portable profile targets x86-64-v3 (Haswell, 2013, and every AMD Zen): AVX2 + FMA.
PORTABLE_X86_FLAGS = frozenset({"sse4_2", "avx", "avx2", "bmi2", "fma", "f16c"})

Profile = Literal["cpu-portable", "cpu-native-safe", "cuda"]
PROFILES: tuple[str, ...] = ("cpu-portable", "cpu-native-safe", "cuda")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` text (x86 ``flags`` or
    Arm ``Features``); empty when the text has neither."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
            return value.strip()
    return "unknown"


def has_amx(flags: Iterable[str]) -> bool:
    return bool(AMX_CPU_FLAGS & set(flags))


def is_x86(flags: Iterable[str]) -> bool:
    # sse2 is part of x86-64's baseline; Arm's Features line never has it.
    return "sse2" in set(flags)


def cmake_args(
    profile: str, flags: Iterable[str], *, cuda_arch: str | None = None
) -> list[str]:
    """CMake options for llama.cpp (llama-cpp-python's CMAKE_ARGS) for a build profile.

    - cpu-portable: x86-64-v3 kernels (AVX2/FMA), runs on any CPU since 2013.
    - cpu-native-safe: every ISA extension this CPU reports, AMX excluded: the speed of
      ``-march=native`` without the AMX buffer type that crashes.
    - cuda: cpu-native-safe for the host part, plus CUDA for ``cuda_arch`` (e.g. "90"
      for H100/H200, "89" for L4/RTX 40xx, "80" for A100).
    """
    flag_set = set(flags)
    if profile not in PROFILES:
        raise ValueError(f"unknown build profile {profile!r}; choose one of {PROFILES}")
    args = ["-DGGML_NATIVE=OFF"]
    if is_x86(flag_set):
        wanted = PORTABLE_X86_FLAGS if profile == "cpu-portable" else flag_set
        for cpu_flag, option in GGML_ISA_OPTIONS:
            args.append(f"-D{option}={'ON' if cpu_flag in wanted else 'OFF'}")
        args.extend(f"-D{option}=OFF" for option in GGML_AMX_OPTIONS)
    elif profile == "cpu-native-safe":
        # Not x86: no AMX to avoid, and ggml's native detection on Arm is what we want.
        args = ["-DGGML_NATIVE=ON"]
    if profile == "cuda":
        if not cuda_arch or not re.fullmatch(r"[0-9]{2,3}[a-z]?(;[0-9]{2,3}[a-z]?)*", cuda_arch):
            raise ValueError(
                f"the cuda profile needs an architecture list like '90' or '80;90', "
                f"got {cuda_arch!r}"
            )
        args += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch}"]
    elif cuda_arch:
        raise ValueError("cuda_arch only applies to the cuda profile")
    return args


def build_key(version: str, args: Iterable[str], toolchain: Mapping[str, str]) -> str:
    """A short hash naming one build: version, CMake options and compilers. A wheel is
    reused only under the same key, so a wheel built with other flags is never picked up
    (pip's own cache keys wheels by version alone)."""
    digest = hashlib.sha256()
    digest.update(version.encode())
    for arg in sorted(args):
        digest.update(b"\0" + arg.encode())
    for name in sorted(toolchain):
        digest.update(f"\0{name}={toolchain[name]}".encode())
    return digest.hexdigest()[:16]


def system_info_features(system_info: str) -> dict[str, bool]:
    """Parse ``llama_print_system_info()`` ("CPU : SSE3 = 1 | AVX2 = 1 | ... |") into
    feature -> compiled-in. Repeated keys (one per backend) OR together."""
    features: dict[str, bool] = {}
    for name, value in re.findall(r"([A-Z][A-Z0-9_]*)\s*=\s*([01])", system_info):
        features[name] = features.get(name, False) or value == "1"
    return features


def build_has_amx(system_info: str) -> bool:
    features = system_info_features(system_info)
    return any(v for k, v in features.items() if k.startswith("AMX"))


@dataclass(frozen=True)
class LoadPlan:
    """How the runner loads a model on this host with this llama.cpp build."""

    use_extra_bufts: bool
    reason: str


def load_plan(flags: Iterable[str], system_info: str) -> LoadPlan:
    """Keep llama.cpp's extra buffer types (REPACK: faster Q4 matmuls) unless this build
    would put weights in the AMX buffer on this CPU, which crashes llama_decode."""
    cpu_amx = has_amx(flags)
    build_amx = build_has_amx(system_info)
    if cpu_amx and build_amx:
        return LoadPlan(
            use_extra_bufts=False,
            reason=(
                "CPU has AMX and this llama.cpp build compiled AMX kernels "
                "(llama.cpp#20824 crash): extra buffer types off; rebuild with "
                "`make llama-build` (cpu-native-safe) to get REPACK speed back"
            ),
        )
    if cpu_amx:
        return LoadPlan(True, "CPU has AMX; this build has no AMX kernels: REPACK kept")
    return LoadPlan(True, "no AMX on this CPU: extra buffer types (REPACK) kept")

# The llama-cpp-python release these profiles were built and tested with (pyproject pins
# the same; a test checks they agree). 0.3.36 vendors the llama.cpp that crashes on AMX
# with extra buffer types on, which is what the profiles and the load plan work around.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
