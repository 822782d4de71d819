"""Find the dev stack's programs, or build them once from pinned Go modules.

Each program (``kube-apiserver``, ``kubectl``, ``etcd``, ``consul``) is looked up,
one by one, in:

1. ``$TETHER_BIN_DIR`` — an explicit choice, used as it is;
2. ``PATH`` — but only a copy whose version fits the pins (a ``kubectl`` three minor
   versions away from the API server, as some cloud SDKs install, is outside
   Kubernetes' skew policy and is skipped with a message);
3. the cache ``~/.cache/tether/bin/k8s-<v>_etcd-<v>_consul-<v>/`` (root overridable
   with ``TETHER_CACHE_DIR``), filled on first use by ``go build`` in the build
   modules under ``devbin/``. Their ``go.mod`` files are the single source of the
   pinned versions: the cache directory is named after them, so changing a pin
   builds afresh instead of reusing a stale binary.

Builds go to a temporary directory next to the cache and each finished binary is
renamed into place, so an interrupted build never leaves a half-written program
where a later run would trust it. Before Consul is built, the LICENSE of every
``github.com/hashicorp/consul*`` module that goes into it is checked for MPL-2.0
(newer Consul releases are under the BSL, which Tether must not ship or build), and
the result is recorded in ``LICENSES.txt`` in the cache directory.

``python -m tether_dev.binaries`` pre-builds everything (for CI images).

Optional programs (:data:`OPTIONAL_RECIPES`: Jaeger's all-in-one, the OTLP receiver
of the tracing test) are not part of the stack: ``tether dev up`` neither builds nor
starts them. :func:`ensure_optional` finds or builds one on demand, in a cache
directory of its own (``jaeger-<v>/``), so pinning one never renames the stack's.

(Over 500 lines on purpose: locating, building and licence-checking the four
programs is one pinned procedure that reads best end to end.)
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from tether_dev import locks, reporting

NAMES: tuple[str, ...] = ("kube-apiserver", "kubectl", "etcd", "consul")

#: The repository root, found from this file: devtools/tether_dev/binaries.py.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEVBIN = REPO_ROOT / "devbin"

#: A cold build of Kubernetes takes ~10 min on 2 cores; nothing should take 6 times that.
BUILD_TIMEOUT = 60 * 60.0
#: How often a running build reports that it is still alive.
HEARTBEAT = 60.0
#: Bound on each ``--version`` probe of a program found on PATH.
VERSION_PROBE_TIMEOUT = 20.0

_LICENSE_FILES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "COPYING")
# HashiCorp's files say "Mozilla Public License, version 2.0" and (consul-net-rpc)
# "Mozilla Public License Version 2.0"; both are the MPL-2.0 text.
_MPL2 = re.compile(r"Mozilla Public License,? [Vv]ersion 2\.0")
_BSL = re.compile(r"Business Source License")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one Go build module under ``devbin/`` makes some of the programs."""

    module: str  # directory under devbin/
    label: str  # e.g. "k8s", as in the cache directory name
    pinned_module: str  # the Go module whose required version names the build
    packages: Mapping[str, str]  # program name -> Go package
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ldflags: tuple[str, ...] = ()
    duration_hint: str = ""
    check_licenses: bool = False


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        module="kubernetes",
        label="k8s",
        pinned_module="k8s.io/kubernetes",
        packages={
            "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
            "kubectl": "k8s.io/kubernetes/cmd/kubectl",
        },
        duration_hint="~10 min on 2 cores the first time",
    ),
    Recipe(
        module="etcd",
        label="etcd",
        pinned_module="go.etcd.io/etcd/server/v3",
        packages={"etcd": "go.etcd.io/etcd/server/v3"},
        duration_hint="~1.5 min on 2 cores the first time",
    ),
    Recipe(
        module="consul",
        label="consul",
        pinned_module="github.com/hashicorp/consul",
        packages={"consul": "github.com/hashicorp/consul"},
        # Both are missing from the public checksum database; go.sum pins them.
        env={"GONOSUMDB": "github.com/hashicorp/consul/envoyextensions,github.com/hashicorp/hcp-sdk-go"},
        # Consul 1.16 reaches into runtime internals with go:linkname, which newer
        # Go linkers refuse unless told otherwise.
        ldflags=("-checklinkname=0",),
        duration_hint="~6 min on 2 cores the first time",
        check_licenses=True,
    ),
)


