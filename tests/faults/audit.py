"""The end-of-run audit: Consul and etcd against the resources, exactly.

Expectations are computed here, independently of the operator's code, from the
contract (DESIGN.md §1) and the resources as Kubernetes holds them:

- every declared object present and correct — a ConsulService's registration
  (ID, name, address, port, tags, meta with the ownership markers, checks); an
  EtcdConfig's keys (``data`` over its ConfigMaps) with their ownership claims
  and index record;
- no owned object that is not declared — registrations carrying this run's
  ownership meta under an ID no resource declares (a deleted resource, an ID a
  rename left behind), keys under the run's prefixes, claims and index records
  that no resource declares;
- keys planted behind Tether's back untouched;
- every resource ``Ready=True`` at its generation, or ``Ready=False`` with the
  reason and message its (deliberately) bad spec calls for; none stuck with a
  ``deletionTimestamp``;
- and, with the workload's model, Kubernetes holding exactly what the workload
  declared (a lost or resurrected resource, a lost update).

Each finding is an :class:`Anomaly`; a converged, correct system has none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from faultkit import CLUSTER, OWNERSHIP_PREFIX, Kube, log
from generator import BAD_URL, FOREIGN_MARK, Model, service_id

from tether_dev.harness.consul import Consul
from tether_dev.harness.etcd import Etcd
from tether_dev.harness.kube import condition, is_ready

OWNERSHIP_META = ("external-source", "tether-cluster", "tether-namespace", "tether-name")
#: Fields the API server fills in from the schema's defaults.
SCHEMA_DEFAULTS = {"deletionPolicy": "Delete", "prune": True, "adopt": False}


def without_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` without the values the API server fills in from the schema's defaults."""
    out = {k: v for k, v in spec.items() if not (k in SCHEMA_DEFAULTS and v == SCHEMA_DEFAULTS[k])}
    if "from" in out:
        out["from"] = [
            {
                kind: {k: v for k, v in ref.items() if not (k == "optional" and v is False)}
                for kind, ref in entry.items()
            }
            for entry in out["from"]
        ]
    return out


#: Anomaly categories that are known operator bugs, reported but not counted.
#: Each has a focused test that reproduces it deterministically and is marked
#: ``xfail(strict=True)``: when the bug is fixed that test passes, fails as
#: XPASS, and its entry here must go, so the audit counts the category again.
KNOWN_BUGS: dict[str, str] = {}


@dataclass(frozen=True)
class Anomaly:
    category: str
    subject: str
    detail: str

    @property
    def known(self) -> bool:
        return self.category in KNOWN_BUGS

    def __str__(self) -> str:
        return f"[{self.category}{' (known bug)' if self.known else ''}] {self.subject}: {self.detail}"


def split(anomalies: list[Anomaly]) -> tuple[list[Anomaly], list[Anomaly]]:
    """(anomalies that count, those that are known bugs)."""
    return [a for a in anomalies if not a.known], [a for a in anomalies if a.known]


def full_key(prefix: str, relative: str) -> str:
    return prefix.rstrip("/") + "/" + relative


def owner_id(namespace: str, name: str) -> str:
    return f"{CLUSTER}/{namespace}/{name}"


def ownership_meta(namespace: str, name: str) -> dict[str, str]:
    return {
        "external-source": "kubernetes",
        "tether-cluster": CLUSTER,
        "tether-namespace": namespace,
        "tether-name": name,
    }


#: What an EtcdConfig's index record holds after its release (on a lease).
INDEX_TOMBSTONE = '{"keys":[],"tombstone":true}'


def _ident(obj: Mapping[str, Any]) -> str:
    kind = "cs" if obj.get("kind") == "ConsulService" else "ec"
    return f"{kind} {obj['metadata']['namespace']}/{obj['metadata']['name']}"


