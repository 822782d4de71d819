"""A seeded stream of creates, updates and deletes, and the model of what it declared.

The generator draws every decision from one ``random.Random``: which kind, which
resource, which field changes, which value. Decisions depend only on earlier
decisions, never on timing, so a seed replays the same sequence of operations
(the fault schedule is seeded separately, see ``test_faults_random``).

The :class:`Model` is the workload's own record of what it asked Kubernetes to
hold. The auditor compares the backends against the resources in Kubernetes,
and Kubernetes against the model, so a write lost anywhere shows up.

Operations go through the Kubernetes client with bounded retries, as a careful
user or CI pipeline would while the API server restarts. An operation whose
outcome stays unknown (retries exhausted) is *resynchronised*: the model takes
whatever Kubernetes then holds, and the report counts it as uncertain.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from faultkit import OWNERSHIP_PREFIX, Kube, log
from kubernetes.client.exceptions import ApiException

from tether_dev.harness.etcd import Etcd

TAGS = ("blue", "green", "canary", "v1", "v2", "v3", "edge", "internal", "primary", "replica")
META_KEYS = ("team", "tier", "owner", "version", "zone")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")
SERVICE_NAMES = ("web", "api", "cache", "db", "queue")
#: The ConfigMaps each namespace holds for EtcdConfig ``from`` references.
CONFIG_MAPS = ("src-0", "src-1")
#: A check URL the schema lets through but the operator must call InvalidSpec.
BAD_URL = "not a url"
#: The relative-key prefix of keys written behind Tether's back; the generator
#: never declares such a key, so they must survive every prune, move and delete.
FOREIGN_MARK = "zz-foreign-"


@dataclass
class Decl:
    """One resource as the workload declared it."""

    kind: str  # "cs" | "ec"
    namespace: str
    name: str
    spec: dict[str, Any]
    deleted: bool = False
    #: Consul IDs / etcd prefixes it ever used: what an Orphan deletion may leave.
    used: set[str] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass
class OpRecord:
    """One operation of the stream, for the report."""

    index: int
    what: str
    started: float
    finished: float | None = None
    outcome: str = "running"
    retries: int = 0


@dataclass
class Limits:
    """How big the workload gets."""

    max_live: int = 40  # per kind
    min_live: int = 6  # per kind, before deletes are allowed
    max_keys: int = 8  # per EtcdConfig, usually
    big_keys: int = 0  # occasionally an EtcdConfig this large (0: never)
    orphan_share: float = 0.05
    invalid_share: float = 0.05
    #: Share of operations that edit a TetherPolicy or relabel a namespace (0: never,
    #: and then no random number is drawn for it: older seeds replay unchanged).
    policy_share: float = 0.0


#: The namespace label the run's TetherPolicies select on.
TEAM_LABEL = "faults.tether.dev/team"
TEAMS = ("a", "b")
#: Service-name patterns a policy may allow (the names ``cs_spec`` uses, and the
#: default name, ``metadata.name``, of every ConsulService the generator makes).
NAME_PATTERNS = (*SERVICE_NAMES, "cs-*")


@dataclass
class PolicyState:
    """The run's TetherPolicies and team labels after one edit, and when it was made.

    ``started``/``finished`` (``time.monotonic()``) bracket the API call that
    made it: the state may have been in force from ``started`` on, and the
    previous one may have been until ``finished``.
    """

    started: float
    finished: float
    policies: dict[str, dict[str, Any]]  # name -> spec
    teams: dict[str, str]  # namespace -> team ("a"/"b"); absent: no label
    what: str


class Model:
    """What the workload declared, and what it placed in etcd behind Tether's back."""

    def __init__(self, run_id: str, namespaces: list[str]) -> None:
        self.run_id = run_id
        self.namespaces = namespaces
        #: Every EtcdConfig prefix and foreign key of this run lives under it.
        self.root = f"/faults/{run_id}"
        self.decls: dict[tuple[str, str, str], Decl] = {}
        self.foreign: dict[str, str] = {}
        self.config_maps: dict[tuple[str, str], dict[str, str]] = {}
        #: Every policy/label state of the run, oldest first; the first is "none".
        self.policy_history: list[PolicyState] = [PolicyState(0.0, 0.0, {}, {}, "no policies")]
        self.lock = threading.Lock()

    def policy_name(self, team: str) -> str:
        return f"f{self.run_id}-team-{team}"

    def team_value(self, team: str) -> str:
        return f"{self.run_id}-{team}"

    def live(self, kind: str | None = None) -> list[Decl]:
        with self.lock:
            return [d for d in self.decls.values() if not d.deleted and (kind is None or d.kind == kind)]

    def orphan_ids(self) -> set[str]:
        """Consul IDs that Orphan-policy deletions may legitimately leave behind."""
        return {
            i
            for d in self.decls.values()
            if d.kind == "cs" and d.deleted and d.spec.get("deletionPolicy") == "Orphan"
            for i in d.used
        }

    def orphan_prefixes(self) -> set[str]:
        """etcd prefixes whose keys Orphan-policy deletions may leave behind."""
        return {
            p
            for d in self.decls.values()
            if d.kind == "ec" and d.deleted and d.spec.get("deletionPolicy") == "Orphan"
            for p in d.used
        }


