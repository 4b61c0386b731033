"""Print pip constraints that pin every requirement in pyproject.toml (build, runtime, extras) to its floor.

`make test` installs clipforge under these constraints in a second venv and runs the suite there, so each
`>=` in pyproject.toml is a version that is installed and tested, not a guess. torch is left out: its pin
comes from the Makefile (the CPU build on local disk). A requirement without a `>=` floor is an error,
so no dependency can slip in untested.
"""

import re
import sys
import tomllib
from pathlib import Path

SKIP = {"torch"}
REQ = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:;\s*(.+))?$")


def floors(pyproject: Path) -> list[str]:
    toml = tomllib.loads(pyproject.read_text())
    project = toml["project"]
    reqs = toml["build-system"]["requires"] + project["dependencies"]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    pins = []
    for req in reqs:
        m = REQ.match(req)
        if m is None:
            sys.exit(f"{pyproject}: dependency {req!r} has no single '>=' floor to test")
        name, version, marker = m.groups()
        if name.lower() not in SKIP:
            pins.append(f"{name}=={version}" + (f"; {marker}" if marker else ""))
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    print("\n".join(floors(path)))
