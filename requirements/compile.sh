#!/usr/bin/env bash
# Re-resolve the locked dependencies from pyproject.toml (Linux x86_64, CPython 3.11, the CUDA build
# of torch that PyPI serves). `lock.txt` pins every package of every extra: CI installs with it as
# constraints. `pins.txt` holds back what must move deliberately (torch: it sets the driver).
# `api.txt` and `worker.txt` are the subsets the two Docker images install, resolved
# against lock.txt so all three agree. Pass --upgrade to move to the newest releases (or
# --upgrade-package NAME for one); without it, existing pins are kept where they still fit.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
command -v "$uv" >/dev/null || { echo "needs uv: pip install uv" >&2; exit 1; }
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet "$@")
"$uv" pip compile pyproject.toml --extra worker --extra test -c requirements/pins.txt "${common[@]}" -o requirements/lock.txt
"$uv" pip compile pyproject.toml --extra worker -c requirements/lock.txt "${common[@]}" -o requirements/worker.txt
"$uv" pip compile pyproject.toml -c requirements/lock.txt "${common[@]}" -o requirements/api.txt
