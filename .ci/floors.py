"""Print pip constraints that pin every requirement in pyproject.toml (build, runtime, extras) to its floor.

`make test` installs torch and clipforge under these constraints in a second venv and runs the suite there,
so each `>=` in pyproject.toml is a version that is installed and tested, not a guess. A requirement
without a `>=` floor is an error, so no dependency can slip in untested; so is a Python other than the
`requires-python` floor running this script (the floors venv's own interpreter).
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python < 3.11: below every floor this project tests
    sys.exit(f"{__file__}: needs Python 3.11+ (tomllib), got {sys.version.split()[0]}")

REQ = re.compile(r"^\s*([A-Za-z0-9._-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:;\s*(.+))?$")


def floors(pyproject: Path) -> list[str]:
    toml = tomllib.loads(pyproject.read_text())
    project = toml["project"]
    python = re.fullmatch(r"\s*>=\s*3\.(\d+)\s*", project["requires-python"])
    if python is None or int(python.group(1)) != sys.version_info.minor:
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        sys.exit(
            f"{pyproject}: requires-python {project['requires-python']!r} does not start at this floors "
            f"venv's Python {here}: build the venv with the floor's Python (make PY=python3.N)"
        )
    reqs = toml["build-system"]["requires"] + project["dependencies"]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    pins = []
    for req in reqs:
        m = REQ.match(req)
        if m is None:
            sys.exit(f"{pyproject}: requirement {req!r} has no single '>=' floor to test")
        name, version, marker = m.groups()
        pins.append(f"{name}=={version}" + (f"; {marker}" if marker else ""))
    return pins


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    print("\n".join(floors(path)))
