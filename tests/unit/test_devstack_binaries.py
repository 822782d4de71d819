"""Finding and building the dev stack's programs: pins, version checks, licenses, the cache."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tether_dev import binaries
from tether_dev.reporting import DevStackError

PINS = {"k8s": "v1.35.4", "etcd": "v3.6.16", "consul": "v1.16.3"}

GOMOD = """\
// A comment mentioning require (
module example.com/build

go 1.25.0

replace (
\tk8s.io/api => k8s.io/api v0.35.4
)

exclude (
\tgithub.com/hashicorp/go-msgpack v1.1.5
)

tool k8s.io/kubernetes/cmd/kube-apiserver

require k8s.io/kubernetes v1.35.4

require (
\tgithub.com/beorn7/perks v1.0.1 // indirect
\tk8s.io/api v0.0.0 // indirect
)
"""


def test_required_versions_reads_only_require_lines() -> None:
    assert binaries.required_versions(GOMOD) == {
        "k8s.io/kubernetes": "v1.35.4",
        "github.com/beorn7/perks": "v1.0.1",
        "k8s.io/api": "v0.0.0",
    }


def test_pins_come_from_the_committed_build_modules() -> None:
    assert binaries.pins() == PINS


def test_cache_dir_is_named_after_the_pins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path))
    assert binaries.cache_dir(PINS) == (
        tmp_path / "bin" / "k8s-v1.35.4_etcd-v3.6.16_consul-v1.16.3"
    )


def test_cache_root_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TETHER_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert binaries.cache_root() == tmp_path / "tether"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert binaries.cache_root() == (Path.home() / ".cache" / "tether").resolve()


@pytest.mark.parametrize(
    ("name", "output", "ok"),
    [
        ("kubectl", "Client Version: v1.35.4\nKustomize Version: v5.7.1", True),
        ("kubectl", "Client Version: v1.35.0-rc.1", True),
        ("kubectl", "Client Version: v1.32.4-dispatcher", False),
        ("kube-apiserver", "Kubernetes v1.35.1", True),
        ("kube-apiserver", "Kubernetes v0.0.0-master+$Format:%H$", False),
        ("kube-apiserver", "Kubernetes v1.3.5", False),
        ("etcd", "etcd Version: 3.6.16\nGit SHA: x", True),
        ("etcd", "etcd Version: 3.5.21", True),
        ("etcd", "etcd Version: 3.4.30", False),
        ("consul", "Consul v1.16.3\nRevision abc", True),
        ("consul", "Consul v1.21.0", True),
        ("consul", "Consul v1.15.2", False),
        ("consul", "<[Errno 8] Exec format error>", False),
    ],
)
def test_programs_on_path_must_fit_the_pins(name: str, output: str, ok: bool) -> None:
    assert binaries.acceptable_version(name, output, PINS) is ok


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("Copyright (c) 2013 HashiCorp, Inc.\n\nMozilla Public License, version 2.0\n", True),
        ("Copyright (c) 2022 HashiCorp, Inc.\n\nMozilla Public License Version 2.0\n", True),
        ("License text copyright (c) 2020 MariaDB Corporation Ab\n"
         "\"Business Source License\" is a trademark of MariaDB Corporation Ab.\n", False),
        ("Mozilla Public License, version 2.0 ... Business Source License 1.1", False),
        ("Mozilla Public License, version 1.1", False),
        ("", False),
    ],
)
def test_only_mpl2_licenses_pass(text: str, ok: bool) -> None:
    assert binaries.license_is_mpl2(text) is ok


def test_build_command_names_a_single_output_file(tmp_path: Path) -> None:
    recipe = binaries.recipe_for("etcd")
    command = binaries.build_command(recipe, ["etcd"], tmp_path, "v3.6.16")
    # etcd's package path ends in /v3: without a file name the binary would be "server".
    assert command == [
        "go", "build", "-trimpath", "-o", str(tmp_path / "etcd"), "go.etcd.io/etcd/server/v3"
    ]


def test_build_command_for_kubernetes_stamps_the_version(tmp_path: Path) -> None:
    recipe = binaries.recipe_for("kubectl")
    command = binaries.build_command(recipe, ["kube-apiserver", "kubectl"], tmp_path, "v1.35.4")
    assert command[-4:] == [
        "-o",
        f"{tmp_path}{os.sep}",
        "k8s.io/kubernetes/cmd/kube-apiserver",
        "k8s.io/kubernetes/cmd/kubectl",
    ]
    ldflags = next(arg for arg in command if arg.startswith("-ldflags="))
    assert "-X k8s.io/component-base/version.gitVersion=v1.35.4" in ldflags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=35" in ldflags


def test_build_command_for_consul_allows_its_linknames(tmp_path: Path) -> None:
    recipe = binaries.recipe_for("consul")
    command = binaries.build_command(recipe, ["consul"], tmp_path, "v1.16.3")
    assert "-ldflags=-checklinkname=0" in command
    assert recipe.check_licenses
    assert "github.com/hashicorp/consul/envoyextensions" in recipe.env["GONOSUMDB"]


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_locate_prefers_tether_bin_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    etcd = write_script(tmp_path / "explicit" / "etcd", "echo 'etcd Version: 9.9'\n")
    monkeypatch.setenv("TETHER_BIN_DIR", str(etcd.parent))
    # Used as it is, even though its version would not pass the PATH check.
    assert binaries.locate("etcd", pinned=PINS) == etcd


def test_locate_skips_a_path_program_of_the_wrong_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TETHER_BIN_DIR", raising=False)
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path / "cache"))
    write_script(tmp_path / "path" / "kubectl", "echo 'Client Version: v1.32.4-dispatcher'\n")
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    said: list[str] = []
    assert binaries.locate("kubectl", pinned=PINS, progress=said.append) is None
    assert "v1.32.4-dispatcher" in said[0]

    cached = write_script(binaries.cache_dir(PINS) / "kubectl", "exit 0\n")
    assert binaries.locate("kubectl", pinned=PINS, progress=said.append) == cached


def test_locate_accepts_a_path_program_that_fits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TETHER_BIN_DIR", raising=False)
    consul = write_script(tmp_path / "path" / "consul", "echo 'Consul v1.16.3'\n")
    monkeypatch.setenv("PATH", str(consul.parent))
    assert binaries.locate("consul", pinned=PINS) == consul


FAKE_GO = """\
# A stand-in for `go build`: writes a script at the -o path, or fails on request.
[ -n "$FAKE_GO_FAIL" ] && { echo "fake compile error" >&2; exit 2; }
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out="$2"; shift; fi
  shift