#: Programs some tests start themselves; never part of ``tether dev up``.
OPTIONAL_RECIPES: tuple[Recipe, ...] = (
    Recipe(
        module="jaeger",
        label="jaeger",
        pinned_module="github.com/jaegertracing/jaeger",
        packages={"jaeger-all-in-one": "github.com/jaegertracing/jaeger/cmd/all-in-one"},
        duration_hint="~15 min on 2 cores the first time",
    ),
)


def recipe_for(name: str) -> Recipe:
    for recipe in RECIPES:
        if name in recipe.packages:
            return recipe
    raise KeyError(name)


# --------------------------------------------------------------------------- pins


def required_versions(gomod: str) -> dict[str, str]:
    """The ``require`` lines of a go.mod file: module path -> version.

    ``replace`` and ``exclude`` lines have the same shape inside their blocks, so
    the parser tracks which block it is in rather than matching lines alone.
    """
    versions: dict[str, str] = {}
    block: str | None = None
    for raw in gomod.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line:
            continue
        if block is not None:
            if line == ")":
                block = None
                continue
            words = line.split()
            if block == "require" and len(words) == 2:
                versions[words[0]] = words[1]
            continue
        match = re.fullmatch(r"(\w+)\s*\(", line)
        if match:
            block = match.group(1)
            continue
        words = line.split()
        if words[0] == "require" and len(words) == 3:
            versions[words[1]] = words[2]
    return versions


def pins(devbin: Path = DEVBIN) -> dict[str, str]:
    """Recipe label -> pinned version, read from the build modules' go.mod."""
    result: dict[str, str] = {}
    for recipe in RECIPES:
        gomod = devbin / recipe.module / "go.mod"
        try:
            versions = required_versions(gomod.read_text())
        except FileNotFoundError:
            raise reporting.DevStackError(
                f"no build module at {gomod}: run from a Tether checkout, or put "
                f"{', '.join(NAMES)} in a directory and set TETHER_BIN_DIR to it"
            ) from None
        if recipe.pinned_module not in versions:
            raise reporting.DevStackError(f"{gomod} does not require {recipe.pinned_module}")
        result[recipe.label] = versions[recipe.pinned_module]
    return result


