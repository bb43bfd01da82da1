#!/usr/bin/env bash
# Shows, without a Docker engine, that every wheel the two images pin exists on the
# registry for the image's platform (Linux x86_64, CPython 3.11) and that the pins
# resolve together: pip's resolver runs on the index metadata (--dry-run), nothing is
# installed. Prints what each image would install; exits non-zero if a pin is missing
# or two pins conflict (such as torch and faiss-gpu asking for different CUDA majors).
#   deploy/check-pins.sh [PIP]   (PIP defaults to .venv/bin/pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${1:-.venv/bin/pip}
platforms=(--platform manylinux2014_x86_64)
for minor in $(seq 17 36); do  # glibc 2.36: Debian bookworm, the images' base
  platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
target=$(mktemp -d)
report=$(mktemp)
trap 'rm -rf "$target" "$report" "$target.cpu.txt" "$target.gpu.txt"' EXIT

check() {  # name, then the requirements
  local name=$1
  shift
  "$PIP" install --quiet --dry-run --ignore-installed --only-binary=:all: \
    --python-version 3.11 "${platforms[@]}" --target "$target" --report "$report" "$@"
  python3 - "$name" "$report" <<'PY'
import json, sys
name, path = sys.argv[1:]
wheels = json.load(open(path))["install"]
import re
cuda = sorted({w["metadata"]["name"] for w in wheels if w["metadata"]["name"].startswith("nvidia-")})
# the CUDA major of each CUDA wheel: a -cuNN suffix (CUDA 12), or the version of the
# unsuffixed runtime and toolkit wheels (CUDA 13 names them without one)
majors = {m.group(1) for n in cuda if (m := re.search(r"-cu(\d+)$", n))}
majors |= {w["metadata"]["version"].split(".")[0] for w in wheels
           if w["metadata"]["name"] in ("nvidia-cuda-runtime", "cuda-toolkit")}
majors = sorted(majors)
picked = {w["metadata"]["name"]: w["metadata"]["version"] for w in wheels}
print(f"{name}: {len(wheels)} wheels resolve; torch {picked.get('torch')}, "
      f"faiss {picked.get('faiss-cpu') or picked.get('faiss-gpu')}; "
      f"CUDA wheels: {len(cuda)} (CUDA majors: {', '.join(majors) or 'none'})")
if len(majors) > 1:
    sys.exit(f"{name}: more than one CUDA major: {majors}")
PY
}

# The CPU image installs torch's CPU build from download.pytorch.org (not reachable
# from every machine), then the lock; here torch==2.13.0 comes from the indexes this
# pip reaches (a CPU or a CUDA build: the check is about the lock's other wheels).
grep -v -E '^torch==' requirements.lock > "$target.cpu.txt"
check "CPU image (Dockerfile)" torch==2.13.0 -r "$target.cpu.txt"
# The GPU image: torch and faiss-gpu on CUDA 12, and the lock without torch and faiss-cpu.
grep -v -E '^(torch|faiss-cpu)==' requirements.lock > "$target.gpu.txt"
check "GPU image (deploy/Dockerfile.gpu)" torch==2.9.1 faiss-gpu==1.15.1 -r "$target.gpu.txt"
