"""Print pip constraints that pin every runtime dependency of pyproject.toml to the
lowest version its specifier allows (``>=X`` -> ``==X``), so that CI can run the tests
on the oldest versions the package claims to support. torch is left out: it is
installed first, pinned, from a local CPU build (see the README)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
                        .read_text())["project"]
for requirement in project["dependencies"]:
    name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]
    floor = re.search(r">=\s*([0-9][^,; ]*)", requirement)
    if name == "torch":
        continue
    if floor is None:
        sys.exit(f"{requirement!r} has no lower bound: say which oldest version is supported")
    print(f"{name}=={floor.group(1)}")
