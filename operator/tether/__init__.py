"""Tether: Kubernetes custom resources as the source of truth for Consul and etcd."""

from importlib import metadata

# The version is written in one place, pyproject.toml; this reads the installed
# distribution's (what `tether --version` prints).
try:
    __version__ = metadata.version("tether")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
