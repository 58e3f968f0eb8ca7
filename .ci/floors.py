"""Print pip constraints that pin dependencies to the lower bounds pyproject.toml declares.

    python .ci/floors.py                    # every `name>=X` dependency (see SKIP) as `name==X`
    python .ci/floors.py diffusers numpy    # only these

.ci/run installs the project with these constraints into a separate venv and runs the fast tests there, so
the declared minimums are measured rather than assumed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# torch: constraints.txt pins the local CPU wheel. packaging: pytest 9 (the test runner) needs >=24.
SKIP = {"torch", "packaging"}


def declared_floors(pyproject: Path) -> dict[str, str]:
    """{distribution name: lower bound} for each `name>=X` runtime dependency."""
    floors: dict[str, str] = {}
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)\s*(,.*)?", requirement)
        if match:
            floors[match.group(1).lower().replace("_", "-")] = match.group(2)
    return floors


def main(argv: list[str]) -> int:
    floors = declared_floors(Path(__file__).resolve().parents[1] / "pyproject.toml")
    wanted = [name.lower().replace("_", "-") for name in argv] or [n for n in floors if n not in SKIP]
    missing = [name for name in wanted if name not in floors]
    if missing:
        print(f"error: no `>=` lower bound declared for {', '.join(missing)} in pyproject.toml", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"{name}=={floors[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
