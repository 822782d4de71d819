"""Reproducible image and packaging metadata (issue 14): a lock file with hashes
that the Dockerfile installs from, no dev stack in the runtime image, an SPDX
licence string."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pyproject() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _locked() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    pins = re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)
    return {m[1].lower().replace("_", "-"): m[2] for m in pins}


def test_licence_is_an_spdx_expression() -> None:
    project = _pyproject()["project"]
    assert isinstance(project, dict) and project["license"] == "Apache-2.0"


def test_every_dependency_is_locked_at_its_pin_with_hashes() -> None:
    locked = _locked()
    project = _pyproject()["project"]
    assert isinstance(project, dict)
    for dep in project["dependencies"]:
        name = re.split(r"==|>=", dep)[0].strip().lower().replace("_", "-")
        assert name in locked, dep
        if "==" in dep:
            assert locked[name] == dep.split("==")[1], dep
    # The build tools too: the image builds the operator without downloading anything unpinned.
    assert {"setuptools", "wheel"} <= locked.keys()
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", (REPO / "requirements.lock").read_text())
    for entry in entries[1:]:
        assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_image_installs_from_the_lock_and_ships_no_dev_stack() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "requirements.lock" in dockerfile
    assert "--no-build-isolation" in dockerfile
    assert re.search(r"rm -rf \S*/site-packages/tether/devstack", dockerfile)
