#!/usr/bin/env python3
"""Build (or reuse) and install llama-cpp-python with a named, safe build profile.

    python kernels/build_llama.py [--profile auto|cpu-portable|cpu-native-safe|cuda]
                                  [--cuda-arch 90] [--wheel-only] [--force]

Run it with the interpreter of the environment to install into (the Makefile uses
.venv/bin/python). Each build is cached as a wheel under
``$MESHNODE_WHEELHOUSE`` (default ``~/.cache/meshnode/llama-wheels``) in a folder named by
the version, profile and a hash of the CMake options and compilers, and pip's own wheel
cache is bypassed (``--no-cache-dir``): pip keys its cache by version only, so it would
hand back a wheel built with other flags (the AMX crash came back that way).

The profile logic lives in meshnode/core/cpu_features.py (pure, unit-tested); this script
loads that file directly so it runs before meshnode itself is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
BUILD_INFO_NAME = "meshnode-llama-build.json"


def _load_cpu_features() -> ModuleType:
    path = ROOT / "meshnode" / "core" / "cpu_features.py"
    spec = importlib.util.spec_from_file_location("_meshnode_cpu_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


cf = _load_cpu_features()


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[-1 if cmd[0] == "nvcc" else 0] if lines else "unknown"


def _toolchain(profile: str) -> dict[str, str]:
    tools = {
        "python": f"{sys.implementation.cache_tag}-{sys.platform}",
        "cc": _first_line([os.environ.get("CC", "cc"), "--version"]),
        "cxx": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        "cmake": _first_line(["cmake", "--version"]),
    }
    if profile == "cuda":
        tools["nvcc"] = _first_line(["nvcc", "--version"])
    return tools


def _installed_build() -> dict[str, object] | None:
    path = Path(sys.prefix) / BUILD_INFO_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _llama_installed(version: str) -> bool:
    try:
        from importlib.metadata import version as dist_version

        return dist_version("llama-cpp-python") == version
    except Exception:
        return False


# cuBLAS from PyPI for CUDA 13 toolkits that ship without it (nvcc-only installs).
CUBLAS_WHEEL = "nvidia-cublas==13.10.0.20"


def _toolkit_root(nvcc: Path) -> Path:
    """The toolkit nvcc belongs to; nvcc on PATH may be a wrapper script, so prefer
    CUDA_HOME or /usr/local/cuda when they hold an nvcc."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                      "/usr/local/cuda", str(nvcc.resolve().parent.parent)):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return Path(candidate).resolve()
    raise SystemExit(f"[llama-build] cannot find the CUDA toolkit of {nvcc}; set CUDA_HOME")


def _has_libcuda() -> bool:
    """The driver library (or the toolkit's link stub) that CUDA::cuda_driver needs."""
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        stubs = _toolkit_root(Path(nvcc)) / "lib64" / "stubs" / "libcuda.so"
        if stubs.exists():
            return True
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "libcuda.so" in out


