"""Build llama.cpp's own `llama-server` from the llama.cpp that llama-cpp-python vendors.

    .venv/bin/python bench/llama_server_build.py        # prints the binary's path

The batching benchmark compares meshnode with llama-server built from the *same*
llama.cpp, with the same CPU flags as our wheel (kernels/build_llama.py's profile), so a
difference is the serving layer's, not the kernels'. The sdist of the pinned
llama-cpp-python is fetched from PyPI; the binary is cached under
~/.cache/meshnode/llama-server/<key>/ (key: version + CMake options). Nothing of it goes
into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshnode"


def _cpu_features() -> ModuleType:
    path = ROOT / "meshnode" / "core" / "cpu_features.py"
    spec = importlib.util.spec_from_file_location("_mn_cpu_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def llama_server_path(profile: str = "cpu-native-safe") -> Path:
    """Build (once) and return llama-server for this machine."""
    cf = _cpu_features()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    version = cf.LLAMA_CPP_PYTHON_VERSION
    args = [*cf.cmake_args(profile, cf.cpu_flags(cpuinfo)), "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    key = cf.build_key(version, args, {})
    out = CACHE / "llama-server" / f"{version}-{profile}-{key}"
    binary = out / "llama-server"
    if binary.exists():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sdist = os.environ.get("MESHNODE_LLAMA_SDIST")
        if not sdist:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp],
                           check=True)
            sdist = str(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")))
        print(f"[llama-server] building from {sdist} with {' '.join(args)}", flush=True)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                        *args], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j",
                        str(os.cpu_count() or 2)], check=True)
        built = next(build.rglob("llama-server"))
        built.replace(binary)
    return binary


if __name__ == "__main__":
    print(llama_server_path())