done
printf '#!/bin/sh\\necho built\\n' > "$out"
chmod +x "$out"
"""


def test_build_renames_finished_binaries_into_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_script(tmp_path / "go-bin" / "go", FAKE_GO)
    monkeypatch.setenv("PATH", f"{tmp_path / 'go-bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    dest = binaries.build(["etcd"], pinned=PINS, progress=said.append)
    assert dest == binaries.cache_dir(PINS)
    assert os.access(dest / "etcd", os.X_OK)
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".build-")] == []
    assert any(line.startswith("building etcd (etcd v3.6.16)") for line in said)
    assert any(line.startswith("built etcd in") for line in said)


def test_a_failed_build_leaves_nothing_in_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_script(tmp_path / "go-bin" / "go", FAKE_GO)
    monkeypatch.setenv("PATH", f"{tmp_path / 'go-bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FAKE_GO_FAIL", "1")
    with pytest.raises(DevStackError, match="building etcd failed"):
        binaries.build(["etcd"], pinned=PINS, progress=lambda _: None)
    dest = binaries.cache_dir(PINS)
    assert not (dest / "etcd").exists()
    assert [p.name for p in dest.parent.iterdir() if p.name.startswith(".build-")] == []


def test_no_go_toolchain_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(DevStackError, match="TETHER_BIN_DIR"):
        binaries.build(["etcd"], pinned=PINS, progress=lambda _: None)


def test_jaeger_is_optional_and_cached_apart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Not a program of the stack: pinning it must not rename (and so rebuild) the
    # stack's cache directory, and `tether dev up` never builds it.
    monkeypatch.setenv("TETHER_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TETHER_BIN_DIR", raising=False)
    assert "jaeger-all-in-one" not in binaries.NAMES
    assert "jaeger" not in binaries.cache_dir().name
    path = binaries.optional_path("jaeger-all-in-one")
    assert path == tmp_path / "bin" / "jaeger-v1.75.0" / "jaeger-all-in-one"
    assert binaries.find_optional("jaeger-all-in-one") is None
    path.parent.mkdir(parents=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    assert binaries.find_optional("jaeger-all-in-one") == path
    command = binaries.build_command(
        binaries.optional_recipe("jaeger-all-in-one"), ["jaeger-all-in-one"], tmp_path, "v1.75.0"
    )
    assert command[-3:] == ["-o", str(tmp_path / "jaeger-all-in-one"),
                            "github.com/jaegertracing/jaeger/cmd/all-in-one"]