def _cuda_env(env: dict[str, str], cache: Path) -> dict[str, str]:
    """Point CMake at nvcc, and at cuBLAS from PyPI when the toolkit lacks it: a merged
    toolkit root of symlinks (toolkit + the nvidia-cublas wheel) under the cache."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("[llama-build] the cuda profile needs nvcc on PATH (CUDA toolkit)")
    toolkit = _toolkit_root(Path(nvcc))
    env.setdefault("CUDACXX", str(toolkit / "bin" / "nvcc"))
    if (toolkit / "include" / "cublas_v2.h").exists():
        env.setdefault("CUDAToolkit_ROOT", str(toolkit))
        return env
    extra = cache / "cuda-extra" / CUBLAS_WHEEL.replace("==", "-")
    if not (extra / "nvidia").exists():
        print(f"[llama-build] the toolkit has no cuBLAS: fetching {CUBLAS_WHEEL} from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target",
                        str(extra), "--progress-bar", "off", CUBLAS_WHEEL], check=True)
    cublas = next((extra / "nvidia").glob("cu*/include")).parent
    merged = cache / "cuda-extra" / "merged-root"
    if merged.exists():
        shutil.rmtree(merged)
    for sub in ("bin", "nvvm", "share"):
        if (toolkit / sub).exists():
            merged.mkdir(parents=True, exist_ok=True)
            (merged / sub).symlink_to(toolkit / sub)
    for sub, sources in (("include", [toolkit / "include", cublas / "include"]),
                         ("lib64", [toolkit / "lib64", cublas / "lib"])):
        (merged / sub).mkdir(parents=True)
        for source in sources:
            for item in source.iterdir():
                link = merged / sub / item.name
                if not link.exists():
                    link.symlink_to(item)
    for lib in (merged / "lib64").glob("libcublas*.so.*"):
        plain = lib.with_name(lib.name.split(".so")[0] + ".so")  # the linker wants libX.so
        if not plain.exists():
            plain.symlink_to(lib)
    env["CUDAToolkit_ROOT"] = str(merged)
    env["CUDACXX"] = str(merged / "bin" / "nvcc")
    env["LIBRARY_PATH"] = f"{merged / 'lib64'}:{env.get('LIBRARY_PATH', '')}"
    return env


def _unpacked_sdist(version: str, target: Path, env: dict[str, str]) -> Path:
    """llama-cpp-python's source, unpacked once into ``target/src`` (same path on every
    run, so a kept CMake build folder stays valid)."""
    source = target / "src" / f"llama_cpp_python-{version}"
    if (source / "pyproject.toml").exists():
        return source
    sdist = os.environ.get("MESHNODE_LLAMA_SDIST")
    download = target / "sdist"
    if not sdist:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", "--progress-bar", "off", "-d", str(download),
                        f"llama-cpp-python=={version}"], env=env, check=True)
        found = sorted(download.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise SystemExit("[llama-build] pip downloaded no llama-cpp-python sdist")
        sdist = str(found[-1])
    import tarfile

    with tarfile.open(sdist) as tar:
        tar.extractall(target / "src", filter="data")
    if not (source / "pyproject.toml").exists():
        raise SystemExit(f"[llama-build] {sdist} did not unpack to {source}")
    return source


def build_wheel(version: str, profile: str, args: list[str], key: str, wheelhouse: Path,
                force: bool) -> Path:
    target = wheelhouse / f"{version}-{profile}-{key}"
    wheels = sorted(target.glob("llama_cpp_python-*.whl"))
    if wheels and not force:
        print(f"[llama-build] reusing {wheels[-1]} (same version, flags and compilers)")
        return wheels[-1]
    target.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join(args)
    env["FORCE_CMAKE"] = "1"
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    if profile == "cuda":
        env = _cuda_env(env, wheelhouse.parent)
    print(f"[llama-build] building llama-cpp-python {version}, profile {profile}")
    print(f"[llama-build] CMAKE_ARGS={env['CMAKE_ARGS']}")
    print("[llama-build] this compiles llama.cpp: ~6 min on 2 cores for CPU, much longer "
          "for CUDA", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
            "--no-binary", "llama-cpp-python", "--progress-bar", "off",
            f"llama-cpp-python=={version}", "-w", tmp,
        ]
        if os.environ.get("MESHNODE_LLAMA_SDIST"):
            cmd[-3] = os.environ["MESHNODE_LLAMA_SDIST"]
        if profile == "cuda":
            # ~190 CUDA units take hours on a small machine: build from a fixed source
            # folder into a kept build folder, so an interrupted build resumes where it
            # stopped (CMake's cache is tied to the source path, which pip randomises).
            source = _unpacked_sdist(version, target, env)
            cmd[-3] = str(source)
            cmd += ["--config-settings", f"build-dir={target / 'cmake-build'}"]
            print(f"[llama-build] resumable: build folder {target / 'cmake-build'}")
        subprocess.run(cmd, env=env, check=True)
        built = sorted(Path(tmp).glob("llama_cpp_python-*.whl"))
        if not built:
            raise SystemExit("[llama-build] pip produced no wheel")
        final = target / built[-1].name
        shutil.move(str(built[-1]), final)
    (target / "build.json").write_text(json.dumps(
        {"version": version, "profile": profile, "cmake_args": args, "key": key,
         "built_in_s": round(time.monotonic() - started, 1)}, indent=2))
    print(f"[llama-build] built in {time.monotonic() - started:.0f} s -> {final}")
    return final


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default=os.environ.get("LLAMA_PROFILE", "auto"),
                        choices=("auto", *cf.PROFILES))
    parser.add_argument("--cuda-arch", default=os.environ.get("CUDA_ARCH"))
    parser.add_argument("--wheel-only", action="store_true",
                        help="build/cache the wheel but do not install it")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--print-args", action="store_true",
                        help="print the CMake options for the profile and exit")
    opts = parser.parse_args()

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = cf.cpu_flags(cpuinfo)
    profile = "cpu-native-safe" if opts.profile == "auto" else opts.profile
    args = cf.cmake_args(profile, flags, cuda_arch=opts.cuda_arch)
    if profile == "cuda" and not _has_libcuda():
        # A build machine without the NVIDIA driver (nor the toolkit's stub) cannot link
        # the driver API that llama.cpp's VMM memory pool uses; the legacy pool still works.
        print("[llama-build] no libcuda.so (driver) here: building with GGML_CUDA_NO_VMM=ON")
        args.append("-DGGML_CUDA_NO_VMM=ON")
    if opts.print_args:
        print(" ".join(args))
        return 0
    version = cf.LLAMA_CPP_PYTHON_VERSION
    key = cf.build_key(version, args, _toolchain(profile))
    info = {"version": version, "profile": profile, "cmake_args": args, "key": key,
            "cpu": cf.cpu_model_name(cpuinfo), "cpu_has_amx": cf.has_amx(flags)}
    if not opts.force and not opts.wheel_only and _installed_build() == info \
            and _llama_installed(version):
        print(f"[llama-build] llama-cpp-python {version} ({profile}, {key}) already installed")
        return 0
    wheelhouse = Path(os.environ.get("MESHNODE_WHEELHOUSE")
                      or Path.home() / ".cache" / "meshnode" / "llama-wheels")
    wheel = build_wheel(version, profile, args, key, wheelhouse, opts.force)
    if opts.wheel_only:
        return 0
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall",
                    "--no-cache-dir", "--progress-bar", "off", str(wheel)], check=True)
    (Path(sys.prefix) / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2))
    print(f"[llama-build] installed {wheel.name} ({profile}, key {key})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