class Auditor:
    """Reads the three systems once and lists every anomaly."""

    def __init__(self, kube: Kube, consul: Consul, etcd: Etcd, model: Model) -> None:
        self.kube = kube
        self.consul = consul
        self.etcd = etcd
        self.model = model

    # ---------------------------------------------------------------- entry
    def audit(self) -> list[Anomaly]:
        namespaces = set(self.model.namespaces)
        found: list[Anomaly] = []
        css = self.kube.list("cs", namespaces)
        ecs = self.kube.list("ec", namespaces)
        config_maps = {
            (ns, cm): self.kube.config_map(ns, cm)
            for ns in namespaces
            for cm in {
                str((f.get("configMapRef") or {}).get("name"))
                for e in ecs
                if e["metadata"]["namespace"] == ns
                for f in e["spec"].get("from") or []
                if f.get("configMapRef")
            }
        }
        found += self._kubernetes(css, ecs, config_maps)
        found += self._consul(css)
        found += self._etcd(ecs, config_maps)
        found += self._model(css + ecs)
        return found

    # ------------------------------------------------------------ Kubernetes
    @staticmethod
    def _cs_invalid(obj: Mapping[str, Any]) -> str | None:
        for check in obj["spec"].get("checks") or []:
            if check.get("http") == BAD_URL:
                return "InvalidSpec"
        return None

    @staticmethod
    def _missing_sources(obj: Mapping[str, Any], config_maps: Mapping[tuple[str, str], Any]) -> list[str]:
        ns = obj["metadata"]["namespace"]
        return [
            str(ref["name"])
            for f in obj["spec"].get("from") or []
            if (ref := f.get("configMapRef"))
            and not ref.get("optional")
            and config_maps.get((ns, str(ref["name"]))) is None
        ]

    def _kubernetes(
        self, css: list[dict[str, Any]], ecs: list[dict[str, Any]], config_maps: Mapping[tuple[str, str], Any]
    ) -> list[Anomaly]:
        found = []
        for obj in css + ecs:
            meta, status = obj["metadata"], obj.get("status") or {}
            subject = _ident(obj)
            cond = condition(obj)
            said = (
                f"Ready={cond.get('status')} {cond.get('reason')}: {cond.get('message')!r} "
                f"(observedGeneration {status.get('observedGeneration')}, "
                f"generation {meta.get('generation')})"
            )
            if meta.get("deletionTimestamp"):
                found.append(
                    Anomaly(
                        "stuck-deleting",
                        subject,
                        f"deletionTimestamp {meta['deletionTimestamp']}, "
                        f"finalizers {meta.get('finalizers')}; {said}",
                    )
                )
                continue
            if obj["kind"] == "ConsulService":
                bad = self._cs_invalid(obj)
                missing: list[str] = []
            else:
                missing = self._missing_sources(obj, config_maps)
                bad = "missing ConfigMap" if missing else None
            at_generation = status.get("observedGeneration") == meta.get("generation")
            if bad:
                # Deliberately bad: must say so (not Ready, at this generation, with a reason).
                ok = (
                    cond.get("status") == "False"
                    and at_generation
                    and cond.get("reason") not in (None, "Reconciled", "Reconciling")
                )
                if bad == "InvalidSpec":
                    ok = ok and cond.get("reason") == "InvalidSpec"
                if missing:
                    ok = ok and all(m in str(cond.get("message")) for m in missing)
                if not ok:
                    found.append(
                        Anomaly(
                            "unexplained",
                            subject,
                            f"expected a condition naming {bad} {missing or ''}; {said}",
                        )
                    )
                continue
            if not is_ready(obj):
                found.append(Anomaly("not-ready", subject, said))
                continue
            if obj["kind"] == "ConsulService":
                expected_id = service_id(meta["namespace"], meta["name"], obj["spec"])
                if status.get("serviceID") != expected_id:
                    found.append(
                        Anomaly(
                            "wrong-status",
                            subject,
                            f"status.serviceID {status.get('serviceID')!r}, expected {expected_id!r}",
                        )
                    )
                # A TTL check nobody updates is critical; no checks at all is passing.
                ttl = any(c.get("ttl") for c in obj["spec"].get("checks") or [])
                health = "critical" if ttl else "passing"
                healthy = "True" if health == "passing" else "False"
                have = (status.get("health"), condition(obj, "Healthy").get("status"))
                if have != (health, healthy):
                    found.append(
                        Anomaly(
                            "wrong-status",
                            subject,
                            f"health {have[0]!r} and Healthy={have[1]}, "
                            f"expected {health!r} and Healthy={healthy}",
                        )
                    )
            else:
                want = len(self._desired_keys(obj, config_maps))
                if status.get("keys") != want:
                    found.append(
                        Anomaly("wrong-status", subject, f"status.keys {status.get('keys')}, expected {want}")
                    )
        return found

    # ---------------------------------------------------------------- Consul
    def _consul(self, css: list[dict[str, Any]]) -> list[Anomaly]:
        found = []
        services = self.consul.services()
        checks = self.consul.checks()
        namespaces = set(self.model.namespaces)
        expected: dict[str, dict[str, Any]] = {}
        for obj in css:
            if obj["metadata"].get("deletionTimestamp") or self._cs_invalid(obj):
                continue
            meta, spec = obj["metadata"], obj["spec"]
            sid = service_id(meta["namespace"], meta["name"], spec)
            expected[sid] = obj
            svc = services.get(sid)
            subject = f"{_ident(obj)} (Consul ID {sid})"
            if svc is None:
                found.append(Anomaly("missing", subject, "not registered in Consul"))
                continue
            want = {
                "Service": spec.get("name") or meta["name"],
                "Address": spec.get("address", ""),
                "Port": spec["port"],
                "Tags": sorted(spec.get("tags") or []),
                "Meta": {**(spec.get("meta") or {}), **ownership_meta(meta["namespace"], meta["name"])},
            }
            have = {
                "Service": svc.get("Service"),
                "Address": svc.get("Address", ""),
                "Port": svc.get("Port"),
                "Tags": sorted(svc.get("Tags") or []),
                "Meta": dict(svc.get("Meta") or {}),
            }
            for field, value in want.items():
                if have[field] != value:
                    found.append(Anomaly("wrong", subject, f"{field} is {have[field]!r}, expected {value!r}"))
            want_checks = sorted(str(c["name"]) for c in spec.get("checks") or [])
            have_checks = sorted(str(c.get("Name")) for c in checks.values() if c.get("ServiceID") == sid)
            if want_checks != have_checks:
                found.append(Anomaly("wrong", subject, f"checks {have_checks}, expected {want_checks}"))
            # Check IDs are agent-wide: each of ours is <service ID>/<name>, on our service.
            for name in want_checks:
                check = checks.get(f"{sid}/{name}")
                if check is not None and check.get("ServiceID") != sid:
                    found.append(Anomaly(
                        "check-ownership", subject,
                        f"check {sid}/{name} belongs to {check.get('ServiceID')!r}",
                    ))
        # No check of another service under a Tether service's check-ID space
        # (registering would have moved it onto ours; a foreign one means a takeover).
        for cid, check in checks.items():
            owner_sid, sep, _ = cid.partition("/")
            if sep and owner_sid in expected and check.get("ServiceID") not in (owner_sid, None):
                found.append(Anomaly(
                    "check-ownership", f"Consul check {cid}",
                    f"in {owner_sid}'s check-ID space but on service {check.get('ServiceID')!r}",
                ))
        orphan_ok = self.model.orphan_ids()
        for sid, svc in services.items():
            meta = svc.get("Meta") or {}
            ns, name = meta.get("tether-namespace"), meta.get("tether-name")
            ours = ns in namespaces or any(sid.startswith(f"{n}-") for n in namespaces)
            if not ours or sid in expected:
                continue
            if sid in orphan_ok:
                # Left on purpose by deletionPolicy: Orphan, and released: no
                # ownership meta, so that nothing of Tether's finds it again.
                if meta.get("tether-namespace") or meta.get("tether-name"):
                    found.append(Anomaly(
                        "orphan-still-owned", f"Consul service {sid}",
                        f"left by deletionPolicy: Orphan but still claimed by {ns}/{name}",
                    ))
                continue
            owner = f"{ns}/{name}" if ns else "no ownership meta"
            live = any(
                o["metadata"]["namespace"] == ns
                and o["metadata"]["name"] == name
                and not o["metadata"].get("deletionTimestamp")
                for o in css
            )
            if live:
                found.append(
                    Anomaly(
                        "stale-registration",
                        f"Consul service {sid}",
                        f"owned by {owner}, which declares another ID (a duplicate)",
                    )
                )
            else:
                found.append(
                    Anomaly(
                        "orphan", f"Consul service {sid}", f"owned by {owner}: its resource is gone or going"
                    )
                )
        return found

    # ------------------------------------------------------------------ etcd
    def _desired_keys(
        self, obj: Mapping[str, Any], config_maps: Mapping[tuple[str, str], Any]
    ) -> dict[str, str]:
        """Full key → value, by the contract: ``from`` in order, then ``data`` over all."""
        ns, spec = obj["metadata"]["namespace"], obj["spec"]
        merged: dict[str, str] = {}
        for f in spec.get("from") or []:
            ref = f.get("configMapRef")
            if ref:
                merged.update(config_maps.get((ns, str(ref["name"]))) or {})
        merged.update(spec.get("data") or {})
        return {full_key(spec["prefix"], rel): value for rel, value in merged.items()}

    def _etcd(self, ecs: list[dict[str, Any]], config_maps: Mapping[tuple[str, str], Any]) -> list[Anomaly]:
        found = []
        root = self.model.root + "/"
        _, ranged = self.etcd.range(root)
        data = {k: v for k, (v, _) in ranged.items()}
        claims = self.etcd.keys(f"{OWNERSHIP_PREFIX}keys{root}")
        indexes: dict[str, str] = {}
        for ns in self.model.namespaces:
            indexes.update(self.etcd.keys(f"{OWNERSHIP_PREFIX}owners/{CLUSTER}/{ns}/"))
        # A released resource's record becomes a tombstone that lists nothing and
        # expires with its lease (it fails the guard of a create etcd applies
        # late): it owns nothing, so it is no orphan. Written out here, not
        # imported, so that the audit checks the operator rather than echoes it.
        indexes = {k: v for k, v in indexes.items() if v != INDEX_TOMBSTONE}

        expected_data: dict[str, str] = {}
        expected_claims: dict[str, str] = {}
        expected_index: dict[str, set[str]] = {}
        for obj in ecs:
            meta = obj["metadata"]
            if meta.get("deletionTimestamp") or self._missing_sources(obj, config_maps):
                continue
            owner = owner_id(meta["namespace"], meta["name"])
            desired = self._desired_keys(obj, config_maps)
            expected_data.update(desired)
            expected_claims.update({k: owner for k in desired})
            expected_index[f"{OWNERSHIP_PREFIX}owners/{owner}"] = set(desired)
            # status.revision is "the etcd revision of the last write Tether made for
            # this resource": no key of it may have been written later than that.
            latest = max((ranged[k][1] for k in desired if k in ranged), default=0)
            if int((obj.get("status") or {}).get("revision") or 0) < latest:
                found.append(
                    Anomaly(
                        "wrong-status",
                        _ident(obj),
                        f"status.revision {(obj.get('status') or {}).get('revision')} is older than "
                        f"its newest key (mod_revision {latest})",
                    )
                )
            subject = _ident(obj)
            wrong = sorted(k for k, v in desired.items() if k in data and data[k] != v)
            absent = sorted(k for k in desired if k not in data)
            if absent:
                found.append(
                    Anomaly("missing", subject, f"{len(absent)} of {len(desired)} keys absent: {absent[:5]}")
                )
            if wrong:
                found.append(Anomaly("wrong", subject, f"{len(wrong)} keys hold other values: {wrong[:5]}"))
            unclaimed = sorted(k for k in desired if claims.get(f"{OWNERSHIP_PREFIX}keys{k}") != owner)
            if unclaimed:
                found.append(
                    Anomaly(
                        "ownership", subject, f"{len(unclaimed)} keys not claimed by {owner}: {unclaimed[:5]}"
                    )
                )
            index_key = f"{OWNERSHIP_PREFIX}owners/{owner}"
            listed = _index_keys(indexes.get(index_key))
            if listed != set(desired):
                found.append(
                    Anomaly(
                        "ownership",
                        subject,
                        f"index record lists {len(listed)} keys, {len(listed - set(desired))} not declared "
                        f"({sorted(listed - set(desired))[:3]}), {len(set(desired) - listed)} missing",
                    )
                )

        orphan_prefixes = tuple(p.rstrip("/") + "/" for p in self.model.orphan_prefixes())
        for key in sorted(data):
            if key in expected_data:
                continue
            if key in self.model.foreign:
                continue
            if key.startswith(orphan_prefixes) and FOREIGN_MARK not in key:
                continue  # left on purpose by deletionPolicy: Orphan
            found.append(Anomaly("orphan", f"etcd key {key}", "no resource declares it"))
        for key, value in sorted(self.model.foreign.items()):
            if data.get(key) != value:
                found.append(
                    Anomaly(
                        "foreign-touched",
                        f"etcd key {key}",
                        f"a key Tether does not own was changed: {data.get(key)!r}, was {value!r}",
                    )
                )
        for claim, owner in sorted(claims.items()):
            key = claim[len(f"{OWNERSHIP_PREFIX}keys") :]
            if expected_claims.get(key) != owner:
                found.append(
                    Anomaly(
                        "orphan",
                        f"etcd claim {claim}",
                        f"claims {key} for {owner}, expected {expected_claims.get(key)}",
                    )
                )
        for index_key in sorted(set(indexes) - set(expected_index)):
            found.append(
                Anomaly(
                    "orphan",
                    f"etcd index {index_key}",
                    f"ownership record of a resource that declares nothing "
                    f"({len(_index_keys(indexes[index_key]))} keys)",
                )
            )
        return found

    # ----------------------------------------------------------------- model
    def _model(self, objs: list[dict[str, Any]]) -> list[Anomaly]:
        found = []
        by_key = {
            (
                "cs" if o["kind"] == "ConsulService" else "ec",
                o["metadata"]["namespace"],
                o["metadata"]["name"],
            ): o
            for o in objs
        }
        with self.model.lock:
            decls = list(self.model.decls.values())
        for decl in decls:
            obj = by_key.pop(decl.key, None)
            if decl.deleted:
                if obj is not None and not obj["metadata"].get("deletionTimestamp"):
                    found.append(Anomaly("lost-delete", str(decl), "deleted by the workload, still present"))
                continue
            if obj is None:
                found.append(Anomaly("lost-resource", str(decl), "declared by the workload, absent"))
                continue
            have = without_defaults(obj["spec"])
            if have != without_defaults(decl.spec):
                found.append(
                    Anomaly(
                        "lost-update",
                        str(decl),
                        f"spec {json.dumps(have, sort_keys=True)[:300]}, "
                        f"workload declared {json.dumps(decl.spec, sort_keys=True)[:300]}",
                    )
                )
        for key in by_key:
            found.append(Anomaly("unknown-resource", " ".join(key), "not created by the workload"))
        return found


def _index_keys(raw: str | None) -> set[str]:
    if not raw:
        return set()
    try:
        body = json.loads(raw)
    except ValueError:
        return {"<unreadable index record>"}
    return set(body.get("keys") or []) if isinstance(body, dict) else {"<unreadable index record>"}


def converge(auditor: Auditor, *, timeout: float, interval: float = 3.0) -> tuple[list[Anomaly], float]:
    """Audit until clean or ``timeout``; return the last findings and the seconds it took.

    Faults have stopped when this runs: whatever is still wrong at the deadline
    is an anomaly, not a transient.
    """
    started = time.monotonic()
    deadline = started + timeout
    anomalies: list[Anomaly] = []
    while True:
        try:
            anomalies = auditor.audit()
        except Exception as exc:  # a backend still restarting: try again until the deadline
            anomalies = [Anomaly("audit-error", "audit", repr(exc)[:300])]
        counted, known = split(anomalies)
        if not counted or time.monotonic() >= deadline:
            break
        time.sleep(interval)
    took = time.monotonic() - started
    log(
        f"audit: {len(counted)} anomalies after {took:.1f} s"
        + (f" (+{len(known)} known bugs)" if known else "")
    )
    return anomalies, took
