#!/usr/bin/env bash
# Run HERE (the CPU machine, with the project's .venv) from the project root, before a GPU call:
# fills `.device/` (git-ignored via .git/info/exclude) with what the GPU image lacks: cp312 wheels of
# the project's packages at the .venv's versions, and redis-server unpacked from Debian's packages.
# The GPU machine reaches no registry; `.device` travels with `carry: [".device"]` (64 MiB at most).
# Then: bash bench/gpu_check.sh on the GPU machine (see bench/RESULTS.md, "GPU: one call").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.device/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
    || echo '/.device/' >> "$(git rev-parse --git-common-dir)/info/exclude"
rm -rf .device && mkdir -p .device/wheels .device/debs
py=${PYTHON:-.venv/bin/python}; [ -x "$py" ] || py=/work/main/.venv/bin/python
# The image holds torch, torchvision, transformers, accelerate, timm, huggingface-hub, safetensors,
# numpy, scipy, pillow, httpx, pytest, psutil; the rest of requirements/lock.txt that the code imports:
pkgs=(diffusers open-clip-torch ftfy wcwidth fastapi starlette opentelemetry-api uvicorn pydantic
      pydantic-core annotated-types typing-inspection typing-extensions pydantic-settings python-dotenv
      python-multipart redis rq croniter importlib-metadata lazy-importer tzdata pycocotools
      prometheus-client annotated-doc tqdm scikit-learn joblib threadpoolctl)
specs=()
for p in "${pkgs[@]}"; do
    v=$("$py" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$p")
    specs+=("${p}${v:+==$v}")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .device/wheels "${specs[@]}"
debs=(redis-server redis-tools liblzf1 libjemalloc2 libatomic1)
(cd .device/debs && apt-get download -qq "${debs[@]}" >/dev/null 2>&1) \
    || (apt-get update -qq >/dev/null && cd .device/debs && apt-get download -qq "${debs[@]}")
du -sh .device | awk '{print "carry .device: " $1 " (at most 64 MiB travel)"}'
