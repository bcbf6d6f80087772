"""The package as a user installs it: `python -m build` makes an sdist and a wheel (the
wheel built from the sdist), the wheel goes into a fresh venv, and `meshnode demo --tiny`
runs from there with no source tree in sight.

llama-cpp-python is not compiled again: the installer takes the wheel that
`kernels/build_llama.py` cached for this checkout's venv (`--find-links`). uv installs the
rest from PyPI (its cache makes a rerun take seconds; pip needs over a minute here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 180.0  # sdist, then the wheel from it, with the venv's setuptools
INSTALL_TIMEOUT_S = 300.0  # resolving ~80 dependencies; cold caches download them
DEMO_TIMEOUT_S = 120.0
# Read at run time from the package, so they must ship in both archives.
PACKAGE_DATA = (
    "meshnode/defaults/peers.toml",
    "meshnode/defaults/attestation-policy.toml",
    "meshnode/ops/page.html",
)
_SKIP_COPY = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "node_modules",
    ".mypy_cache", ".ruff_cache", ".pytest_cache", "docs",
)


def _llama_wheelhouse() -> Path:
    """The folder holding the llama-cpp-python wheel this venv was installed from."""
    info = json.loads((Path(sys.prefix) / "meshnode-llama-build.json").read_text())
    base = Path(os.environ.get("MESHNODE_WHEELHOUSE",
                               Path.home() / ".cache" / "meshnode" / "llama-wheels"))
    folder = base / f"{info['version']}-{info['profile']}-{info['key']}"
    assert list(folder.glob("llama_cpp_python-*.whl")), f"no cached llama wheel in {folder}"
    return folder


def _run(args: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{args[:4]} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def test_the_wheel_runs_the_demo_from_a_fresh_venv_without_the_source_tree(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP_COPY)  # build never writes into the checkout
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
         BUILD_TIMEOUT_S)
    (wheel,) = dist.glob("meshnode-*.whl")
    (sdist,) = dist.glob("meshnode-*.tar.gz")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for data in PACKAGE_DATA:
        assert data in in_wheel, f"{data} missing from the wheel"
        assert data in in_sdist, f"{data} missing from the sdist"
    assert not any(name.startswith("tests/") for name in in_wheel)

    venv = tmp_path / "fresh"
    _run([sys.executable, "-m", "venv", str(venv)], 60)
    uv = shutil.which("uv", path=str(Path(sys.executable).parent))
    assert uv is not None, "uv is a dev dependency (pip install -e '.[dev]')"
    _run([uv, "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"),
          "--find-links", str(_llama_wheelhouse()), str(wheel)], INSTALL_TIMEOUT_S)
    shutil.rmtree(src)  # and no source tree anywhere

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(MESHNODE_HOME=str(tmp_path / "home"), COLUMNS="200")
    where = _run([str(venv / "bin" / "python"), "-c",
                  "import meshnode.cli, meshnode.defaults as d; print(meshnode.cli.__file__);"
                  "print(d.POLICY_PATH)"], 60, cwd=cwd, env=env)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(venv), where.stdout
        assert Path(line).exists()
    demo = _run([str(venv / "bin" / "meshnode"), "demo", "--tiny", "--max-tokens", "8"],
                DEMO_TIMEOUT_S, cwd=cwd, env=env)
    assert "8 completion tokens" in demo.stdout
    assert "closed   cooperatively (on-chain state: closed)" in demo.stdout
    assert "Traceback" not in demo.stderr
