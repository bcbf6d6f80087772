"""Build profiles and the AMX guard, fed the /proc/cpuinfo of machines we may not have."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from meshnode.core.cpu_features import (
    LLAMA_CPP_PYTHON_VERSION,
    build_has_amx,
    build_key,
    cmake_args,
    cpu_flags,
    cpu_model_name,
    has_amx,
    load_plan,
)

DATA = Path(__file__).parent / "data"
SAPPHIRE_RAPIDS = (DATA / "cpuinfo-sapphire-rapids.txt").read_text()
EPYC_AVX2 = (DATA / "cpuinfo-epyc-avx2.txt").read_text()
# llama_print_system_info() of a -march=native build on a Sapphire Rapids host.
NATIVE_AMX_BUILD = (DATA / "system-info-native-amx.txt").read_text()
# What our cpu-native-safe build on the same host reports.
SAFE_BUILD = NATIVE_AMX_BUILD.replace("AMX_INT8 = 1 | ", "")


def test_amx_is_detected_from_cpuinfo_flags() -> None:
    assert has_amx(cpu_flags(SAPPHIRE_RAPIDS))
    assert not has_amx(cpu_flags(EPYC_AVX2))
    assert cpu_model_name(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8480+"


def test_native_safe_profile_on_an_amx_cpu_keeps_avx512_and_turns_amx_off() -> None:
    args = cmake_args("cpu-native-safe", cpu_flags(SAPPHIRE_RAPIDS))
    assert "-DGGML_NATIVE=OFF" in args
    for on in ("AVX2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"):
        assert f"-DGGML_{on}=ON" in args
    for off in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{off}=OFF" in args


def test_native_safe_profile_enables_only_what_the_cpu_has() -> None:
    args = cmake_args("cpu-native-safe", cpu_flags(EPYC_AVX2))
    assert "-DGGML_AVX2=ON" in args
    assert "-DGGML_AVX512=OFF" in args


def test_portable_profile_stops_at_avx2_even_on_a_newer_cpu() -> None:
    args = cmake_args("cpu-portable", cpu_flags(SAPPHIRE_RAPIDS))
    assert "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AMX_INT8=OFF" in args


def test_cuda_profile_needs_an_architecture() -> None:
    args = cmake_args("cuda", cpu_flags(EPYC_AVX2), cuda_arch="90")
    assert "-DGGML_CUDA=ON" in args and "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    with pytest.raises(ValueError, match="architecture"):
        cmake_args("cuda", cpu_flags(EPYC_AVX2))
    with pytest.raises(ValueError, match="architecture"):
        cmake_args("cuda", cpu_flags(EPYC_AVX2), cuda_arch="90; rm -rf /")


def test_wheel_cache_key_changes_with_the_flags_not_only_the_version() -> None:
    tools = {"cc": "gcc 12.2.0"}
    safe = build_key("0.3.36", cmake_args("cpu-native-safe", cpu_flags(SAPPHIRE_RAPIDS)), tools)
    portable = build_key("0.3.36", cmake_args("cpu-portable", cpu_flags(SAPPHIRE_RAPIDS)), tools)
    assert safe != portable
    assert safe == build_key(
        "0.3.36", cmake_args("cpu-native-safe", cpu_flags(SAPPHIRE_RAPIDS)), tools
    )
    assert safe != build_key(
        "0.3.36", cmake_args("cpu-native-safe", cpu_flags(SAPPHIRE_RAPIDS)), {"cc": "clang"}
    )


def test_an_amx_build_on_an_amx_cpu_loads_without_extra_buffer_types() -> None:
    assert build_has_amx(NATIVE_AMX_BUILD)
    plan = load_plan(cpu_flags(SAPPHIRE_RAPIDS), NATIVE_AMX_BUILD)
    assert plan.use_extra_bufts is False
    assert "20824" in plan.reason


def test_the_safe_build_keeps_repack_on_an_amx_cpu() -> None:
    assert not build_has_amx(SAFE_BUILD)
    assert load_plan(cpu_flags(SAPPHIRE_RAPIDS), SAFE_BUILD).use_extra_bufts is True


def test_an_amx_build_on_a_cpu_without_amx_keeps_repack() -> None:
    # ggml only routes weights to the AMX buffer when the CPU reports AMX at run time.
    assert load_plan(cpu_flags(EPYC_AVX2), NATIVE_AMX_BUILD).use_extra_bufts is True


def test_pyproject_pins_the_llama_cpp_python_version_the_profiles_were_tested_with() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("llama-cpp-python")]
    assert pins == [f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
