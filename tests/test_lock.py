"""requirements.lock, which `make` installs, agrees with pyproject.toml's dependencies and with this environment.

The lock is regenerated with `make lock`; a dependency added to or re-bounded in pyproject.toml
without that step, or an environment installed some other way, fails here.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)")


def locked(text: str) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a pip-compile lock."""
    return {canonicalize_name(match[1]): match[2] for match in map(PIN.match, text.splitlines()) if match}


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["dev"]]


LOCK = locked((ROOT / "requirements.lock").read_text())


def test_the_lock_parser_reads_pins_and_skips_comments():
    text = "# header\nTorch==2.14.1\n    # via foo\nruamel.yaml==0.19.1 ; python_version < '4'\n"
    assert locked(text) == {"torch": "2.14.1", "ruamel-yaml": "0.19.1"}


@pytest.mark.parametrize("requirement", declared(), ids=str)
def test_every_declared_dependency_is_pinned_within_its_bounds(requirement):
    name = canonicalize_name(requirement.name)
    assert name in LOCK, f"{requirement.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
    assert requirement.specifier.contains(LOCK[name], prereleases=True), (
        f"requirements.lock pins {name}=={LOCK[name]}, outside pyproject.toml's {requirement}: run `make lock`")


def test_the_lock_was_compiled_from_pyproject_with_the_dev_extra():
    header = (ROOT / "requirements.lock").read_text().split("\n\n")[0]
    assert "pip-compile" in header and "--extra=dev" in header and "pyproject.toml" in header


def test_this_environment_is_installed_from_the_lock():
    mismatched = {}
    for name, pinned in LOCK.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed is None or installed.split("+")[0] != pinned.split("+")[0]:
            mismatched[name] = (pinned, installed)
    assert mismatched == {}, "installed versions differ from requirements.lock: run `make install`"
