"""What Tether reads and repairs of Kopf's record of the resources it watches.

Kopf resolves the resources to watch from the API server's discovery once at
its start, and again only when a CRD changes. A discovery read while the API
server restarts can lack a group whose CRDs are not served yet; Kopf then never
watches that kind, and says nothing. Kopf has no public API for this, so the
few private names used are kept here, against the pinned Kopf version
(``kopf==1.45.2`` in pyproject.toml):

- :func:`insights` — the ``Insights`` object passed to ``kopf.operator``, which
  Kopf fills with the resources it watches;
- :func:`watched` — the plurals of Tether's group among them, none while Kopf's
  namespace observer has not listed the namespaces yet: until then Kopf starts no
  watch at all, whatever kinds it knows;
- :func:`rescan` — re-reads Tether's group from discovery into the insights,
  exactly what Kopf's own resource observer does on a CRD event, and the core
  resources Kopf's observers wait for (namespaces, CRDs) when its first scan
  missed them; Kopf's orchestrator then starts the missing watches;
- :func:`add_missed_namespaces` — adds to the insights the namespaces that match
  the operator's patterns but that Kopf does not know of (see below).

Seen in a fault run: an operator started seconds after the API server restarted
watched nothing, silently, although its insights listed every Tether kind. Kopf's
namespace observer waits for ``namespaces`` to be in the backbone before it lists
namespaces, and the backbone is filled once, from the first discovery scan; a scan
that lacked the core group left the observer waiting for ever, the set of
namespaces empty, and so no (kind, namespace) watch was ever started.

Seen in CI: a namespace created right after the operator started was never
watched. Kopf's namespace observer lists the namespaces once, then starts a
watch whose own initial listing (and every relisting after an expired watch or
an API-server restart) it ignores: a namespace created between the two lists,
or while the watch reconnects, is never added. Tether follows the namespaces
anyway (TetherPolicy labels), so it hands Kopf the ones it missed.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import kopf
from kopf._cogs.structs.references import CRDS, NAMESPACES, Insights, NamespaceName, Resource, match_namespace
from kopf._core.reactor.observation import revise_resources

from tether.api import GROUP, VERSION
from tether.clients.kube.http import KubeHttp


def insights() -> Insights:
    """A fresh record for ``kopf.operator(insights=...)``."""
    return Insights()


def watched(record: Insights) -> set[str]:
    """The plurals of Tether's group that Kopf watches now (none before its namespaces are known)."""
    if not record.ready_namespaces.is_set():
        return set()
    return {r.plural for r in record.watched_resources if r.group == GROUP}


def resources(listing: Mapping[str, Any], *, group: str = GROUP, version: str = VERSION) -> set[Resource]:
    """Kopf's resources from one discovery answer for ``group``, as Kopf's scanner builds them."""
    items = listing.get("resources") or []
    return {
        Resource(
            group=group, version=version, kind=item["kind"], plural=item["name"],
            singular=item.get("singularName") or item["kind"].lower(),
            shortcuts=frozenset(item.get("shortNames") or ()),
            categories=frozenset(item.get("categories") or ()),
            subresources=frozenset(
                sub["name"].split("/", 1)[-1] for sub in items if sub["name"].startswith(f"{item['name']}/")
            ),
            namespaced=bool(item.get("namespaced")),
            preferred=True,  # Tether's group serves one version
            verbs=frozenset(item.get("verbs") or ()),
        )
        for item in items
        if "/" not in item["name"]
    }


# What Kopf's own observers wait for in the backbone: (selector, discovery path, group, version).
_CORE = (
    (NAMESPACES, "api/v1", "", "v1"),
    (CRDS, "apis/apiextensions.k8s.io/v1", "apiextensions.k8s.io", "v1"),
)


async def rescan(http: KubeHttp, record: Insights, registry: kopf.OperatorRegistry) -> None:
    """Read Tether's group from discovery into ``record``, as Kopf does when a CRD changes,
    and the core resources its observers wait for, if its first scan missed them."""
    for selector, path, group, version in _CORE:
        if selector not in record.backbone:
            core = {r for r in resources(await http.get(path, params={}) or {}, group=group, version=version)
                    if selector.check(r)}
            await record.backbone.fill(resources=core)
    listing = await http.get(f"apis/{GROUP}/{VERSION}", params={})
    found = resources(listing or {})
    async with record.revised:
        revise_resources(resources=found, insights=record, registry=registry, group=GROUP)
        await record.backbone.fill(resources=found)
        record.revised.notify_all()


async def add_missed_namespaces(
    record: Insights, patterns: Collection[str], present: Iterable[str]
) -> list[str]:
    """Add to ``record`` the namespaces of ``present`` that match ``patterns`` but Kopf does not watch.

    ``present`` are namespaces that exist and are not being deleted. Only
    additions: Kopf itself sees a deletion (its watch carries it whatever it
    missed before). Nothing to do for a cluster-wide operator (no patterns) or
    before Kopf's first namespace listing. Returns the names added, sorted.
    """
    if not patterns or not record.ready_namespaces.is_set():
        return []
    missed = sorted(
        name for name in present
        if name not in record.namespaces
        and any(match_namespace(NamespaceName(name), pattern) for pattern in patterns)
    )
    if missed:
        async with record.revised:
            record.namespaces.update(NamespaceName(name) for name in missed)
            record.revised.notify_all()
    return missed


class EventsOnlyDiffBase(kopf.DiffBaseStorage):
    """Kopf's diff base for an operator whose handlers are all event handlers: none.

    On every event Kopf builds the object's "essence" (a deep copy of the body
    without its status and most metadata) and compares it with the last handled
    one, for on-create/on-update handlers and daemons. Tether registers neither
    (it reconciles in its own controllers), so the comparison is never read: it
    was 6 % of the operator's CPU samples while 5000 + 5000 resources converged
    (py-spy; 4.1 % the deep copy alone). Public Kopf API: a settings' storage.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None,
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None
