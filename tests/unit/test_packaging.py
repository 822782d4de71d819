"""Reproducible image and packaging metadata (issue 14): a lock file with hashes
that the Dockerfile installs from, no dev stack in the runtime image, an SPDX
licence string."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
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


def test_the_image_installs_from_the_lock_and_copies_no_dev_tools() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "requirements.lock" in dockerfile
    assert "--no-build-isolation" in dockerfile
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", dockerfile, re.M)
    assert copied and not any("devtools" in c or c.strip() == "." for c in copied), copied


def test_the_operator_wheel_holds_tether_alone(tmp_path: Path) -> None:
    """The wheel the image installs: every module under ``tether/``, no developer tool."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("tether-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {n for n in names if n.endswith(".py")}
    assert "tether/running.py" in modules and "tether/clients/kube/client.py" in modules
    assert not [n for n in modules if not n.startswith("tether/")], modules
    # The developer tools are a distribution of their own, with the `dev` command.
    dev = tomllib.loads((REPO / "devtools" / "pyproject.toml").read_text())
    assert dev["project"]["entry-points"]["tether.commands"] == {"dev": "tether_dev.cli:COMMAND"}


def test_every_test_module_has_a_name_of_its_own() -> None:
    """The suites are plain folders (no ``__init__.py``): pytest imports each test module
    by its basename, so two files of the same name in different suites cannot both run."""
    names = [p.name for p in (REPO / "tests").rglob("*.py") if p.name != "conftest.py"]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
