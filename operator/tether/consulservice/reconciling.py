"""The ConsulService kind for the shared reconcile skeleton: a dispatcher over its two modes.

A ConsulService is either one fixed instance, registered on the Consul agent
(:class:`~tether.consulservice.agent.AgentServices`), or the endpoints of a
Kubernetes Service, as instances in Consul's catalog
(:class:`~tether.consulservice.catalog.CatalogServices`). Both modes are
always there and share the small :class:`Mode` protocol; this module parses
the spec once, picks the mode, and moves a resource from one mode to the
other: nothing it registered in the mode it left may stay behind.

* fixed → endpoints: the agent registration is removed *before* the
  instances are written (one owner never has both);
* endpoints → fixed: the registration is written first, then the catalog
  instances are removed in the same reconcile (no moment without any
  instance), whatever the agent answered — a resource that stopped
  following its Service must not stay in the catalog, passing.

It also lets the skeleton collect orphans: the catalog and agent watchers hand
it an owner with instances on the node, or registrations on the agent, that the
controller's cache does not hold (:meth:`ConsulServices.collect`), and only
this reconciler writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Protocol

from tether import conditions
from tether.api import InvalidSpec, ObjectRef
from tether.api import consulservices as api
from tether.api.policies import Claims
from tether.clients.consul.client import ConsulError
from tether.consulservice.agent import UNKNOWN_HEALTH, AgentServices
from tether.consulservice.catalog import CatalogServices
from tether.reconciling import Outcome, Resource


class Mode(Protocol):
    """One way of reaching Consul for a parsed ConsulService spec."""

    #: The mode's name in messages ("fixed-instance", "endpoints").
    name: str
    #: What the mode holds in Consul for a resource, for messages.
    holding: str

    def holds(self, res: Resource) -> bool:
        """Whether Consul may hold something of ``res`` in this mode (cheap: no Consul call)."""
        ...

    async def apply(self, res: Resource, spec: api.ConsulServiceSpec) -> Outcome: ...

    async def release(self, res: Resource, spec: api.ConsulServiceSpec | None, *, orphan: bool) -> Outcome:
        """Remove (``orphan``: release) what ``res`` owns in this mode; a released Outcome.

        ``spec`` is None when the spec does not parse, or when the resource
        is leaving this mode for the other one. Raises ConsulError when
        Consul could not do it; the caller makes that a status.
        """
        ...

    def forget(self, ref: ObjectRef) -> None: ...


class Lookup(Protocol):
    """Reads one ConsulService from Kubernetes (None: it does not exist)."""

    async def get(self, ref: ObjectRef) -> dict[str, Any] | None: ...


class ConsulServices:
    """The ConsulService reconciler: parses the spec and dispatches to one of two modes."""

    kind = api.KIND
    plural = api.PLURAL

    def __init__(self, fixed: AgentServices, endpoints: CatalogServices, lookup: Lookup) -> None:
        self.fixed = fixed
        self.endpoints = endpoints
        #: Kubernetes, asked whether an orphan's owner still exists.
        self.lookup = lookup

    def _modes(self, endpoints_mode: bool) -> tuple[Mode, Mode]:
        """(the mode of the spec, the other one)."""
        if endpoints_mode:
            return self.endpoints, self.fixed
        return self.fixed, self.endpoints

    async def apply(self, res: Resource) -> Outcome:
        try:
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        except InvalidSpec as exc:
            self.forget(res.ref)
            return Outcome.from_error(
                exc, doing="register", fields={"health": "unknown"}, conditions=UNKNOWN_HEALTH
            )
        mode, other = self._modes(spec.endpoints is not None)
        if mode is self.endpoints:
            # Break before make: one owner never has a registration and instances at once.
            left = await self._leave(res, spec, other)
            if left is not None and not left.released:
                return left
            outcome = await mode.apply(res, spec)
            return outcome if left is None else _with_notes(outcome, left)
        outcome = await mode.apply(res, spec)
        left = await self._leave(res, spec, other)
        if left is None:
            return outcome
        if not left.released:
            return left
        return _with_notes(outcome, left)

    async def _leave(self, res: Resource, spec: api.ConsulServiceSpec, other: Mode) -> Outcome | None:
        """Remove what ``res`` may still hold in the mode it is not in (None: nothing to do)."""
        if not other.holds(res):
            return None
        try:
            # No spec: the current one is not that mode's (its ID was never used
            # there unless the status or the owner index says so).
            return await other.release(res, None, orphan=False)
        except ConsulError as exc:
            return Outcome.from_error(
                exc, doing=f"remove {other.holding} (left {other.name} mode)",
                fields={"serviceID": spec.id, "health": "unknown"}, conditions=UNKNOWN_HEALTH,
            )

    async def release(self, res: Resource) -> Outcome:
        spec: api.ConsulServiceSpec | None = None
        with contextlib.suppress(InvalidSpec):
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        # From the raw spec: an invalid one is still released in the mode it names.
        mode, _ = self._modes(res.spec.get("endpoints") is not None)
        try:
            return await mode.release(res, spec, orphan=res.deletion_policy == "Orphan")
        except ConsulError as exc:
            return Outcome.release_failed(exc, doing=f"remove {mode.holding}")

    def forget(self, ref: ObjectRef) -> None:
        self.fixed.forget(ref)
        self.endpoints.forget(ref)

    # -- TetherPolicy (the skeleton checks claims before apply) -----------------

    def claims(self, res: Resource) -> Claims | None:
        """The Consul service name: what clients resolve, in both modes.

        The service ID is not a claim: a registration under an ID is owned by
        its resource's cluster/namespace/name meta, so another namespace's
        custom ``spec.id`` gets Conflict, never that registration; and a
        squatted ID under an allowed name only ever serves that name.
        """
        try:
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        except InvalidSpec:
            return None
        return Claims("service", spec.name)

    async def withdraw(self, res: Resource, message: str) -> Outcome:
        """Forbidden: the namespace must stop receiving the service's traffic, so
        every instance this resource owns goes, in both modes (agent
        registrations and catalog instances alike), whatever ``deletionPolicy``
        says."""
        spec: api.ConsulServiceSpec | None = None
        with contextlib.suppress(InvalidSpec):
            spec = api.parse(res.ref.namespace, res.ref.name, res.spec)
        unknown = {"health": "unknown"}
        try:
            await self.fixed.release(res, spec, orphan=False)
            await self.endpoints.withdraw(res)
        except ConsulError as exc:
            failed = Outcome.from_error(exc, doing="remove its instances from Consul")
            return Outcome.failed(
                conditions.FORBIDDEN, f"{message}; {failed.message}", fields=unknown,
                conditions=UNKNOWN_HEALTH, retry=True,
            )
        return Outcome.failed(
            conditions.FORBIDDEN, f"{message}; its Consul instances are removed", fields=unknown,
            conditions=UNKNOWN_HEALTH, retry=False,
        )

    async def collect(self, ref: ObjectRef) -> None:
        """Remove what ``ref``, which the controller's cache does not hold, left in Consul.

        Either watcher may have asked (catalog instances on the node, registrations
        on the agent); each mode removes its part only once Kubernetes confirms that
        no resource wants it.
        """
        await self.endpoints.collect(ref)
        if self.fixed.may_hold_orphan(ref) and await self.lookup.get(ref) is None:
            await self.fixed.collect(ref)


def _with_notes(outcome: Outcome, left: Outcome) -> Outcome:
    """``outcome`` with the events of leaving the other mode before its own."""
    return dataclasses.replace(outcome, notes=(*left.notes, *outcome.notes))
