"""``spec.from``: reading ConfigMaps and Secrets, and knowing who depends on which.

The ConfigMap/Secret watch wakes the resources that name an object through
:class:`SourceIndex`; :func:`resolve` turns a spec into ``{full key: value}``
with the contract's precedence (sources in order, later ones winning, then
``data``). Values may be Secret data: only names reach a message.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from tether.api import InvalidSpec, ObjectRef
from tether.api import configs as api

SourceId = tuple[api.SourceKind, str, str]  # kind, namespace, name


class Sources(Protocol):
    """Where ``spec.from`` is read: :class:`tether.clients.kube.client.KubeClient`."""

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None: ...

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None: ...


def label(kind: api.SourceKind) -> str:
    return "ConfigMap" if kind == "configMap" else "Secret"


async def resolve(sources: Sources, namespace: str, spec: api.ConfigSpec, *, store: str) -> dict[str, bytes]:
    """``{full key: value}`` for ``spec``; a missing source or a bad key is :class:`InvalidSpec`."""
    relative: dict[str, bytes] = {}
    for source in spec.sources:
        what = f"{label(source.kind)} {namespace}/{source.name}"
        if source.kind == "configMap":
            found = await sources.read_config_map(namespace, source.name)
        else:
            found = await sources.read_secret(namespace, source.name)
        if found is None:
            if source.optional:
                continue
            # No retry: the ConfigMap/Secret watch wakes this resource through
            # the SourceIndex when the object appears.
            raise InvalidSpec(f"{what} not found (set optional: true to ignore it)")
        for key in sorted(found):
            problem = api.key_problem(key)
            if problem:
                raise InvalidSpec(f"{what}: key {key!r} {problem}, so it cannot be a {store} key")
        relative.update(found)
    for key, value in spec.data:
        relative[key] = value.encode()
    return {spec.full_key(key): value for key, value in relative.items()}


class SourceIndex:
    """Which resources name which ConfigMap or Secret in ``spec.from``."""

    def __init__(self) -> None:
        self._sources: dict[ObjectRef, frozenset[SourceId]] = {}
        self._dependents: dict[SourceId, set[ObjectRef]] = {}

    def dependents(self, kind: api.SourceKind, namespace: str, name: str) -> list[ObjectRef]:
        """Resources whose ``spec.from`` names this ConfigMap or Secret."""
        return sorted(self._dependents.get((kind, namespace, name), ()))

    def dependents_in(self, kind: api.SourceKind, namespace: str) -> list[ObjectRef]:
        """Resources in ``namespace`` naming any object of ``kind`` (the watch's scope)."""
        found: set[ObjectRef] = set()
        for (k, ns, _), refs in self._dependents.items():
            if k == kind and ns == namespace:
                found.update(refs)
        return sorted(found)

    def set(self, ref: ObjectRef, sources: Iterable[SourceId]) -> None:
        new = frozenset(sources)
        old = self._sources.pop(ref, frozenset())
        for source in old - new:
            refs = self._dependents.get(source)
            if refs is not None:
                refs.discard(ref)
                if not refs:
                    del self._dependents[source]
        for source in new - old:
            self._dependents.setdefault(source, set()).add(ref)
        if new:
            self._sources[ref] = new

    def forget(self, ref: ObjectRef) -> None:
        self.set(ref, ())
