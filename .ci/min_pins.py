"""Print pip constraints that pin rmsjax's declared minimum versions (`name==floor`).

Reads the `>=` floors of [project].dependencies, and of the JAX-ecosystem packages of the
`test` extra, from pyproject.toml, so that the floors CI tests are the floors the package
declares: there is one list, not two. jaxlib is pinned with jax (jax pins its jaxlib).

flax is not pinned: it is a test-only dependency whose releases that have everything the
tests use need a newer jax than rmsjax's floor, so the newest flax that installs with the
pinned jax is used, and the few tests that need newer flax features skip with a reason.
pytest, hypothesis and the examples' packages are not pinned either: they do not touch
rmsjax's code paths.

Usage:  python .ci/min_pins.py > constraints.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
TEST_EXTRA_PINNED = {"chex"}


def floors(requirements: list[str]) -> dict[str, str]:
    found = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)\s*", requirement)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def main() -> int:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = floors(project["dependencies"])
    missing = {"jax", "optax", "numpy"} - set(pins)
    if missing:
        print(f"min_pins: no '>=' floor for {sorted(missing)} in pyproject.toml", file=sys.stderr)
        return 1
    test = floors(project["optional-dependencies"]["test"])
    pins.update({name: version for name, version in test.items() if name in TEST_EXTRA_PINNED})
    pins["jaxlib"] = pins["jax"]
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
