#!/usr/bin/env bash
# Build benchmarks/wheelhouse/: every wheel benchmarks/gpu_suite.py needs on a GPU machine that has
# Python 3.12, torch, transformers, accelerate and peft but no internet (and no DeepSpeed).
#
# Run on a machine WITH a package index (any Python: the wheels are fetched for CPython 3.12 on
# manylinux x86_64). The folder travels with the working tree to the GPU machine, where
# benchmarks/gpu_run.sh installs from it with --no-index. Kept under ~55 MiB: big packages the suite
# does not use (pyarrow, pandas, scikit-image, torch, numpy, vLLM) are left out.
#
#   bash benchmarks/gpu_wheels.sh            # (re)build the wheelhouse
set -euo pipefail
cd "$(dirname "$0")/.."
WH=benchmarks/wheelhouse
rm -rf "$WH"
mkdir -p "$WH"
TARGET=(--python-version 3.12 --implementation cp --abi cp312
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64
        --platform manylinux_2_24_x86_64 --only-binary=:all:)

# What the suite imports beyond torch/transformers/accelerate/peft (the CLI, `serve`, the load
# clients, train config files, DeepSpeed's pure-Python dependencies), with their dependencies.
pip download --quiet --dest "$WH" "${TARGET[@]}" \
  "typer>=0.29,<0.30" "rich>=13" "fastapi>=0.110" "uvicorn>=0.29" "httpx>=0.27" "python-multipart>=0.0.9" \
  "pyyaml>=6" "jinja2>=3.1" "requests>=2.31" "pillow>=10" "hjson" "ninja" "py-cpuinfo" "psutil" "msgpack" "einops" "packaging" "tqdm" "pydantic>=2" \
  "setuptools>=68" "wheel"

# DeepSpeed as a pure-Python wheel (no compiled ops; its optimizers are not used: torch's AdamW is).
DS_BUILD_OPS=0 pip wheel --quiet --no-deps --wheel-dir "$WH" "deepspeed>=0.19.3,<0.20"

# bitsandbytes (QLoRA) only when it fits the size budget.
tmp=$(mktemp -d)
if pip download --quiet --no-deps --dest "$tmp" "${TARGET[@]}" bitsandbytes 2>/dev/null; then
  size=$(du -sm "$tmp" | cut -f1)
  if [ "$size" -le 20 ]; then mv "$tmp"/*.whl "$WH"/; else echo "bitsandbytes left out (${size} MiB)"; fi
fi
rm -rf "$tmp"

# Never carry what the GPU machine has or the suite does not need.
# transformers' own dependencies (huggingface_hub, tokenizers, safetensors, …) stay as installed there:
# a newer huggingface_hub could break the transformers version on that machine.
rm -f "$WH"/torch-* "$WH"/numpy-* "$WH"/nvidia_* "$WH"/triton-* "$WH"/pyarrow-* "$WH"/pandas-* \
      "$WH"/scikit_image-* "$WH"/sympy-* "$WH"/networkx-* "$WH"/mpmath-* "$WH"/huggingface_hub-* \
      "$WH"/hf_xet-* "$WH"/tokenizers-* "$WH"/safetensors-* "$WH"/fsspec-* "$WH"/filelock-* \
      "$WH"/httpx2-* "$WH"/httpcore2-* "$WH"/truststore-*
ls "$WH" > "$WH/CONTENTS.txt"
du -sh "$WH"
