"""The config kinds' reconciler (EtcdConfig, ConsulConfig) on in-memory model stores.

Not end-to-end (those run against a real etcd and Consul): these check the
reconciler's own logic — outcomes, events, drift bookkeeping, retries, the
limits it learns, failing closed — for both kinds, each through its real
store adapter (:class:`~tether.config.stores.etcd.EtcdStore`,
:class:`~tether.config.stores.consulkv.ConsulKVStore`) over a fake client backed by a
model of that store's transaction semantics (:mod:`kvmodels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from kvmodels import ConsulModel, EtcdModel, FakeClock, FakeConsulKV, FakeEtcdClient, Faults, Model

from tether.api import ObjectRef
from tether.clients.etcd.errors import EtcdUnavailable
from tether.config import planner
from tether.config.consulconfigs import ConsulConfigs
from tether.config.etcdconfigs import EtcdConfigs
from tether.config.expectations import Expectations
from tether.config.reconciling import ConfigReconciler
from tether.config.sources import SourceIndex
from tether.config.stores.consulkv import ConsulKVStore
from tether.config.stores.etcd import EtcdStore
from tether.config.values import Change
from tether.reconciling import Outcome, Resource

BACKENDS = ["consul", "etcd"]
OTHER = planner.owner_id("kubernetes", "team-b", "other")


class Kube:
    """ConfigMaps and Secrets by name (``tether.config.sources.Sources``)."""

    def __init__(self) -> None:
        self.config_maps: dict[str, dict[str, bytes]] = {}
        self.secrets: dict[str, dict[str, bytes]] = {}

    async def read_config_map(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.config_maps.get(name)

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        return self.secrets.get(name)


@dataclass
class Rig:
    """One config kind wired to a model store, and what the tests look at."""

    backend: str
    m: Model
    faults: Faults
    kinds: ConfigReconciler
    kube: Kube
    clock: FakeClock = field(default_factory=FakeClock)  # Consul KV's tombstones keep its time

    @property
    def plural(self) -> str:
        return self.kinds.plural

    def ref(self, name: str) -> ObjectRef:
        return ObjectRef(self.plural, "team-a", name)

    def resource(
        self, name: str, spec: dict[str, Any], *, reconciled: bool = False, stamp: int = 0
    ) -> Resource:
        status: dict[str, Any] = {}
        if reconciled:
            status = {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]}
        if stamp:
            status[STAMP_FIELD[self.backend]] = stamp
        return Resource(self.ref(name), "uid", 1, "1", spec, status, (), False)

    def under(self, path: str) -> dict[str, bytes]:
        return {k: v for k, v in self.m.values().items() if k.startswith(self.m.k(path))}

    def owned_by(self, owner: str) -> set[str]:
        layout = self.m.layout
        return {
            full for key, e in self.m.entries().items()
            if (full := layout.full_key_of_claim(key)) is not None and e.value == owner.encode()
        }

    def owner(self, name: str) -> str:
        return self.kinds.owner(self.ref(name))

    async def tombstones_expire(self, *names: str) -> None:
        """A release left exactly these resources' index tombstones; let their lifetime run out.

        etcd: their lease expires. Consul KV: the store's sweeper deletes them
        once its clock has passed their lifetime.
        """
        assert self.m.tombstones() == sorted(self.m.layout.index_key(self.owner(n)) for n in names)
        if isinstance(self.m, EtcdModel):
            self.m.expire_leases()
            return
        store = self.kinds.store
        assert isinstance(store, ConsulKVStore)
        self.clock.advance(store.sweeper.lifetime)
        assert await store.sweeper.sweep() == len(names)
        assert self.m.tombstones() == []


# The status field naming the store's stamp, written out (not read from the
# flavor) so that a renamed field fails here.
STAMP_FIELD = {"etcd": "revision", "consul": "modifyIndex"}
STORE = {"etcd": "etcd", "consul": "Consul KV"}


def make_rig(backend: str, faults: Faults | None = None, kube: Kube | None = None) -> Rig:
    faults = faults or Faults()
    kube = kube or Kube()
    kinds: ConfigReconciler
    if backend == "etcd":
        etcd = EtcdModel()
        kinds = EtcdConfigs(
            EtcdStore(FakeEtcdClient(etcd, faults)), kube, cluster="kubernetes", ownership_prefix="/tether/",
            expectations=Expectations(), source_index=SourceIndex(),
        )
        return Rig(backend, etcd, faults, kinds, kube)
    consul = ConsulModel()
    clock = FakeClock()
    store = ConsulKVStore(FakeConsulKV(consul, faults), clock=clock.now, wall=clock.time)
    kinds = ConsulConfigs(
        store, kube, cluster="kubernetes", ownership_prefix="tether/",
        expectations=Expectations(), source_index=SourceIndex(),
    )
    return Rig(backend, consul, faults, kinds, kube, clock)


@pytest.fixture(params=BACKENDS)
def rig(request: pytest.FixtureRequest) -> Rig:
    return make_rig(request.param)


def notes(out: Outcome) -> list[tuple[str, str, str]]:
    return [(n.type, n.reason, n.message) for n in out.notes]


# --------------------------------------------------------------------------- the happy path


async def test_reconciler_writes_repairs_and_releases(rig: Rig) -> None:
    k, m = rig.m.k, rig.m
    spec = {"prefix": k("app"), "data": {"a": "1", "b": "2"}}
    out = await rig.kinds.apply(rig.resource("cfg", spec))
    assert (out.ready, out.reason, out.retry) == ("True", "Reconciled", False)
    assert out.message == f"2 keys under {k('app')} in {STORE[rig.backend]}"
    assert out.fields == {"keys": 2, STAMP_FIELD[rig.backend]: m.stamp}
    assert notes(out) == [("Normal", "Written", "wrote 2 keys, deleted 0, in one transaction")]
    assert rig.under("app/") == {k("app/a"): b"1", k("app/b"): b"2"}
    assert rig.owned_by(rig.owner("cfg")) == {k("app/a"), k("app/b")}
    written = m.stamp

    # Nothing changed: no write, no event, the same stamp.
    out = await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True, stamp=written))
    assert out.notes == () and out.fields == {"keys": 2, STAMP_FIELD[rig.backend]: written}
    assert m.stamp == written

    m.put(k("app/a"), b"tampered")
    out = await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True, stamp=written))
    assert [(n.type, n.reason) for n in out.notes] == [("Warning", "DriftRepaired")]
    assert k("app/a") in out.notes[0].message and "tampered" not in out.notes[0].message
    assert m.values()[k("app/a")] == b"1" and out.fields[STAMP_FIELD[rig.backend]] == m.stamp

    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert out.released and out.message == f"deleted 2 keys from {STORE[rig.backend]}"
    assert notes(out) == [("Normal", "Deleted", out.message)]
    await rig.tombstones_expire("cfg")
    assert not any(key.startswith((k("app/"), m.layout.ownership_prefix)) for key in m.values())
    assert rig.kinds.expectations.tracked_count() == 0


async def test_a_spec_change_is_written_not_reported_as_drift(rig: Rig) -> None:
    k = rig.m.k
    await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"a": "1", "b": "2"}}))
    out = await rig.kinds.apply(
        rig.resource("cfg", {"prefix": k("app"), "data": {"a": "9"}}, reconciled=True, stamp=rig.m.stamp)
    )
    assert notes(out) == [("Normal", "Written", "wrote 1 key, deleted 1, in one transaction")]
    assert rig.under("app/") == {k("app/a"): b"9"}


async def test_without_prune_undeclared_keys_are_released(rig: Rig) -> None:
    k = rig.m.k
    await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"a": "1", "b": "2"}}))
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "prune": False, "data": {"a": "1"}}))
    released = "wrote 0 keys, deleted 0, released 1 (prune: false), in one transaction"
    assert notes(out) == [("Normal", "Written", released)]
    assert rig.under("app/") == {k("app/a"): b"1", k("app/b"): b"2"}
    assert rig.owned_by(rig.owner("cfg")) == {k("app/a")}


async def test_a_lost_status_still_reports_the_last_write(rig: Rig) -> None:
    spec = {"prefix": rig.m.k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    written = rig.m.stamp
    rig.m.put(rig.m.k("unrelated"), b"moves the store's stamp")
    out = await rig.kinds.apply(rig.resource("cfg", spec))  # no status at all
    assert out.ready == "True" and out.notes == ()
    assert out.fields == {"keys": 1, STAMP_FIELD[rig.backend]: written}


async def test_adopting_takes_ownership_and_says_so(rig: Rig) -> None:
    k = rig.m.k
    rig.m.put(k("app/legacy"), b"same")
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"legacy": "same"}}))
    assert out.reason == "Conflict" and "adopt: true" in out.message
    out = await rig.kinds.apply(
        rig.resource("cfg", {"prefix": k("app"), "adopt": True, "data": {"legacy": "same"}})
    )
    assert out.ready == "True"
    assert notes(out) == [
        ("Normal", "Written", "wrote 0 keys, deleted 0, took ownership of 1 key, in one transaction")
    ]
    assert rig.owned_by(rig.owner("cfg")) == {k("app/legacy")}


# --------------------------------------------------------------------------- conflicts and invalid specs


async def test_reconciler_conflict_writes_nothing_and_retries(rig: Rig) -> None:
    k = rig.m.k
    first = await rig.kinds.apply(rig.resource("first", {"prefix": k("app"), "data": {"a": "theirs"}}))
    assert first.ready == "True"
    before = rig.m.snapshot()
    out = await rig.kinds.apply(rig.resource("second", {"prefix": k("app"), "data": {"a": "mine", "b": "x"}}))
    assert (out.ready, out.reason, out.retry) == ("False", "Conflict", True)
    assert k("app/a") in out.message and f"{rig.kinds.kind} team-a/first" in out.message
    assert "theirs" not in out.message and "mine" not in out.message
    assert out.fields == {"keys": 0}
    assert rig.m.snapshot() == before
    # Only the first resource's keys are watched for drift.
    assert rig.kinds.expectations.tracked_count() == 1


async def test_reconciler_resolves_sources_in_order_and_reports_missing_ones(rig: Rig) -> None:
    k = rig.m.k
    spec = {
        "prefix": k("app"),
        "from": [{"configMapRef": {"name": "cm"}}, {"secretRef": {"name": "sec"}},
                 {"configMapRef": {"name": "maybe", "optional": True}}],
        "data": {"k": "from-data"},
    }
    out = await rig.kinds.apply(rig.resource("src", spec))
    assert (out.reason, out.retry) == ("InvalidSpec", False)
    assert out.message == "ConfigMap team-a/cm not found (set optional: true to ignore it)"
    ref = rig.ref("src")
    index = rig.kinds.sources
    assert index.dependents("configMap", "team-a", "cm") == [ref]
    assert index.dependents("secret", "team-a", "sec") == [ref]
    assert index.dependents("configMap", "team-a", "maybe") == [ref]
    assert index.dependents("configMap", "team-b", "cm") == []

    rig.kube.config_maps["cm"] = {"k": b"cm", "c": b"cm", "only-cm": b"1"}
    rig.kube.secrets["sec"] = {"c": b"hunter2-secret", "p": b"pw"}
    out = await rig.kinds.apply(rig.resource("src", spec))
    assert out.ready == "True"
    assert rig.under("app/") == {
        k("app/k"): b"from-data", k("app/c"): b"hunter2-secret", k("app/p"): b"pw", k("app/only-cm"): b"1",
    }
    everything = repr(out)
    assert "hunter2" not in everything and "pw'" not in everything

    rig.kinds.forget(ref)
    assert index.dependents("configMap", "team-a", "cm") == []


async def test_reconciler_rejects_keys_that_sources_cannot_give(rig: Rig) -> None:
    k = rig.m.k
    rig.kube.config_maps["cm"] = {"..": b"x"}
    spec = {"prefix": k("app"), "from": [{"configMapRef": {"name": "cm"}}]}
    out = await rig.kinds.apply(rig.resource("bad", spec))
    assert out.reason == "InvalidSpec" and "ConfigMap team-a/cm: key '..'" in out.message
    assert f"cannot be a {STORE[rig.backend]} key" in out.message
    out = await rig.kinds.apply(rig.resource("reserved", {"prefix": k("tether/x"), "data": {"a": "1"}}))
    assert out.reason == "InvalidSpec" and rig.m.layout.ownership_prefix in out.message
    assert (out.retry, rig.m.txns) == (False, 0)


async def test_each_kind_insists_on_its_key_shape() -> None:
    etcd, consul = make_rig("etcd"), make_rig("consul")
    out = await etcd.kinds.apply(etcd.resource("cfg", {"prefix": "app", "data": {"a": "1"}}))
    assert out.reason == "InvalidSpec" and "starting with '/'" in out.message
    out = await consul.kinds.apply(consul.resource("cfg", {"prefix": "/app", "data": {"a": "1"}}))
    assert out.reason == "InvalidSpec" and "without a leading '/'" in out.message
    assert etcd.m.txns == consul.m.txns == 0


async def test_a_value_too_large_for_the_store_is_invalid_and_never_echoed(rig: Rig) -> None:
    secret = "S3CR3T" * (rig.m.limits.max_value_bytes // 6 + 1)
    out = await rig.kinds.apply(rig.resource("big", {"prefix": rig.m.k("app"), "data": {"big": secret}}))
    assert (out.reason, out.retry) == ("InvalidSpec", False)
    assert rig.m.k("app/big") in out.message and "S3CR3T" not in out.message
    assert rig.m.txns == 0


# --------------------------------------------------------------------------- server limits and races


async def test_reconciler_learns_a_lower_server_transaction_limit(rig: Rig) -> None:
    rig = make_rig(rig.backend, Faults(max_ops=5))
    spec = {"prefix": rig.m.k("app"), "data": {f"k{i}": "v" for i in range(40)}}
    out = await rig.kinds.apply(rig.resource("big", spec))
    assert out.ready == "True" and len(rig.owned_by(rig.owner("big"))) == 40
    assert rig.kinds.store.limits.max_ops <= 5
    assert rig.faults.txn_sizes and max(rig.faults.txn_sizes) <= 5
    (note,) = out.notes
    assert note.message.startswith("wrote 40 keys, deleted 0, in ") and "ordered transactions" in note.message


async def test_reconciler_learns_a_lower_server_request_size(rig: Rig) -> None:
    rig = make_rig(rig.backend, Faults(max_request=64 * 1024))
    default = rig.kinds.store.limits.max_txn_bytes
    spec = {"prefix": rig.m.k("app"), "data": {f"k{i:02d}": "x" * 8192 for i in range(20)}}
    out = await rig.kinds.apply(rig.resource("big", spec))
    assert out.ready == "True", out.message
    assert rig.under("app/") == {rig.m.k(f"app/k{i:02d}"): b"x" * 8192 for i in range(20)}
    assert rig.kinds.store.limits.max_txn_bytes < default
    # The limit stays learnt: the next resource is chunked at once.
    sent = len(rig.faults.txn_sizes)
    spec2 = {"prefix": rig.m.k("two"), "data": {f"k{i:02d}": "y" * 8192 for i in range(20)}}
    assert (await rig.kinds.apply(rig.resource("two", spec2))).ready == "True"
    assert len(rig.faults.txn_sizes) - sent > 1


async def test_a_server_refusing_even_two_operations_is_rejected(rig: Rig) -> None:
    rig = make_rig(rig.backend, Faults(max_ops=1))
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": rig.m.k("app"), "data": {"a": "1"}}))
    assert (out.ready, out.reason, out.retry) == ("False", "BackendRejected", True)
    assert "at least 2" in out.message and rig.m.txns == 0


async def test_reconciler_gives_up_after_repeated_races(rig: Rig) -> None:
    k = rig.m.k
    rig.faults.before_txn.append(lambda: rig.m.put(k("app/a"), b"racing writer"))
    rig.m.put(k("app/a"), b"x")
    out = await rig.kinds.apply(rig.resource("race", {"prefix": k("app"), "adopt": True, "data": {"a": "1"}}))
    assert (out.reason, out.retry) == ("Conflict", True) and "kept changing" in out.message
    assert rig.m.values()[k("app/a")] == b"racing writer" and rig.m.txns == 0


async def test_one_race_is_absorbed_by_reading_again(rig: Rig) -> None:
    k = rig.m.k
    raced: list[bool] = []

    def once() -> None:
        if not raced:
            raced.append(True)
            rig.m.put(k("app/a"), b"racing writer")

    rig.faults.before_txn.append(once)
    rig.m.put(k("app/a"), b"x")
    out = await rig.kinds.apply(rig.resource("race", {"prefix": k("app"), "adopt": True, "data": {"a": "1"}}))
    assert out.ready == "True" and rig.m.values()[k("app/a")] == b"1"


# --------------------------------------------------------------------------- failing closed


async def test_an_unreachable_store_is_retried_and_nothing_is_written(rig: Rig) -> None:
    rig.faults.unavailable = True
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": rig.m.k("app"), "data": {"a": "1"}}))
    assert (out.ready, out.reason, out.retry) == ("False", "BackendUnavailable", True)
    assert out.message.startswith(f"cannot write to {STORE[rig.backend]}: ")
    assert rig.m.txns == 0


async def test_no_delete_after_a_failed_read(rig: Rig) -> None:
    k = rig.m.k
    spec = {"prefix": k("app"), "data": {"a": "1", "b": "2"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    before = rig.m.snapshot()
    # The data keys cannot be listed (the claims and the index still can).
    rig.faults.fail_reads_under = k("app/")
    out = await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"a": "1"}}))
    assert (out.reason, out.retry) == ("BackendUnavailable", True)
    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert not out.released and out.reason == "BackendUnavailable"
    assert out.message.endswith("the finalizer stays until it can")
    assert rig.m.snapshot() == before


# --------------------------------------------------------------------------- release


async def test_orphan_release_keeps_the_data_and_drops_ownership(rig: Rig) -> None:
    k = rig.m.k
    spec = {"prefix": k("app"), "deletionPolicy": "Orphan", "data": {"a": "1", "b": "2"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert out.released and out.message == (
        f"released 2 keys in {STORE[rig.backend]} (deletionPolicy Orphan: they stay, no longer owned)"
    )
    assert [n.reason for n in out.notes] == ["Orphaned"]
    assert rig.under("app/") == {k("app/a"): b"1", k("app/b"): b"2"}
    await rig.tombstones_expire("cfg")
    assert not any(key.startswith(rig.m.layout.ownership_prefix) for key in rig.m.values())


async def test_release_of_an_invalid_spec_still_finds_the_keys_through_the_index(rig: Rig) -> None:
    k = rig.m.k
    await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"a": "1"}}))
    rig.m.put(k("app/foreign"), b"not ours")
    broken = {"prefix": k("app"), "data": {"../x": "1"}}
    out = await rig.kinds.release(rig.resource("cfg", broken))
    assert out.released and "deleted 1 key" in out.message
    assert rig.under("app/") == {k("app/foreign"): b"not ours"}
    await rig.tombstones_expire("cfg")
    assert not any(key.startswith(rig.m.layout.ownership_prefix) for key in rig.m.values())


async def test_release_of_a_resource_that_wrote_nothing_posts_no_event(rig: Rig) -> None:
    out = await rig.kinds.release(rig.resource("cfg", {"prefix": rig.m.k("app"), "data": {"a": "1"}}))
    # One write: the tombstone that fences off a create still in flight.
    assert out.released and out.notes == () and rig.m.txns == 1
    await rig.tombstones_expire("cfg")


async def test_release_never_deletes_another_resources_keys(rig: Rig) -> None:
    k = rig.m.k
    await rig.kinds.apply(rig.resource("theirs", {"prefix": k("app/t"), "data": {"x": "1"}}))
    await rig.kinds.apply(rig.resource("mine", {"prefix": k("app"), "data": {"a": "1"}}))
    out = await rig.kinds.release(rig.resource("mine", {"prefix": k("app"), "data": {"a": "1"}}))
    assert out.released
    assert rig.under("app/") == {k("app/t/x"): b"1"}
    assert rig.owned_by(rig.owner("theirs")) == {k("app/t/x")}


# --------------------------------------------------------------------------- drift bookkeeping


async def test_drift_detection_ignores_own_writes_and_sees_everything_else(rig: Rig) -> None:
    k, layout = rig.m.k, rig.m.layout
    await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"a": "1"}}))
    ref = rig.ref("cfg")
    owner = rig.owner("cfg")
    claim, index = layout.claim_key(k("app/a")), layout.index_key(owner)
    expectations = rig.kinds.expectations
    assert expectations.tracked_count() == 1
    assert set(expectations.managed_keys()) == {k("app/a"), claim, index}
    own_writes = [Change(k("app/a"), b"1"), Change(claim, owner.encode())]
    assert expectations.drifted(own_writes) == set()
    assert expectations.drifted([Change(index, rig.m.values()[index])]) == set()
    assert expectations.drifted([Change(k("app/a"), b"2")]) == {ref}
    assert expectations.drifted([Change(k("app/a"), None)]) == {ref}
    assert expectations.drifted([Change(claim, None)]) == {ref}
    assert expectations.drifted([Change(claim, OTHER.encode())]) == {ref}
    assert expectations.drifted([Change(index, None)]) == {ref}
    assert expectations.drifted([Change(k("app/unrelated"), b"x"), Change(k("other"), None)]) == set()
    rig.kinds.forget(ref)
    assert expectations.drifted([Change(k("app/a"), None)]) == set() and expectations.tracked_count() == 0


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("claim", "restored ownership records of {key}"),
        ("index", "restored Tether's ownership index for this resource"),
        ("data", "restored 1 key changed or deleted outside Kubernetes: {key}"),
    ],
)
async def test_repairs_of_tethers_own_records_are_drift_too(rig: Rig, damage: str, message: str) -> None:
    k, layout = rig.m.k, rig.m.layout
    spec = {"prefix": k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    targets = {"claim": layout.claim_key(k("app/a")), "index": layout.index_key(rig.owner("cfg"))}
    target = targets.get(damage, k("app/a"))
    before = rig.m.values()[target]
    rig.m.delete(target)
    out = await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True, stamp=rig.m.stamp))
    assert (out.ready, out.reason) == ("True", "Reconciled"), out.message
    assert notes(out) == [("Warning", "DriftRepaired", message.format(key=k("app/a")))]
    assert rig.m.values()[target] == before


async def test_a_deleted_claim_is_restored_from_the_index_on_a_spec_change_too(rig: Rig) -> None:
    """The index record still names the owner (issue 14): a lost claim is repaired, not a conflict.

    The index never lists a key before its claim commits (planner.steps), so
    it is proof enough, in this process or after a restart.
    """
    k = rig.m.k
    spec = {"prefix": k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    rig.m.delete(rig.m.layout.claim_key(k("app/a")))
    changed = {"prefix": k("app"), "data": {"a": "2"}}
    out = await rig.kinds.apply(rig.resource("cfg", changed, reconciled=True, stamp=rig.m.stamp))
    assert out.ready == "True", out.message
    assert rig.m.values()[k("app/a")] == b"2"
    assert rig.owned_by(rig.owner("cfg")) == {k("app/a")}


async def test_a_deleted_claim_is_restored_by_a_restarted_operator(rig: Rig) -> None:
    k = rig.m.k
    spec = {"prefix": k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    rig.m.delete(rig.m.layout.claim_key(k("app/a")))
    restarted = make_rig(rig.backend)
    restarted.m = rig.m
    restarted.kinds.store.client.model = rig.m  # type: ignore[attr-defined]
    out = await restarted.kinds.apply(restarted.resource("cfg", spec, reconciled=True, stamp=rig.m.stamp))
    assert out.ready == "True", out.message
    assert restarted.owned_by(restarted.owner("cfg")) == {k("app/a")}


async def test_a_failed_converge_is_no_proof_of_ownership(rig: Rig) -> None:
    """A source change that failed to write, then a lost status patch, must not adopt a foreign key."""
    k = rig.m.k
    spec = {"prefix": k("app"), "from": [{"configMapRef": {"name": "cm"}}]}
    rig.kube.config_maps["cm"] = {"a": b"1"}
    assert (await rig.kinds.apply(rig.resource("cfg", spec))).ready == "True"
    rig.m.put(k("app/b"), b"someone else's")
    rig.kube.config_maps["cm"] = {"a": b"1", "b": b"2"}  # same generation: a source changed
    rig.faults.unavailable = True
    out = await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True, stamp=rig.m.stamp))
    assert out.reason == "BackendUnavailable"
    rig.faults.unavailable = False
    # The Ready=False patch was lost: the stored status still says Ready for this generation.
    out = await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True, stamp=rig.m.stamp))
    assert out.reason == "Conflict" and k("app/b") in out.message
    assert rig.m.values()[k("app/b")] == b"someone else's"


async def test_a_claim_taken_by_another_owner_is_never_taken_back(rig: Rig) -> None:
    k = rig.m.k
    spec = {"prefix": k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    claim = rig.m.layout.claim_key(k("app/a"))
    rig.m.put(claim, OTHER.encode())
    out = await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True, stamp=rig.m.stamp))
    assert out.reason == "Conflict" and "team-b/other" in out.message
    assert rig.m.values()[claim] == OTHER.encode()


async def test_a_conflicting_or_invalid_resource_is_not_watched(rig: Rig) -> None:
    k = rig.m.k
    await rig.kinds.apply(rig.resource("cfg", {"prefix": k("app"), "data": {"a": "1"}}))
    expectations = rig.kinds.expectations
    await rig.kinds.apply(rig.resource("cfg", {"prefix": k("tether/x"), "data": {"a": "1"}}))
    assert expectations.tracked_count() == 0
    assert expectations.known() == [rig.ref("cfg")], "still re-checked after a watch loses events"


# ------------------------------------------------ a late transaction after a release (issue 12)
#
# etcd may apply a transaction long after its sender gave up or died: in a
# full HA fault run (seed 20261201) a create sent by an operator that was then
# SIGKILLed was applied 33 s later, after the next operator had released the
# deleted resource and found nothing. Its keys, claims and index record stayed
# behind, owned by a resource that no longer existed. A release now leaves a
# tombstone (on a lease) in the index record's place, which fails the late
# create's guard ("no index record yet").


def _etcd_rig() -> tuple[Rig, list[tuple[list[Any], list[Any]]]]:
    """An etcd rig whose next transaction is kept in flight: captured, not applied, outcome unknown."""
    rig = make_rig("etcd")
    client = rig.kinds.store.client  # type: ignore[attr-defined]
    held: list[tuple[list[Any], list[Any]]] = []
    sent: list[int] = []
    real_txn = client.txn

    async def hold_once(compares: Any, success: Any, failure: Any = ()) -> Any:
        sent.append(1)
        if len(sent) == 1:
            held.append((list(compares), list(success)))
            raise EtcdUnavailable("etcd: DEADLINE_EXCEEDED (may or may not have been applied)")
        return await real_txn(compares, success, failure)

    client.txn = hold_once
    return rig, held


def _lands(rig: Rig, txn: tuple[list[Any], list[Any]]) -> bool:
    """The held transaction reaches etcd now; whether its guards held."""
    assert isinstance(rig.m, EtcdModel)
    return rig.m.txn(*txn).succeeded


async def test_a_create_that_lands_after_the_release_fails_its_guard() -> None:
    rig, held = _etcd_rig()
    spec = {"prefix": rig.m.k("app"), "data": {"a": "1", "b": "2"}}
    out = await rig.kinds.apply(rig.resource("cfg", spec))
    assert out.reason == "BackendUnavailable" and len(held) == 1 and rig.m.txns == 0
    # Deleted before any retry: the release finds nothing to remove.
    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert out.released and out.notes == ()
    assert not _lands(rig, held[0])
    assert rig.under("app/") == {} and rig.owned_by(rig.owner("cfg")) == set()
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}


async def test_a_create_repeated_then_released_cannot_be_resurrected_by_the_first_attempt() -> None:
    rig, held = _etcd_rig()
    spec = {"prefix": rig.m.k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    out = await rig.kinds.apply(rig.resource("cfg", spec))  # re-read, not applied: written again
    assert out.ready == "True" and rig.under("app/") == {rig.m.k("app/a"): b"1"}
    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert out.released and "deleted 1 key" in out.message
    assert not _lands(rig, held[0])
    assert rig.under("app/") == {} and rig.owned_by(rig.owner("cfg")) == set()
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}


async def test_a_create_that_lands_during_the_release_is_pruned_by_it() -> None:
    rig, held = _etcd_rig()
    spec = {"prefix": rig.m.k("app"), "data": {"a": "1", "b": "2"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    # The release reads (nothing), then the late create lands just before its
    # tombstone: the tombstone's guard fails, the release reads again and prunes.
    rig.faults.before_txn.append(lambda: held and _lands(rig, held.pop()) and None)
    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert out.released and out.message == "deleted 2 keys from etcd"
    assert rig.under("app/") == {} and rig.owned_by(rig.owner("cfg")) == set()
    await rig.tombstones_expire("cfg")
    assert rig.m.values() == {}


async def test_a_tombstone_is_no_record_and_a_recreated_resource_writes_over_it() -> None:
    rig = make_rig("etcd")
    spec = {"prefix": rig.m.k("app"), "data": {"a": "1"}}
    await rig.kinds.apply(rig.resource("cfg", spec))
    await rig.kinds.release(rig.resource("cfg", spec))
    assert isinstance(rig.m, EtcdModel) and rig.m.tombstones() == [rig.m.layout.index_key(rig.owner("cfg"))]
    # Releasing again (a retried release) writes nothing more.
    before = rig.m.txns
    out = await rig.kinds.release(rig.resource("cfg", spec))
    assert out.released and rig.m.txns == before
    # Created again under the same name: the tombstone is guarded and replaced,
    # no longer on the lease (it stays when the lease runs out).
    out = await rig.kinds.apply(rig.resource("cfg", spec))
    assert out.ready == "True" and rig.m.tombstones() == []
    rig.m.expire_leases()
    assert rig.under("app/") == {rig.m.k("app/a"): b"1"}
    assert rig.owned_by(rig.owner("cfg")) == {rig.m.k("app/a")}
    # Nothing changed: nothing written.
    before = rig.m.txns
    await rig.kinds.apply(rig.resource("cfg", spec, reconciled=True))
    assert rig.m.txns == before