def service_id(namespace: str, name: str, spec: Mapping[str, Any]) -> str:
    return str(spec.get("id") or f"{namespace}-{name}")


class Workload:
    """Generates operations from ``rng`` and applies them to Kubernetes."""

    def __init__(
        self, kube: Kube, etcd: Etcd, model: Model, rng: random.Random, *, limits: Limits | None = None
    ) -> None:
        self.kube = kube
        self.etcd = etcd
        self.model = model
        self.rng = rng
        self.limits = limits or Limits()
        self.ops: list[OpRecord] = []
        self.current: OpRecord | None = None
        self._serial = 0
        self._ops_lock = threading.Lock()

    # ------------------------------------------------------------ set-up
    def prepare(self) -> None:
        """Namespaces and the ConfigMaps EtcdConfigs may reference."""
        for ns in self.model.namespaces:
            self.kube.retrying(lambda ns=ns: self.kube.ensure_namespace(ns), what="namespace")
            for cm in CONFIG_MAPS:
                data = {f"cm-{c}": self._word() for c in "abc"}
                self.kube.retrying(lambda ns=ns, cm=cm, data=data: self.kube.put_config_map(ns, cm, data))
                self.model.config_maps[(ns, cm)] = data

    # ----------------------------------------------------------- values
    def _next(self) -> int:
        self._serial += 1
        return self._serial

    def _word(self) -> str:
        return f"{self.rng.choice(WORDS)}-{self.rng.randrange(10**6)}"

    def cs_spec(self, namespace: str, name: str, *, invalid: bool = False) -> dict[str, Any]:
        r = self.rng
        spec: dict[str, Any] = {"port": r.randint(1024, 65535)}
        if r.random() < 0.7:
            spec["address"] = f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randint(1, 254)}"
        tags = r.sample(TAGS, r.randint(0, 3))
        if tags:
            spec["tags"] = tags
        meta = {k: self._word() for k in r.sample(META_KEYS, r.randint(0, 3))}
        if meta:
            spec["meta"] = meta
        if r.random() < 0.3:
            spec["name"] = r.choice(SERVICE_NAMES)
        if r.random() < 0.2:
            spec["id"] = f"{namespace}-{name}-i{self._next()}"
        if r.random() < 0.2:
            spec["checks"] = [{"name": "heartbeat", "ttl": "30s"}]
        if invalid:
            spec["checks"] = [{"name": "web", "http": BAD_URL, "interval": "10s"}]
        if r.random() < self.limits.orphan_share:
            spec["deletionPolicy"] = "Orphan"
        return spec

    def _rel_key(self) -> str:
        i = self.rng.randrange(400)
        return f"k{i}" if self.rng.random() < 0.6 else f"d{i % 7}/k{i}"

    def ec_data(self, n: int) -> dict[str, str]:
        data: dict[str, str] = {}
        for _ in range(n * 3):  # bounded: duplicates only shrink the map
            if len(data) >= n:
                break
            data[self._rel_key()] = self._word()
        return data

    def ec_prefix(self, namespace: str, name: str) -> str:
        # A fresh prefix for every create and move: no two resources ever compete
        # for a key, so the expected final state does not depend on timing.
        return f"{self.model.root}/{namespace}/{name}/p{self._next()}"

    def ec_spec(self, namespace: str, name: str, *, invalid: bool = False) -> dict[str, Any]:
        r = self.rng
        n = r.randint(1, self.limits.max_keys)
        if self.limits.big_keys and r.random() < 0.05:
            n = self.limits.big_keys
        spec: dict[str, Any] = {"prefix": self.ec_prefix(namespace, name), "data": self.ec_data(n)}
        if r.random() < 0.25:
            spec["from"] = [{"configMapRef": {"name": r.choice(CONFIG_MAPS)}}]
            if r.random() < 0.5:
                spec["data"]["cm-a"] = self._word()  # data overrides the ConfigMap
        if invalid:
            # The schema cannot know that the ConfigMap does not exist.
            spec["from"] = [{"configMapRef": {"name": f"missing-{self._next()}"}}]
        if r.random() < self.limits.orphan_share:
            spec["deletionPolicy"] = "Orphan"
        return spec

    @staticmethod
    def invalid(decl: Decl) -> bool:
        if decl.kind == "cs":
            return any(c.get("http") == BAD_URL for c in decl.spec.get("checks") or [])
        return any(
            str((f.get("configMapRef") or {}).get("name", "")).startswith("missing-")
            for f in decl.spec.get("from") or []
        )

    def mutate(self, decl: Decl) -> tuple[dict[str, Any], str]:
        """A new spec for ``decl`` and what changed. An invalid spec is always repaired."""
        r = self.rng
        policy = decl.spec.get("deletionPolicy")
        if self.invalid(decl):
            spec = (
                self.cs_spec(decl.namespace, decl.name)
                if decl.kind == "cs"
                else self.ec_spec(decl.namespace, decl.name)
            )
            spec.pop("deletionPolicy", None)
            if policy:
                spec["deletionPolicy"] = policy
            return spec, "repair invalid spec"
        spec = {
            k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in decl.spec.items()
        }
        if decl.kind == "cs":
            change = r.choice(("port", "tags", "meta", "address", "id", "name", "checks"))
            if change == "port":
                spec["port"] = r.randint(1024, 65535)
            elif change == "tags":
                spec["tags"] = r.sample(TAGS, r.randint(0, 4))
            elif change == "meta":
                spec["meta"] = {k: self._word() for k in r.sample(META_KEYS, r.randint(0, 4))}
            elif change == "address":
                spec["address"] = f"10.{r.randrange(256)}.{r.randrange(256)}.{r.randint(1, 254)}"
            elif change == "id":
                # Moving the registration: the old ID must be deregistered.
                spec["id"] = f"{decl.namespace}-{decl.name}-i{self._next()}"
            elif change == "name":
                spec["name"] = r.choice(SERVICE_NAMES)
            else:
                spec["checks"] = [] if spec.get("checks") else [{"name": "heartbeat", "ttl": "30s"}]
            return spec, change
        change = r.choices(("values", "add", "remove", "prefix", "from"), weights=(4, 3, 3, 1, 1))[0]
        data = dict(spec.get("data") or {})
        if change == "values" and data:
            for key in r.sample(sorted(data), max(1, len(data) // 2)):
                data[key] = self._word()
        elif change == "remove" and len(data) > 1:
            # Prune: the removed keys must leave etcd, and their ownership records too.
            for key in r.sample(sorted(data), r.randint(1, len(data) - 1)):
                del data[key]
        elif change == "prefix":
            spec["prefix"] = self.ec_prefix(decl.namespace, decl.name)
        elif change == "from":
            if spec.get("from"):
                spec.pop("from")
            else:
                spec["from"] = [{"configMapRef": {"name": r.choice(CONFIG_MAPS)}}]
        else:
            change = "add"
            data.update(self.ec_data(r.randint(1, 3)))
        spec["data"] = data
        return spec, change

    # ------------------------------------------------------- operations
    def _begin(self, what: str) -> OpRecord:
        with self._ops_lock:
            rec = OpRecord(len(self.ops) + 1, what, time.monotonic())
            self.ops.append(rec)
            self.current = rec
        return rec

    def _end(self, rec: OpRecord, outcome: str, retries: int) -> None:
        rec.finished = time.monotonic()
        rec.outcome = outcome
        rec.retries = retries
        with self._ops_lock:
            if self.current is rec:
                self.current = None

    def _attempt(
        self,
        rec: OpRecord,
        fn: Callable[[], Any],
        *,
        done_on: Callable[[ApiException, int], bool],
        timeout: float = 150.0,
    ) -> bool:
        """Run ``fn`` with retries while the API server is away; True when it took effect.

        ``done_on(exc, failures)`` says whether an error means the operation has
        in fact happened (an AlreadyExists after a lost response, a NotFound for
        a delete). A 404 from an API server that is still starting up (custom
        resource endpoints appear after /readyz on a busy machine) is retried.
        """
        deadline = time.monotonic() + timeout
        failures = 0
        while True:
            try:
                fn()
                self._end(rec, "ok" if not failures else f"ok after {failures} retries", failures)
                return True
            except ApiException as exc:
                if done_on(exc, failures):
                    self._end(rec, f"ok ({exc.status} after {failures} retries)", failures)
                    return True
                retry = Kube.transient(exc) or (exc.status == 404 and failures < 8)
                error: Exception = exc
            except Exception as exc:
                retry = Kube.transient(exc)
                error = exc
            failures += 1
            if not retry or time.monotonic() >= deadline:
                self._end(rec, f"FAILED after {failures} attempts: {str(error)[:200]}", failures)
                return False
            time.sleep(min(2.0, 0.25 * failures))

    def _resync(self, decl: Decl) -> None:
        """After an operation of unknown outcome: believe what Kubernetes holds."""
        try:
            obj, _ = self.kube.retrying(
                lambda: self.kube.get(decl.kind, decl.namespace, decl.name), timeout=120
            )
        except Exception as exc:
            log(f"cannot resync {decl}: {exc}")
            return
        with self.model.lock:
            if obj is None or obj["metadata"].get("deletionTimestamp"):
                decl.deleted = True
            else:
                decl.spec = dict(obj["spec"])
                decl.deleted = False

    def create(
        self,
        kind: str,
        namespace: str,
        *,
        invalid: bool = False,
        spec: dict[str, Any] | None = None,
        name: str | None = None,
        plant_foreign: bool | None = None,
    ) -> Decl:
        name = name or f"{kind}-{self._next()}"
        if spec is None:
            spec = (
                self.cs_spec(namespace, name, invalid=invalid)
                if kind == "cs"
                else self.ec_spec(namespace, name, invalid=invalid)
            )
        decl = Decl(kind, namespace, name, spec)
        decl.used.add(service_id(namespace, name, spec) if kind == "cs" else spec["prefix"])
        if plant_foreign is None:
            plant_foreign = kind == "ec" and self.rng.random() < 0.3
        if plant_foreign:
            self._plant_foreign(spec["prefix"])
        with self.model.lock:
            self.model.decls[decl.key] = decl
        rec = self._begin(f"create {decl}" + (" (invalid)" if self.invalid(decl) else ""))
        ok = self._attempt(
            rec,
            lambda: self.kube.create(kind, namespace, name, spec),
            # 409 after a failed attempt: that attempt reached etcd before the server died.
            done_on=lambda exc, failures: exc.status == 409 and failures > 0,
        )
        if not ok:
            self._resync(decl)
        return decl

    def update(self, decl: Decl, spec: dict[str, Any] | None = None, change: str = "given") -> None:
        if spec is None:
            spec, change = self.mutate(decl)
        rec = self._begin(f"update {decl} ({change})")
        with self.model.lock:
            decl.spec = spec
            decl.used.add(
                service_id(decl.namespace, decl.name, spec) if decl.kind == "cs" else spec["prefix"]
            )
        if decl.kind == "ec" and change == "prefix" and self.rng.random() < 0.5:
            self._plant_foreign(spec["prefix"])
        ok = self._attempt(
            rec,
            lambda: self.kube.replace_spec(decl.kind, decl.namespace, decl.name, spec),
            done_on=lambda exc, failures: False,
        )
        if not ok:
            self._resync(decl)

    def delete(self, decl: Decl) -> None:
        rec = self._begin(f"delete {decl}")
        with self.model.lock:
            decl.deleted = True

        def delete_and_confirm() -> None:
            # A 404 from a half-started API server is not a deletion: confirm it.
            try:
                self.kube.delete(decl.kind, decl.namespace, decl.name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            obj = self.kube.get(decl.kind, decl.namespace, decl.name)
            if obj is not None and not obj["metadata"].get("deletionTimestamp"):
                raise ApiException(status=503, reason="delete not visible yet")

        ok = self._attempt(rec, delete_and_confirm, done_on=lambda exc, failures: False)
        if not ok:
            self._resync(decl)

    def update_config_map(self, namespace: str, name: str) -> None:
        data = dict(self.model.config_maps.get((namespace, name), {}))
        for key in self.rng.sample(sorted(data), max(1, len(data) // 2)):
            data[key] = self._word()
        if self.rng.random() < 0.3:
            data[f"cm-{self.rng.choice('defg')}"] = self._word()
        rec = self._begin(f"update configmap {namespace}/{name}")
        self.model.config_maps[(namespace, name)] = data
        self._attempt(
            rec, lambda: self.kube.put_config_map(namespace, name, data), done_on=lambda exc, failures: False
        )

    # ---------------------------------------------------------- policies
    def _policy_spec(self, team: str) -> dict[str, Any]:
        r = self.rng
        ns_prefixes = [f"{self.model.root}/{ns}" for ns in self.model.namespaces]
        # Mostly a namespace's own prefix; sometimes the run's root, which then
        # reserves every namespace's prefix (above) against the others.
        pool = ns_prefixes + ([self.model.root] if r.random() < 0.15 else [])
        spec: dict[str, Any] = {
            "namespaceSelector": {"matchLabels": {TEAM_LABEL: self.model.team_value(team)}},
            "consulServiceNames": r.sample(NAME_PATTERNS, r.randint(0, 4)),
            "etcdPrefixes": r.sample(pool, r.randint(0, len(pool))),
        }
        return spec

    def policy_op(self) -> None:
        """One random edit: a TetherPolicy created, changed or deleted, or a namespace relabelled."""
        r = self.rng
        last = self.model.policy_history[-1]
        policies, teams = dict(last.policies), dict(last.teams)
        if r.random() < 0.5:
            team = r.choice(TEAMS)
            name = self.model.policy_name(team)
            if name in policies and r.random() < 0.25:
                del policies[name]
                what = f"delete policy {name}"
                call: Callable[[], Any] = lambda: self.kube.delete_policy(name)  # noqa: E731
            else:
                spec = self._policy_spec(team)
                policies[name] = spec
                names, prefixes = spec["consulServiceNames"], spec["etcdPrefixes"]
                what = f"edit policy {name}: names {names}, prefixes {prefixes}"
                call = lambda: self.kube.put_policy(name, spec)  # noqa: E731
        else:
            ns = r.choice(self.model.namespaces)
            team_or_none = r.choice((*TEAMS, None))
            if team_or_none is None:
                teams.pop(ns, None)
            else:
                teams[ns] = team_or_none
            what = f"label namespace {ns} team={team_or_none}"
            value = self.model.team_value(team_or_none) if team_or_none else None
            call = lambda: self.kube.label_namespace(ns, TEAM_LABEL, value)  # noqa: E731
        self._apply_policy_state(what, call, policies, teams)

    def allow_all(self) -> None:
        """Delete the run's policies and team labels: with the default ``allow``, all is allowed again."""
        last = self.model.policy_history[-1]
        for name in sorted(last.policies):
            self._apply_policy_state(
                f"delete policy {name}", lambda name=name: self.kube.delete_policy(name),
                {k: v for k, v in self.model.policy_history[-1].policies.items() if k != name},
                dict(self.model.policy_history[-1].teams),
            )
        for ns in sorted(last.teams):
            self._apply_policy_state(
                f"label namespace {ns} team=None",
                lambda ns=ns: self.kube.label_namespace(ns, TEAM_LABEL, None),
                dict(self.model.policy_history[-1].policies),
                {k: v for k, v in self.model.policy_history[-1].teams.items() if k != ns},
            )

    def _apply_policy_state(
        self, what: str, call: Callable[[], Any], policies: dict[str, dict[str, Any]], teams: dict[str, str]
    ) -> None:
        rec = self._begin(what)
        ok = self._attempt(rec, call, done_on=lambda exc, failures: False)
        state = PolicyState(rec.started, rec.finished or time.monotonic(), policies, teams, what)
        if not ok:
            # Outcome unknown: the audit cannot say which state held, so it
            # keeps the edit as possibly in force and the previous one too
            # (the next edit, or the end, closes both).
            state.what += " (outcome unknown)"
        with self.model.lock:
            self.model.policy_history.append(state)

    def _plant_foreign(self, prefix: str) -> None:
        """A key under the resource's prefix that Tether does not own and must never touch."""
        key = f"{prefix.rstrip('/')}/{FOREIGN_MARK}{self._next()}"
        value = f"foreign-{self._word()}"
        for _ in range(3):  # etcd may be down right now (a fault); the key is optional
            try:
                self.etcd.put(key, value)
            except OSError:
                time.sleep(0.5)
                continue
            with self.model.lock:
                self.model.foreign[key] = value
            return

    # ----------------------------------------------------------- stream
    def random_op(self) -> None:
        r = self.rng
        if self.limits.policy_share and r.random() < self.limits.policy_share:
            self.policy_op()
            return
        kind = r.choice(("cs", "ec"))
        live = [d for d in self.model.live(kind)]
        ns = r.choice(self.model.namespaces)
        if len(live) < self.limits.min_live:
            choice = "create"
        elif len(live) >= self.limits.max_live:
            choice = r.choice(("update", "delete"))
        else:
            choice = r.choices(("create", "update", "delete", "configmap"), weights=(35, 42, 20, 3))[0]
        if choice == "create":
            self.create(kind, ns, invalid=r.random() < self.limits.invalid_share)
        elif choice == "update":
            self.update(r.choice(live))
        elif choice == "delete":
            self.delete(r.choice(live))
        else:
            self.update_config_map(ns, r.choice(CONFIG_MAPS))

    def stream(
        self,
        count: int,
        *,
        pace: tuple[float, float],
        deadline: float,
        hot: set[int] | None = None,
        gate: Callable[[int], None] | None = None,
    ) -> None:
        """``count`` random operations, a seeded pause between each, ending by ``deadline``.

        After the operations numbered in ``hot`` there is no pause: bursts placed
        around the faults' trigger points, so that faults meet work in flight.
        ``gate(n)`` is called before operation ``n`` and may hold the stream (the
        fault run uses it so that a slow fault never lets the next ones pile up
        after the stream has ended).
        """
        for index in range(1, count + 1):
            if gate is not None:
                gate(index)
            if time.monotonic() >= deadline:
                log(f"workload stopped early after {len(self.ops)} operations")
                return
            self.random_op()
            pause = self.rng.uniform(*pace)  # drawn even when skipped: same sequence either way
            if index not in (hot or set()):
                time.sleep(pause)

    def summary(self, ops: list[OpRecord] | None = None) -> dict[str, Any]:
        ops = self.ops if ops is None else ops
        kinds = Counter(op.what.split(" ")[0] + " " + op.what.split(" ")[1] for op in ops)
        retried = [op for op in ops if op.retries and not op.outcome.startswith("FAILED")]
        failed = [op for op in ops if op.outcome.startswith("FAILED")]
        return {
            "total": len(ops),
            "by_kind": dict(sorted(kinds.items())),
            "retried": len(retried),
            "failed": [f"#{op.index} {op.what}: {op.outcome}" for op in failed],
            "live": {k: len(self.model.live(k)) for k in ("cs", "ec")},
            "foreign_keys": len(self.model.foreign),
        }


def claim_key(full_key: str) -> str:
    return f"{OWNERSHIP_PREFIX}keys{full_key}"
