# syntax=docker/dockerfile:1
#
# The Tether operator image.
#
#   docker build -t tether:dev .        (what `make image` runs)
#
# Two stages: "build" installs the operator and its dependencies into a
# virtualenv; the runtime stage copies only that virtualenv onto a fresh base.
# No compiler or build tool is needed even in "build" (every dependency ships
# a binary wheel, enforced by --only-binary below), and none reaches the
# runtime image.

# One pinned base for both stages. The virtualenv links to the base's
# python3.11, so both stages must have the very same interpreter. Pin a digest
# as well (python:3.11.15-slim-bookworm@sha256:...) for bit-for-bit
# reproducible builds.
#
# Where that image cannot be pulled (no registry reachable),
# scripts/kind/operator-image.sh (`make image`) passes
#   --build-arg PYTHON_IMAGE=<a debootstrapped Debian bookworm with python3.11>
# built by scripts/kind/images.sh python-base; everything below works on both
# (hence "python3", which both have, before the virtualenv exists).
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv

WORKDIR /src

# Dependencies first, from the lock file alone: this layer is rebuilt only
# when the lock changes, not on every source edit. requirements.lock (make
# lock) pins every package, build tools included, with its hashes, so two
# builds install the very same files and a tampered download fails the build.
# --only-binary: a dependency that would need compiling fails the build here
# rather than pulling a compiler into the image.
COPY requirements.lock ./
RUN pip install --require-hashes --only-binary=:all: -r requirements.lock

# Then the operator itself, as a regular (non-editable) install, built with the
# locked setuptools (no build isolation: nothing unpinned is downloaded); its
# dependencies are already in place. pip compiles the bytecode now, as the
# runtime root filesystem is read-only. The developer tools
# (devtools/, a distribution of their own) are never part of it, nor are pip,
# setuptools and wheel: nothing needs them at run time. `tether --version` proves the
# entry point imports.
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-deps --no-build-isolation . \
    && pip uninstall --yes pip setuptools wheel \
    && tether --version


FROM ${PYTHON_IMAGE}

# The version from pyproject.toml, the one place it is written:
# scripts/kind/operator-image.sh (`make image`) passes it.
ARG VERSION=0+unknown

LABEL org.opencontainers.image.title="tether" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="Kubernetes operator: ConsulService, EtcdConfig and ConsulConfig resources as the source of truth for Consul registrations, etcd and Consul KV configuration" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed non-root UID/GID, the one the Deployment's securityContext names
# (65532, the conventional "nonroot" of distroless images). No home
# directory, no login shell.
RUN groupadd --system --gid 65532 tether \
    && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tether

# Root-owned and read-only to the operator: it cannot modify its own code.
COPY --from=build /opt/venv /opt/venv

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    # Logs go straight to the container runtime, unbuffered, so the last
    # lines before a crash are not lost.
    PYTHONUNBUFFERED=1 \
    # The root filesystem is read-only in the Deployment; never try to write
    # .pyc files next to the code.
    PYTHONDONTWRITEBYTECODE=1

USER 65532:65532

# metrics (/metrics), health (/healthz)
EXPOSE 8080 8081

ENTRYPOINT ["tether", "run"]
CMD ["-A", "--metrics-port", "8080", "--health-port", "8081", "--log-format", "json", "--leader-elect"]
