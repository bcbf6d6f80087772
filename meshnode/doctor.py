"""`meshnode doctor`: what a GPU owner needs to know before `serve`, one check per row.

Each check returns a ``Check`` (ok / warn / fail, what was found, and for a failure the
fix). Nothing here changes the machine: key files are inspected, never created; the
listen port is bound for an instant and released; the model is loaded in a throwaway
runner exactly as `serve` would load it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Literal

import trio

from meshnode.core.cpu_features import (
    LLAMA_CPP_PYTHON_VERSION,
    cpu_flags,
    cpu_model_name,
    has_amx,
    load_plan,
    system_info_features,
)
from meshnode.identity import JOB_KEY_FILE, KEY_DIR, PEER_KEY_FILE

Status = Literal["ok", "warn", "fail"]

# nvidia-smi answers in well under a second; a wedged driver can hang it for minutes.
NVIDIA_SMI_TIMEOUT_S = 10.0
# A bootstrap peer on the internet answers a TCP+Noise dial within a few RTTs.
BOOTSTRAP_DIAL_TIMEOUT_S = 10.0
# configfs-tsm: where a TDX guest kernel exposes quote generation.
TSM_REPORT_DIR = Path("/sys/kernel/config/tsm/report")
BUILD_INFO_NAME = "meshnode-llama-build.json"  # written by kernels/build_llama.py


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def check_llama_build() -> list[Check]:
    """llama-cpp-python's version and build profile, its compiled features, the AMX plan,
    and on a CUDA build the GPUs and driver."""
    out: list[Check] = []
    try:
        installed = dist_version("llama-cpp-python")
    except PackageNotFoundError:
        return [Check("llama.cpp", "fail", "llama-cpp-python is not installed",
                      "run `make install` (or `python kernels/build_llama.py`)")]
    from meshnode.engine.llama import system_info

    info_path = Path(sys.prefix) / BUILD_INFO_NAME
    try:
        build = json.loads(info_path.read_text())
        profile = f"profile {build.get('profile')} (key {build.get('key')})"
    except (OSError, ValueError):
        profile = "not built by kernels/build_llama.py (pip's default flags)"
    status: Status = "ok" if installed == LLAMA_CPP_PYTHON_VERSION else "warn"
    out.append(Check(
        "llama.cpp", status, f"llama-cpp-python {installed}, {profile}",
        "" if status == "ok" else
        f"meshnode was tested with {LLAMA_CPP_PYTHON_VERSION}: run `make llama-build`",
    ))
    sysinfo = system_info()
    features = system_info_features(sysinfo)
    compiled = " ".join(sorted(k for k, v in features.items() if v)) or sysinfo.strip()
    out.append(Check("llama.cpp features", "ok", compiled[:400]))
    cpuinfo = _cpuinfo()
    flags = cpu_flags(cpuinfo)
    plan = load_plan(flags, sysinfo)
    amx = "yes" if has_amx(flags) else "no"
    cpu = f"{cpu_model_name(cpuinfo)}, {os.cpu_count()} cores, AMX {amx}"
    out.append(Check("cpu / AMX", "ok" if plan.use_extra_bufts else "warn",
                     f"{cpu}; {plan.reason}",
                     "" if plan.use_extra_bufts else
                     "`make llama-build` builds without AMX and keeps REPACK speed"))
    out.append(check_gpu())
    return out


def check_gpu() -> Check:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return Check("gpu", "ok", "CPU build (no GPU offload compiled in)",
                     "")
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Check("gpu", "fail", "CUDA build, but nvidia-smi is not on PATH",
                     "install the NVIDIA driver (nvidia-smi comes with it)")
    try:
        res = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return Check("gpu", "fail", "nvidia-smi did not answer", "check the driver (dmesg)")
    gpus = [line.strip() for line in res.stdout.splitlines() if line.strip()]
    if res.returncode != 0 or not gpus:
        return Check("gpu", "fail", f"CUDA build, no usable GPU ({res.stderr.strip()[:200]})",
                     "check `nvidia-smi`; in a confidential VM, the GPU must be in CC mode")
    return Check("gpu", "ok", "CUDA build; " + "; ".join(gpus))


async def check_model(path: Path | None, n_ctx: int, n_gpu_layers: int) -> Check:
    """Load the model in a runner exactly as serve would and decode one token."""
    if path is None:
        return Check("model", "warn", "no --model given: load test skipped",
                     "run `meshnode doctor --model FILE.gguf`")
    from meshnode.engine.base import EngineError, SamplingParams
    from meshnode.engine.model_file import ModelFileError
    from meshnode.serving import open_engine

    started = time.monotonic()
    try:
        async with open_engine(path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers) as engine:
            loaded = time.monotonic() - started
            t0 = time.monotonic()
            async with engine.stream("Hello", SamplingParams(temperature=0.0), 1) as gen:
                async for _ in gen:
                    pass
            first = time.monotonic() - t0
            info = engine.info
    except ModelFileError as exc:
        return Check("model", "fail", str(exc), "point --model at a complete GGUF file")
    except EngineError as exc:
        return Check("model", "fail", f"the runner could not load it: {str(exc)[:400]}",
                     "check the file and `meshnode doctor` rows above; try --n-gpu-layers 0")
    return Check("model", "ok",
                 f"{info.name} {info.quant}, ctx {info.n_ctx}: loaded in a runner in "
                 f"{loaded:.2f} s, first token in {first * 1000:.0f} ms")


def check_tdx() -> Check:
    if TSM_REPORT_DIR.is_dir():
        return Check("tdx", "ok", f"{TSM_REPORT_DIR} present: `serve --tee tdx` can quote")
    return Check("tdx", "warn", "no configfs-tsm (not a TDX guest): only `--tee dev`, which "
                 "clients refuse unless --insecure",
                 "run inside a TDX confidential VM (see docs/confidential-vm.md); "
                 "mount configfs: `mount -t configfs none /sys/kernel/config`")


def check_data_dir(home: Path) -> list[Check]:
    out: list[Check] = []
    if home.exists():
        writable = os.access(home, os.W_OK)
        out.append(Check("data dir", "ok" if writable else "fail", str(home),
                         "" if writable else f"make {home} writable by this user"))
    else:
        out.append(Check("data dir", "ok", f"{home} (created on first serve)"))
    keys = home / KEY_DIR
    for name in (PEER_KEY_FILE, JOB_KEY_FILE):
        path = keys / name
        if not path.exists():
            out.append(Check(f"key {name}", "ok", "absent: created (mode 0600) on first serve"))
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        private = not mode & (stat.S_IRWXG | stat.S_IRWXO)
        out.append(Check(f"key {name}", "ok" if private else "fail",
                         f"{path} mode {mode:o}",
                         "" if private else f"chmod 600 {path}"))
    return out


def check_listen(listen: str) -> Check:
    parts = listen.strip("/").split("/")
    if listen.lower() == "none":
        return Check("listen", "ok", "no inbound address (relay only)")
    if len(parts) < 4 or parts[0] not in ("ip4", "ip6") or parts[2] != "tcp":
        return Check("listen", "fail", f"cannot read {listen!r}",
                     "use a multiaddr like /ip4/0.0.0.0/tcp/4001")
    family = socket.AF_INET if parts[0] == "ip4" else socket.AF_INET6
    try:
        port = int(parts[3])
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((parts[1], port))
    except (OSError, ValueError) as exc:
        return Check("listen", "fail", f"{listen}: {exc}",
                     "another process holds the port: stop it or pick another --listen")
    return Check("listen", "ok", f"{listen} is free")


async def check_bootstrap(peers: Sequence[str]) -> list[Check]:
    if not peers:
        return [Check("bootstrap", "warn", "no bootstrap peers configured",
                      "pass --bootstrap ADDR (or fill bootstrap/peers.toml) to join a mesh")]
    from meshnode.identity import NodeIdentity
    from meshnode.p2p.host import running_host

    out: list[Check] = []
    async with running_host(NodeIdentity.generate(), None) as host:
        from libp2p.peer.peerinfo import info_from_p2p_addr
        from multiaddr import Multiaddr

        for addr in peers:
            t0 = time.monotonic()
            try:
                info = info_from_p2p_addr(Multiaddr(addr))
                with trio.fail_after(BOOTSTRAP_DIAL_TIMEOUT_S):
                    await host.connect(info)
            except Exception as exc:  # any failure to reach it is the finding
                out.append(Check("bootstrap", "fail", f"{addr[:120]}: {type(exc).__name__}: "
                                 f"{str(exc)[:160]}",
                                 "check the address and that its port is reachable"))
                continue
            out.append(Check("bootstrap", "ok",
                             f"{addr[:120]} answered in {(time.monotonic() - t0) * 1000:.0f} ms"))
    return out


async def run_checks(
    *, model: Path | None, n_ctx: int, n_gpu_layers: int, home: Path, listen: str,
    bootstrap: Sequence[str],
) -> list[Check]:
    checks = check_llama_build()
    checks.append(await check_model(model, n_ctx, n_gpu_layers))
    checks.append(check_tdx())
    checks += check_data_dir(home)
    checks.append(check_listen(listen))
    checks += await check_bootstrap(bootstrap)
    return checks


def as_json(checks: Sequence[Check]) -> str:
    return json.dumps({"ok": not any(c.status == "fail" for c in checks),
                       "checks": [asdict(c) for c in checks]}, indent=2)
