"""The installed releases lie inside the ranges setup.cfg declares, and CI's oldest leg pins exactly
the declared minimums: a run on versions the package does not claim (or a claim no leg tests) fails."""

from __future__ import annotations

import configparser
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def declared(*extras: str) -> list[Requirement]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    lines = parser["options"]["install_requires"].split("\n")
    for extra in extras:
        lines += parser["options.extras_require"][extra].split("\n")
    return [Requirement(line) for line in lines if line.strip() and not line.strip().startswith("%")]


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{line!r}: the oldest leg pins exact versions"
            pins[requirement.name.lower().replace("_", "-")] = specifier.version
    return pins


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_installed_release_is_in_the_declared_range(requirement):
    installed = metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{requirement.name} {installed} is installed, outside the range setup.cfg declares ({requirement}):"
        " test it and widen the range, or install a release inside it")


def test_transformers_range_is_declared_and_bounded():
    (transformers,) = [r for r in declared() if r.name == "transformers"]
    assert any(s.operator == ">=" for s in transformers.specifier)
    assert any(s.operator == "<" for s in transformers.specifier), "a new major release renames what we use"


def test_the_oldest_leg_pins_every_declared_minimum():
    pins = oldest_pins()
    for requirement in declared("test"):
        (floor,) = [s.version for s in requirement.specifier if s.operator == ">="] or [None]
        if floor is None:
            continue
        name = requirement.name.lower().replace("_", "-")
        pin = pins.get(name)
        assert pin is not None and Version(pin) == Version(floor), f"{requirement}: pin {name}=={floor} in oldest.txt"
