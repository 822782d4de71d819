#!/usr/bin/env python3
"""An SPDX 2.3 JSON SBOM of the Python packages in the operator image, from requirements.lock.

    scripts/sbom.py --lock requirements.lock --version 0.1.0 [--dockerfile Dockerfile] > sbom.spdx.json

The image installs exactly what ``requirements.lock`` pins (``pip install --require-hashes``)
and then the operator itself, so the lock file is the list of its Python packages: no
network, no image needed. Each locked requirement becomes one SPDX package with its
version, a PyPI purl and, as checksums, the sha256 hashes the lock accepts (one per
published file: which wheel the image got depends on its platform, and it is one of these).
With ``--dockerfile``, the packages its ``pip uninstall --yes ...`` step removes from the
image (the build tools) are left out, so the SBOM describes the image, not the build.

Only the standard library: it runs from ``make release`` before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# `name==version` at the start of a logical line (pip-compile's continuation lines joined).
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
_UNINSTALL = re.compile(r"pip uninstall (?:--yes|-y) ((?:[A-Za-z0-9._-]+ ?)+)")


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    hashes: tuple[str, ...] = field(default=())


def normalise(name: str) -> str:
    """PEP 503 normalisation, which is also the purl spec's rule for pypi names."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> list[Locked]:
    """Every pinned requirement of a pip-compile lock file, with its hashes, in file order."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            logical.append(current.strip())
        current = ""
    found: list[Locked] = []
    for line in logical:
        pin = _PIN.match(line)
        if pin is None:
            continue
        found.append(Locked(normalise(pin[1]), pin[2], tuple(_HASH.findall(line))))
    return found


def uninstalled(dockerfile: str) -> set[str]:
    """The packages a Dockerfile's ``pip uninstall --yes a b c`` step removes."""
    names: set[str] = set()
    for match in _UNINSTALL.finditer(dockerfile):
        names.update(normalise(n) for n in match[1].split())
    return names


def _spdx_id(name: str) -> str:
    # SPDX identifiers allow letters, digits, '.' and '-' only.
    return "SPDXRef-Package-python-" + re.sub(r"[^A-Za-z0-9.-]", "-", name)


def document(
    packages: list[Locked], *, version: str, created: datetime.datetime, lock_text: str
) -> dict[str, Any]:
    """The SPDX document: the operator's distribution, which depends on every package."""
    root_id = "SPDXRef-Package-tether"
    # The same lock and version always give the same namespace (and, with a fixed
    # SOURCE_DATE_EPOCH, the same bytes): a rebuilt release is recognisably the same.
    digest = uuid.uuid5(uuid.NAMESPACE_URL, f"tether/{version}\n{lock_text}")
    spdx_packages: list[dict[str, Any]] = [
        {
            "SPDXID": root_id,
            "name": "tether",
            "versionInfo": version,
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "licenseConcluded": "Apache-2.0",
            "licenseDeclared": "Apache-2.0",
            "copyrightText": "NOASSERTION",
            "primaryPackagePurpose": "APPLICATION",
            "externalRefs": [
                {
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": f"pkg:pypi/tether@{version}",
                }
            ],
        }
    ]
    relationships: list[dict[str, str]] = [
        {
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": root_id,
        }
    ]
    for package in packages:
        spdx_packages.append(
            {
                "SPDXID": _spdx_id(package.name),
                "name": package.name,
                "versionInfo": package.version,
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                # Not read from the packages' metadata (that needs the files): left to
                # scanners rather than guessed.
                "licenseConcluded": "NOASSERTION",
                "licenseDeclared": "NOASSERTION",
                "copyrightText": "NOASSERTION",
                "primaryPackagePurpose": "LIBRARY",
                "checksums": [{"algorithm": "SHA256", "checksumValue": h} for h in package.hashes],
                "externalRefs": [
                    {
                        "referenceCategory": "PACKAGE-MANAGER",
                        "referenceType": "purl",
                        "referenceLocator": f"pkg:pypi/{package.name}@{package.version}",
                    }
                ],
            }
        )
        relationships.append(
            {
                "spdxElementId": root_id,
                "relationshipType": "DEPENDS_ON",
                "relatedSpdxElement": _spdx_id(package.name),
            }
        )
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"tether-{version}-image-python-packages",
        "documentNamespace": f"https://tether.dev/spdx/tether-{version}-{digest}",
        "creationInfo": {
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "creators": ["Tool: tether-scripts-sbom.py"],
            "comment": "Generated from requirements.lock, which the image installs with --require-hashes.",
        },
        "documentDescribes": [root_id],
        "packages": spdx_packages,
        "relationships": relationships,
    }


def _created() -> datetime.datetime:
    # SOURCE_DATE_EPOCH (reproducible-builds.org): release.sh sets it to the commit's time.
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.datetime.fromtimestamp(int(epoch), tz=datetime.UTC)
    return datetime.datetime.now(tz=datetime.UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--version", required=True, help="the operator's version (pyproject.toml)")
    parser.add_argument(
        "--dockerfile", type=Path, help="leave out what its `pip uninstall --yes` step removes"
    )
    args = parser.parse_args(argv)
    lock_text = args.lock.read_text()
    packages = parse_lock(lock_text)
    if not packages:
        print(f"sbom.py: no pinned requirement in {args.lock}", file=sys.stderr)
        return 1
    if args.dockerfile is not None:
        removed = uninstalled(args.dockerfile.read_text())
        packages = [p for p in packages if p.name not in removed]
    doc = document(packages, version=args.version, created=_created(), lock_text=lock_text)
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
