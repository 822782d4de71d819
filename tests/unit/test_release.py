"""The release (``make release``): the SBOM generator, ``install.yaml``, the version in one place.

``scripts/sbom.py`` runs here on the real ``requirements.lock`` and its output is checked
against the SPDX 2.3 shape; ``scripts/release.sh`` runs into a temporary directory and its
``install.yaml`` must hold every CRD ``crds/`` lists and the operator's Deployment (skipped,
saying why, only where no kubectl exists at all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SBOM = REPO / "scripts" / "sbom.py"
RELEASE = REPO / "scripts" / "release.sh"


def _version() -> str:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert isinstance(version, str)
    return version


def _locked() -> dict[str, str]:
    text = (REPO / "requirements.lock").read_text()
    pins = re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", text, re.M)
    return {re.sub(r"[-_.]+", "-", m[1]).lower(): m[2] for m in pins}


def _sbom(*extra: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(SBOM), "--lock", str(REPO / "requirements.lock"),
         "--version", _version(), *extra],
        check=True, capture_output=True, text=True, timeout=60,
        env={**os.environ, "SOURCE_DATE_EPOCH": "1700000000"},
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def _check_spdx_shape(doc: dict[str, Any]) -> None:
    assert doc["spdxVersion"] == "SPDX-2.3"
    assert doc["dataLicense"] == "CC0-1.0"
    assert doc["SPDXID"] == "SPDXRef-DOCUMENT"
    assert doc["documentNamespace"].startswith("https://")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", doc["creationInfo"]["created"])
    assert doc["creationInfo"]["creators"] and all(
        re.match(r"(Tool|Organization|Person): \S", c) for c in doc["creationInfo"]["creators"]
    )
    ids = [p["SPDXID"] for p in doc["packages"]]
    assert len(ids) == len(set(ids)), "SPDX identifiers must be unique"
    for package in doc["packages"]:
        assert re.fullmatch(r"SPDXRef-[A-Za-z0-9.-]+", package["SPDXID"]), package["SPDXID"]
        for key in ("name", "versionInfo", "downloadLocation", "licenseConcluded", "copyrightText"):
            assert package.get(key), (package["name"], key)
        assert package["filesAnalyzed"] is False
        for checksum in package.get("checksums", []):
            assert checksum["algorithm"] == "SHA256"
            assert re.fullmatch(r"[0-9a-f]{64}", checksum["checksumValue"])
    known = {*ids, "SPDXRef-DOCUMENT"}
    for rel in doc["relationships"]:
        assert rel["spdxElementId"] in known and rel["relatedSpdxElement"] in known, rel
    assert {"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
            "relatedSpdxElement": doc["documentDescribes"][0]} in doc["relationships"]


def _purl(package: dict[str, Any]) -> str:
    refs = [r for r in package["externalRefs"] if r["referenceType"] == "purl"]
    assert len(refs) == 1 and refs[0]["referenceCategory"] == "PACKAGE-MANAGER"
    locator: str = refs[0]["referenceLocator"]
    return locator


def test_sbom_has_one_package_per_locked_requirement() -> None:
    doc = _sbom()
    _check_spdx_shape(doc)
    locked = _locked()
    root, *deps = doc["packages"]
    assert (root["name"], root["versionInfo"]) == ("tether", _version())
    assert root["licenseDeclared"] == "Apache-2.0"
    assert {p["name"]: p["versionInfo"] for p in deps} == locked
    assert len(deps) == len(locked)
    lock_text = (REPO / "requirements.lock").read_text()
    for package in deps:
        assert _purl(package) == f"pkg:pypi/{package['name']}@{package['versionInfo']}"
        # Every hash the lock accepts for the package, and only those.
        assert package["checksums"], package["name"]
        for checksum in package["checksums"]:
            assert f"sha256:{checksum['checksumValue']}" in lock_text
    depends = {r["relatedSpdxElement"] for r in doc["relationships"]
               if r["relationshipType"] == "DEPENDS_ON" and r["spdxElementId"] == root["SPDXID"]}
    assert depends == {p["SPDXID"] for p in deps}


def test_sbom_leaves_out_what_the_image_uninstalls() -> None:
    """The Dockerfile removes the build tools from the image, so the SBOM does too."""
    doc = _sbom("--dockerfile", str(REPO / "Dockerfile"))
    _check_spdx_shape(doc)
    names = {p["name"] for p in doc["packages"][1:]}
    assert names == set(_locked()) - {"pip", "setuptools", "wheel"}
    assert "aiohttp" in names and "setuptools" not in names


def test_sbom_is_reproducible() -> None:
    assert _sbom() == _sbom()


def test_manifests_name_the_pyproject_version() -> None:
    """pyproject.toml holds the version; the base manifests must follow it when it changes."""
    version = _version()
    kustomization = yaml.safe_load((REPO / "manifests" / "kustomization.yaml").read_text())
    assert [i["newTag"] for i in kustomization["images"]] == [version]
    assert kustomization["labels"][0]["pairs"]["app.kubernetes.io/version"] == version
    deployment = yaml.safe_load((REPO / "manifests" / "deployment.yaml").read_text())
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert images == [f"ghcr.io/tether-dev/tether:{version}"]
    init = (REPO / "operator" / "tether" / "__init__.py").read_text()
    assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d+", init), "__version__ must be read, not written"


def _kubectl() -> str | None:
    bin_dir = os.environ.get("TETHER_BIN_DIR")
    if bin_dir and (Path(bin_dir) / "kubectl").is_file():
        return str(Path(bin_dir) / "kubectl")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tether" / "bin"
    built = sorted(cache.glob("*/kubectl"))
    if built:
        return str(built[-1])
    return shutil.which("kubectl")


def _crd_files() -> list[str]:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        path = REPO / "crds" / name
        if path.is_file():
            resources: list[str] = yaml.safe_load(path.read_text())["resources"]
            return resources
    raise AssertionError("crds/ has no kustomization")


def test_release_writes_every_crd_and_the_deployment(tmp_path: Path) -> None:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl (neither the dev stack's build nor one on PATH) to render manifests/")
    subprocess.run(
        [str(RELEASE), str(tmp_path)], check=True, capture_output=True, text=True, timeout=120,
        # No Docker daemon to ask: the image must then be named by its tag.
        env={**os.environ, "KUBECTL": kubectl, "DOCKER_HOST": "unix:///nonexistent.sock"},
    )
    objects = [d for d in yaml.safe_load_all((tmp_path / "install.yaml").read_text()) if d]
    expected = {
        yaml.safe_load((REPO / "crds" / f).read_text())["metadata"]["name"] for f in _crd_files()
    }
    crds = {o["metadata"]["name"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert crds == expected and len(crds) >= 3
    deployments = [o for o in objects if o["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == ["tether"]
    containers = deployments[0]["spec"]["template"]["spec"]["containers"]
    assert [c["image"] for c in containers] == [f"tether:{_version()}"]
    # The SBOM comes with it.
    doc = json.loads((tmp_path / "sbom.spdx.json").read_text())
    assert doc["spdxVersion"] == "SPDX-2.3" and doc["packages"][0]["versionInfo"] == _version()
    assert not list(tmp_path.glob(".overlay*")), "the throwaway overlay is removed"


@pytest.mark.parametrize(
    ("image", "repo_digest", "expected"),
    [
        # Docker's containerd image store gives a local build a digest of its own name:
        # no node can pull it, so the tag stays.
        ("tether", "tether@sha256:" + "a" * 64, "tether:{version}"),
        ("ghcr.io/tether-dev/tether", "ghcr.io/tether-dev/tether@sha256:" + "b" * 64,
         "ghcr.io/tether-dev/tether@sha256:" + "b" * 64),
        ("localhost:5000/tether", "localhost:5000/tether@sha256:" + "c" * 64,
         "localhost:5000/tether@sha256:" + "c" * 64),
    ],
)
def test_release_names_the_image_by_a_registry_digest_only(
    tmp_path: Path, image: str, repo_digest: str, expected: str
) -> None:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("no kubectl (neither the dev stack's build nor one on PATH) to render manifests/")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    # A Docker that answers: `info`, and `image inspect` with the image's RepoDigests.
    docker.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = image ] && [ "$2" = inspect ]; then\n'
        '  case "$*" in *RepoDigests*) echo "$FAKE_REPO_DIGEST" ;; esac\n'
        "fi\n"
        "exit 0\n"
    )
    docker.chmod(0o755)
    out = tmp_path / "out"
    subprocess.run(
        [str(RELEASE), str(out)], check=True, capture_output=True, text=True, timeout=120,
        env={**os.environ, "KUBECTL": kubectl, "IMAGE": image, "FAKE_REPO_DIGEST": repo_digest,
             "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    objects = [d for d in yaml.safe_load_all((out / "install.yaml").read_text()) if d]
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert images == [expected.format(version=_version())]
