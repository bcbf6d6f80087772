#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (run from the repository root):
#   1. build llama-cpp-python with the cuda profile for this GPU's architecture,
#   2. `meshnode doctor` on Gemma 3 270M fully offloaded (JSON),
#   3. bench/mesh_vs_direct.py with every layer on the GPU: direct llama.cpp vs the engine
#      runner vs the mesh (`meshnode serve` + light client), TTFT and decode tok/s.
# Writes bench/results/gpu_doctor.json and bench/results/mesh_vs_direct_cuda.json.
# Budget: the CUDA compile dominates (minutes on 16 cores); the benchmark takes ~1 min.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${CUDA_ARCH:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '.')}"
echo "[gpu-check] GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -n1); arch ${arch}"
# One build, the CUDA one (the Makefile installs everything else around it).
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  make install LLAMA_PROFILE=cuda CUDA_ARCH="${arch}"
.venv/bin/python kernels/build_llama.py --profile cuda --cuda-arch "${arch}"
# cuBLAS from PyPI (when the toolkit has none) must be found by the runner at run time.
extra=$(ls -d "${HOME}"/.cache/meshnode/llama-wheels/../cuda-extra/merged-root/lib64 2>/dev/null || true)
if [ -n "${extra}" ]; then export LD_LIBRARY_PATH="${extra}:${LD_LIBRARY_PATH:-}"; fi
mkdir -p bench/results
model=$(.venv/bin/python -c 'from meshnode.engine.demo_model import find_demo_model; from meshnode.identity import data_dir; print(find_demo_model(data_dir() / "models").path)')
.venv/bin/meshnode doctor --model "${model}" --n-gpu-layers -1 --listen /ip4/127.0.0.1/tcp/0 --json \
  > bench/results/gpu_doctor.json || true
cat bench/results/gpu_doctor.json
.venv/bin/python bench/mesh_vs_direct.py --n-gpu-layers -1 --runs 7 --tokens 128 \
  --out mesh_vs_direct_cuda.json
