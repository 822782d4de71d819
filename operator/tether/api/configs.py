"""EtcdConfig and ConsulConfig: one spec (prefix, data, from, prune, adopt,
deletionPolicy) as a typed, validated model, for two stores.

The kinds differ only in the shape of a key: etcd keys start with ``/``,
Consul KV keys do not (Consul's own convention, ``shop/payments``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tether.api import InvalidSpec

SourceKind = Literal["configMap", "secret"]


@dataclass(frozen=True)
class Flavor:
    """What tells the config kinds apart."""

    kind: str
    plural: str
    store: str  # for messages: "etcd", "Consul KV"
    rooted: bool  # keys start with "/"
    revision_field: str  # the status field naming the store's stamp of the last write


ETCD = Flavor("EtcdConfig", "etcdconfigs", store="etcd", rooted=True, revision_field="revision")
CONSUL = Flavor(
    "ConsulConfig", "consulconfigs", store="Consul KV", rooted=False, revision_field="modifyIndex"
)


@dataclass(frozen=True)
class Source:
    """One entry of ``spec.from``: every key of a ConfigMap or Secret."""

    kind: SourceKind
    name: str
    optional: bool = False


@dataclass(frozen=True)
class ConfigSpec:
    """What a config resource asks its store to hold (before ``from`` is resolved)."""

    prefix: str
    data: tuple[tuple[str, str], ...] = ()
    sources: tuple[Source, ...] = ()
    prune: bool = True
    adopt: bool = False
    deletion_policy: Literal["Delete", "Orphan"] = "Delete"

    def full_key(self, relative: str) -> str:
        return join(self.prefix, relative)


def join(prefix: str, relative: str) -> str:
    """The contract's rule: prefix without trailing ``/`` + ``/`` + relative key."""
    return prefix.rstrip("/") + "/" + relative


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a relative key, or None when it can."""
    if not key:
        return "is empty"
    if key.startswith("/"):
        return "starts with '/' (relative keys are joined to the prefix)"
    for segment in key.split("/"):
        if segment == "":
            return "has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
    return None


def parse(spec: Mapping[str, Any], flavor: Flavor) -> ConfigSpec:
    """Validate ``spec`` (as the API server stored it) and return the typed model."""
    prefix = spec.get("prefix")
    if not isinstance(prefix, str):
        raise InvalidSpec(f"spec.prefix: {prefix!r} must be a string")
    if flavor.rooted and not prefix.startswith("/"):
        raise InvalidSpec(f"spec.prefix: {prefix!r} must be a string starting with '/'")
    if not flavor.rooted and (prefix.startswith("/") or not prefix.strip("/")):
        raise InvalidSpec(
            f"spec.prefix: {prefix!r} must be a non-empty string without a leading '/' "
            "(Consul KV keys do not start with '/', e.g. shop/payments)"
        )
    if "//" in prefix or any(s in (".", "..") for s in prefix.strip("/").split("/") if s):
        raise InvalidSpec(f"spec.prefix: {prefix!r} has an empty, '.' or '..' segment")
    raw_data = spec.get("data") or {}
    if not isinstance(raw_data, Mapping):
        raise InvalidSpec("spec.data: must be a map of relative key to string value")
    data = []
    for key, value in sorted(raw_data.items()):
        if not isinstance(key, str):
            raise InvalidSpec(f"spec.data: key {key!r} must be a string")
        problem = key_problem(key)
        if problem:
            raise InvalidSpec(f"spec.data: key {key!r} {problem}")
        if not isinstance(value, str):
            raise InvalidSpec(f"spec.data.{key}: value must be a string")
        data.append((key, value))
    raw_from = spec.get("from") or []
    if not isinstance(raw_from, list):
        raise InvalidSpec("spec.from: must be a list")
    sources = []
    for i, item in enumerate(raw_from):
        if not isinstance(item, Mapping):
            raise InvalidSpec(f"spec.from[{i}]: must be an object")
        refs = [k for k in ("configMapRef", "secretRef") if item.get(k) is not None]
        if len(refs) != 1:
            raise InvalidSpec(f"spec.from[{i}]: needs exactly one of configMapRef, secretRef")
        ref = item[refs[0]]
        if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str) or not ref["name"]:
            raise InvalidSpec(f"spec.from[{i}].{refs[0]}.name: required")
        kind: SourceKind = "configMap" if refs[0] == "configMapRef" else "secret"
        sources.append(Source(kind=kind, name=ref["name"], optional=bool(ref.get("optional"))))
    policy = spec.get("deletionPolicy", "Delete")
    if policy not in ("Delete", "Orphan"):
        raise InvalidSpec(f"spec.deletionPolicy: {policy!r} must be Delete or Orphan")
    return ConfigSpec(
        prefix=prefix,
        data=tuple(data),
        sources=tuple(sources),
        prune=bool(spec.get("prune", True)),
        adopt=bool(spec.get("adopt", False)),
        deletion_policy=policy,
    )