def cache_root() -> Path:
    """``$TETHER_CACHE_DIR``, else ``$XDG_CACHE_HOME/tether``, else ``~/.cache/tether``."""
    explicit = os.environ.get("TETHER_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "tether").resolve()


def cache_dir(pinned: Mapping[str, str] | None = None) -> Path:
    """Where the binaries built for the current pins live."""
    pinned = pins() if pinned is None else pinned
    tag = "_".join(f"{recipe.label}-{pinned[recipe.label]}" for recipe in RECIPES)
    return cache_root() / "bin" / tag


# ----------------------------------------------------------------------- locating


def acceptable_version(name: str, output: str, pinned: Mapping[str, str]) -> bool:
    """Whether a program found on PATH, which printed ``output``, fits the pins.

    Kubernetes programs must have the pinned minor version (kubectl supports one
    minor of skew, and the API server's behaviour is what the tests pin); any etcd
    3.5/3.6 can store Kubernetes 1.3x data; any Consul from 1.16 on serves the agent
    API Tether uses.
    """
    if name in ("kube-apiserver", "kubectl"):
        major_minor = ".".join(pinned["k8s"].split(".")[:2])
        return re.search(re.escape(major_minor) + r"\.\d", output) is not None
    if name == "etcd":
        return re.search(r"etcd Version: 3\.[56]\.", output) is not None
    if name == "consul":
        match = re.search(r"Consul v1\.(\d+)\.", output)
        return match is not None and int(match.group(1)) >= 16
    raise KeyError(name)


_VERSION_ARGS: Mapping[str, tuple[str, ...]] = {
    "kube-apiserver": ("--version",),
    "kubectl": ("version", "--client"),
    "etcd": ("--version",),
    "consul": ("version",),
}


def _version_output(path: Path) -> str:
    try:
        done = subprocess.run(
            [str(path), *_VERSION_ARGS[path.name]],
            capture_output=True,
            text=True,
            timeout=VERSION_PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{exc}>"
    return done.stdout + done.stderr


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def locate(
    name: str,
    *,
    pinned: Mapping[str, str],
    progress: reporting.Progress = reporting.to_stderr,
) -> Path | None:
    """The program ``name`` from TETHER_BIN_DIR, PATH or the cache; None if nowhere."""
    bin_dir = os.environ.get("TETHER_BIN_DIR")
    if bin_dir:
        candidate = Path(bin_dir).expanduser() / name
        if _executable(candidate):
            return candidate.resolve()
    found = shutil.which(name)
    if found:
        candidate = Path(found).resolve()
        output = _version_output(candidate)
        if acceptable_version(name, output, pinned):
            return candidate
        first_line = output.strip().splitlines()[0] if output.strip() else "no output"
        progress(f"ignoring {found} ({first_line}): does not fit the pinned versions")
    cached = cache_dir(pinned) / name
    if _executable(cached):
        return cached
    return None


def ensure(
    names: Iterable[str] = NAMES,
    *,
    progress: reporting.Progress = reporting.to_stderr,
) -> dict[str, Path]:
    """Every program in ``names`` as an absolute path, building what is missing."""
    wanted = list(names)
    pinned = pins()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in wanted:
        path = locate(name, pinned=pinned, progress=progress)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        built = build(missing, pinned=pinned, progress=progress)
        for name in missing:
            found[name] = built / name
    return {name: found[name] for name in wanted}


# ----------------------------------------------------------------------- building


def build(
    names: Iterable[str],
    *,
    pinned: Mapping[str, str] | None = None,
    progress: reporting.Progress = reporting.to_stderr,
) -> Path:
    """Build the programs in ``names`` that are not yet in the cache; return the cache dir."""
    pinned = pins() if pinned is None else pinned
    dest = cache_dir(pinned)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = list(names)
    with locks.exclusive(dest.parent / f"{dest.name}.lock", timeout=BUILD_TIMEOUT, what="build cache"):
        # Another process may have built them while we waited for the lock.
        missing = [name for name in wanted if not _executable(dest / name)]
        for recipe in RECIPES:
            programs = [name for name in recipe.packages if name in missing]
            if programs:
                _build_recipe(recipe, programs, dest, version=pinned[recipe.label], progress=progress)
    return dest


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise reporting.DevStackError(
            f"{', '.join(NAMES)} are not all available and there is no Go toolchain to build "
            "them: install Go (https://go.dev/dl/), or put prebuilt binaries in a directory "
            "and set TETHER_BIN_DIR"
        )
    return go


def kubernetes_ldflags(version: str) -> tuple[str, ...]:
    """Stamp the version a release build would: ``go build`` alone reports v0.0.0-master.

    The API server serves it at ``/version`` and kubectl compares it for its skew
    warning, so a clean number avoids confusing both.
    """
    major, minor = version.lstrip("v").split(".")[:2]
    flags: list[str] = []
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {package}.gitVersion={version}",
            f"-X {package}.gitMajor={major}",
            f"-X {package}.gitMinor={minor}",
            f"-X {package}.gitTreeState=clean",
        ]
    return tuple(flags)


def build_command(recipe: Recipe, programs: Sequence[str], out_dir: Path, version: str) -> list[str]:
    """The ``go build`` command line that writes ``programs`` into ``out_dir``."""
    ldflags = list(recipe.ldflags)
    if recipe.module == "kubernetes":
        ldflags += kubernetes_ldflags(version)
    command = ["go", "build", "-trimpath"]
    if ldflags:
        command.append("-ldflags=" + " ".join(ldflags))
    # With one package, name the output file: etcd's package path ends in /v3, which
    # would otherwise name the binary "server". With several, `-o dir/` names each
    # after its package (cmd/kube-apiserver -> kube-apiserver).
    if len(programs) == 1:
        command += ["-o", str(out_dir / programs[0])]
    else:
        command += ["-o", f"{out_dir}{os.sep}"]
    command += [recipe.packages[name] for name in programs]
    return command


def _build_recipe(
    recipe: Recipe,
    programs: Sequence[str],
    dest: Path,
    *,
    version: str,
    progress: reporting.Progress,
) -> None:
    go = _go()
    module_dir = DEVBIN / recipe.module
    env = {**os.environ, **recipe.env}
    if recipe.check_licenses:
        check_licenses(module_dir, recipe, dest, env=env, progress=progress)
    progress(
        f"building {', '.join(programs)} ({recipe.label} {version}) … "
        f"this takes {recipe.duration_hint}"
    )
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{recipe.module}-", dir=dest.parent))
    try:
        command = build_command(recipe, programs, tmp, version)
        command[0] = go
        _run_build(command, cwd=module_dir, env=env, what=", ".join(programs), progress=progress)
        for name in programs:
            built = tmp / name
            if not _executable(built):
                raise reporting.DevStackError(f"go build succeeded but wrote no {built}")
            # Same filesystem, so the rename is atomic: the cache only ever holds
            # complete binaries.
            os.replace(built, dest / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"built {', '.join(programs)} in {_minutes(time.monotonic() - started)}")


def _run_build(
    command: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    what: str,
    progress: reporting.Progress,
) -> None:
    started = time.monotonic()
    # go's own output (downloads, compile errors) goes straight to our stderr.
    proc = subprocess.Popen(
        command, cwd=cwd, env=dict(env), stdout=sys.stderr, stderr=sys.stderr, start_new_session=True
    )
    try:
        while True:
            try:
                code = proc.wait(timeout=HEARTBEAT)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed > BUILD_TIMEOUT:
                    raise reporting.DevStackError(
                        f"building {what} took more than {_minutes(BUILD_TIMEOUT)}; gave up"
                    ) from None
                progress(f"… still building {what} ({_minutes(elapsed)})")
    finally:
        if proc.poll() is None:
            # Interrupted (Ctrl-C, timeout): stop go and the compilers it started.
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(timeout=30)
    if code != 0:
        raise reporting.DevStackError(
            f"building {what} failed (exit {code}): {' '.join(command)} in {cwd}"
        )


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s" if seconds >= 60 else f"{seconds:.0f} s"


# ----------------------------------------------------------------------- licenses


@dataclasses.dataclass(frozen=True)
class LicenseCheck:
    module: str
    version: str
    license_file: Path | None
    mpl2: bool


def license_is_mpl2(text: str) -> bool:
    """MPL-2.0 text present and no Business Source License anywhere in the file."""
    return _MPL2.search(text) is not None and _BSL.search(text) is None


def consul_modules(module_dir: Path, *, env: Mapping[str, str]) -> list[tuple[str, str, Path]]:
    """(path, version, directory) of every ``github.com/hashicorp/consul*`` module in the build.

    ``go list -deps`` of the program lists exactly the modules whose packages are
    compiled in (``go list -m all`` would also need metadata of unrelated modules,
    some of which the proxy no longer serves). A replaced module reports the
    replacement's directory, which is the code actually built.
    """
    template = (
        "{{with .Module}}{{.Path}}\t"
        "{{with .Replace}}{{.Version}}\t{{.Dir}}{{else}}{{.Version}}\t{{.Dir}}{{end}}{{end}}"
    )
    done = subprocess.run(
        [_go(), "list", "-deps", "-f", template, "github.com/hashicorp/consul"],
        cwd=module_dir,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30 * 60,  # may download every module zip on a cold module cache
        check=False,
    )
    if done.returncode != 0:
        raise reporting.DevStackError(f"go list in {module_dir} failed:\n{done.stderr.strip()}")
    modules: dict[str, tuple[str, str, Path]] = {}
    for line in done.stdout.splitlines():
        parts = line.split("\t")
        if len(parts) != 3:
            continue
        path, version, directory = parts
        if path == "github.com/hashicorp/consul" or path.startswith(
            ("github.com/hashicorp/consul/", "github.com/hashicorp/consul-")
        ):
            modules[path] = (path, version, Path(directory))
    return sorted(modules.values())


def check_licenses(
    module_dir: Path,
    recipe: Recipe,
    dest: Path,
    *,
    env: Mapping[str, str],
    progress: reporting.Progress,
) -> list[LicenseCheck]:
    """Refuse to build unless every Consul module is MPL-2.0; record the findings."""
    progress(f"checking the licenses of the {recipe.label} modules")
    checks: list[LicenseCheck] = []
    for path, version, directory in consul_modules(module_dir, env=env):
        license_file = next(
            (directory / name for name in _LICENSE_FILES if (directory / name).is_file()), None
        )
        ok = license_file is not None and license_is_mpl2(license_file.read_text(errors="replace"))
        checks.append(LicenseCheck(path, version, license_file, ok))
    if not any(check.module == "github.com/hashicorp/consul" for check in checks):
        raise reporting.DevStackError(f"go list in {module_dir} did not report github.com/hashicorp/consul")
    lines = [
        f"{'MPL-2.0' if check.mpl2 else 'REJECTED'}\t{check.module}@{check.version}\t"
        f"{check.license_file or 'no LICENSE file'}"
        for check in checks
    ]
    record = dest / "LICENSES.txt"
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(
        "# Licenses of the Consul modules built into ./consul, checked before building.\n"
        + "\n".join(lines)
        + "\n"
    )
    os.replace(tmp, record)
    rejected = [check for check in checks if not check.mpl2]
    if rejected:
        raise reporting.DevStackError(
            "refusing to build Consul: these modules are not MPL-2.0 (pin an older Consul in "
            f"{module_dir / 'go.mod'}):\n  "
            + "\n  ".join(f"{c.module}@{c.version} ({c.license_file})" for c in rejected)
        )
    progress(f"licenses OK: {len(checks)} Consul modules are MPL-2.0 (recorded in {record})")
    return checks


def optional_recipe(name: str) -> Recipe:
    for recipe in OPTIONAL_RECIPES:
        if name in recipe.packages:
            return recipe
    raise KeyError(name)


def optional_path(name: str, devbin: Path = DEVBIN) -> Path:
    """Where the optional program ``name`` of the pinned version is (or would be) cached."""
    recipe = optional_recipe(name)
    gomod = devbin / recipe.module / "go.mod"
    version = required_versions(gomod.read_text()).get(recipe.pinned_module)
    if version is None:
        raise reporting.DevStackError(f"{gomod} does not require {recipe.pinned_module}")
    return cache_root() / "bin" / f"{recipe.label}-{version}" / name


def find_optional(name: str) -> Path | None:
    """The optional program from ``$TETHER_BIN_DIR`` or the cache; None if not built yet."""
    bin_dir = os.environ.get("TETHER_BIN_DIR")
    if bin_dir and _executable(Path(bin_dir).expanduser() / name):
        return (Path(bin_dir).expanduser() / name).resolve()
    cached = optional_path(name)
    return cached if _executable(cached) else None


def ensure_optional(name: str, *, progress: reporting.Progress = reporting.to_stderr) -> Path:
    """The optional program ``name``, built into its cache directory if missing."""
    found = find_optional(name)
    if found is not None:
        return found
    recipe = optional_recipe(name)
    path = optional_path(name)
    dest = path.parent
    dest.mkdir(parents=True, exist_ok=True)
    with locks.exclusive(dest.parent / f"{dest.name}.lock", timeout=BUILD_TIMEOUT, what="build cache"):
        if not _executable(path):
            version = dest.name.removeprefix(f"{recipe.label}-")
            _build_recipe(recipe, [name], dest, version=version, progress=progress)
    return path


def main() -> int:
    """Pre-build (or find) every program and print where each one is."""
    for name, path in ensure().items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
