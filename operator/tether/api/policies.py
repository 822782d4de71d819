"""TetherPolicy: which namespaces may use which names, prefixes and adoption (pure).

A cluster shared by several teams needs a platform team to say who may
register which Consul service name, and who may write under which etcd or
Consul KV prefix. This module is the whole of that logic, with no I/O:

* :func:`parse` turns a policy object into a :class:`Policy`, collecting every
  problem (an invalid selector, a malformed pattern) as a message for the
  policy's status instead of raising: a bad entry is left out, the rest of
  the policy applies, and other policies are unaffected. A policy whose
  selector is invalid selects nothing (which namespaces it meant is unknown).
* :func:`decide` applies the contract's rules, in order, to one
  :class:`Claims` (what a resource asks for) in one namespace:

  1. allowed when a policy that selects the namespace allows it;
  2. otherwise refused when the namespace is selected by any policy
     (*restrict*), or when what it asks for is *reserved*: allowed to other
     namespaces by some policy — for a prefix, equal to, above or below a
     prefix allowed to others;
  3. otherwise the cluster's default (``TETHER_POLICY_DEFAULT``);
  4. ``adopt: true`` in a namespace some policy selects needs one of its
     policies to set ``allowAdopt``; elsewhere rule 3 decides. A refused
     adoption refuses the resource (it is not silently written without it).

Prefixes match on ``/`` boundaries: ``/team-x`` covers ``/team-x`` and
``/team-x/a`` but not ``/team-xy``; Consul KV prefixes are the same without the
leading ``/``. A service-name pattern's ``*`` matches any run of characters,
the empty run included (``team-a-*`` matches ``team-a-`` followed by anything).

"Other namespaces" means namespaces a policy does not select: a policy that
allows ``payments`` to the namespaces labelled ``team=a`` reserves it against
every namespace without that label, whether or not one with it exists yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

PLURAL = "tetherpolicies"
KIND = "TetherPolicy"

Default = Literal["allow", "deny"]
Subject = Literal["service", "etcd", "consulkv"]

_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# A Consul service name (letters, digits, '-') where '*' may stand for any run.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9*-]{1,63}$")
# Kubernetes label keys: an optional DNS-subdomain prefix and a name of at most 63.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?)?)$")

_WHAT = {"service": "Consul service name", "etcd": "etcd prefix", "consulkv": "Consul KV prefix"}


# -- label selectors -----------------------------------------------------------


@dataclass(frozen=True)
class Requirement:
    """One term of a label selector (``matchLabels`` entries become ``In`` with one value)."""

    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return self.key in labels and labels[self.key] in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels  # DoesNotExist


@dataclass(frozen=True)
class Selector:
    """A Kubernetes label selector: every requirement must hold (``{}`` selects all)."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def _label_key_problem(key: object) -> str | None:
    if not isinstance(key, str) or not key:
        return "a label key must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in prefix or (key.count("/") and not prefix):
        return f"label key {key!r} has an empty or repeated '/' prefix"
    if prefix and not _LABEL_PREFIX.match(prefix):
        return f"label key {key!r}: prefix must be a DNS subdomain (lowercase, at most 253 characters)"
    if not _LABEL_NAME.match(name):
        return f"label key {key!r}: name must be 1-63 letters, digits, '-', '_' or '.'"
    return None


def _label_value_problem(value: object) -> str | None:
    if not isinstance(value, str) or not _LABEL_VALUE.match(value):
        return f"label value {value!r}: at most 63 letters, digits, '-', '_' or '.'"
    return None


def parse_selector(raw: object, where: str = "spec.namespaceSelector") -> tuple[Selector | None, list[str]]:
    """The selector, or None and the reasons it is invalid (Kubernetes' own rules)."""
    if not isinstance(raw, Mapping):
        return None, [f"{where}: required, a label selector ({{}} selects every namespace)"]
    problems: list[str] = []
    requirements: list[Requirement] = []
    match_labels = raw.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        problems.append(f"{where}.matchLabels: must be a map of label key to value")
        match_labels = {}
    for key, value in sorted(match_labels.items(), key=lambda kv: str(kv[0])):
        problem = _label_key_problem(key) or _label_value_problem(value)
        if problem:
            problems.append(f"{where}.matchLabels: {problem}")
        else:
            requirements.append(Requirement(key, "In", frozenset({value})))
    expressions = raw.get("matchExpressions") or []
    if not isinstance(expressions, list):
        problems.append(f"{where}.matchExpressions: must be a list")
        expressions = []
    for i, expr in enumerate(expressions):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            problems.append(f"{at}: must be an object with key, operator and values")
            continue
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        problem = _label_key_problem(key)
        if problem:
            problems.append(f"{at}: {problem}")
            continue
        if op not in _OPERATORS:
            problems.append(f"{at}.operator: {op!r} must be one of {', '.join(_OPERATORS)}")
            continue
        if not isinstance(values, list):
            problems.append(f"{at}.values: must be a list of strings")
            continue
        if op in ("In", "NotIn") and not values:
            problems.append(f"{at}.values: {op} needs at least one value")
            continue
        if op in ("Exists", "DoesNotExist") and values:
            problems.append(f"{at}.values: {op} takes no values")
            continue
        bad = [p for p in (_label_value_problem(v) for v in values) if p]
        if bad:
            problems.append(f"{at}.values: {bad[0]}")
            continue
        requirements.append(Requirement(str(key), str(op), frozenset(values)))
    if problems:
        return None, problems
    return Selector(tuple(requirements)), []


# -- patterns and prefixes -----------------------------------------------------


def name_matches(pattern: str, name: str) -> bool:
    """Whether a service-name ``pattern`` (``*``: any run of characters) matches ``name``."""
    if "*" not in pattern:
        return pattern == name
    parts = pattern.split("*")
    head, tail = parts[0], parts[-1]
    if len(name) < len(head) + len(tail) or not name.startswith(head) or not name.endswith(tail):
        return False
    position, end = len(head), len(name) - len(tail)
    for middle in parts[1:-1]:
        found = name.find(middle, position, end)
        if found < 0:
            return False
        position = found + len(middle)
    return True


def normal_prefix(prefix: str) -> str:
    """A prefix without its trailing ``/`` (the etcd root ``/`` becomes ``""``)."""
    return prefix.rstrip("/")


def covers(outer: str, inner: str) -> bool:
    """Whether normalised prefix ``inner`` equals or lies under ``outer`` on a ``/`` boundary.

    The etcd root (``""`` once normalised) covers every absolute prefix.
    """
    if outer == inner:
        return True
    if outer == "":
        return inner.startswith("/")
    return inner.startswith(outer + "/")


def prefix_problem(prefix: object, subject: Subject) -> str | None:
    """Why ``prefix`` cannot be an allowed prefix of this subject, or None."""
    if not isinstance(prefix, str) or not prefix:
        return "must be a non-empty string"
    if subject == "etcd" and not prefix.startswith("/"):
        return "must start with '/' (etcd keys are absolute, e.g. /team-a)"
    if subject == "consulkv" and prefix.startswith("/"):
        return "must not start with '/' (Consul KV keys do not, e.g. team-a/)"
    segments = prefix.strip("/").split("/")
    if prefix.strip("/") and any(s in ("", ".", "..") for s in segments):
        return "has an empty, '.' or '..' segment"
    if subject == "consulkv" and not prefix.strip("/"):
        return "must name a path (the whole of Consul KV cannot be handed out)"
    return None


# -- policies ------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """A parsed TetherPolicy: its valid parts, and the problems with the rest."""

    name: str
    selector: Selector | None
    service_names: tuple[str, ...] = ()
    etcd_prefixes: tuple[str, ...] = ()  # normalised (no trailing '/')
    consulkv_prefixes: tuple[str, ...] = ()  # normalised (no trailing '/')
    allow_adopt: bool = False
    problems: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.problems

    def selects(self, labels: Mapping[str, str]) -> bool:
        return self.selector is not None and self.selector.matches(labels)

    def allows(self, subject: Subject, value: str) -> bool:
        """Whether this policy's lists allow ``value`` (names as patterns, prefixes on boundaries)."""
        if subject == "service":
            return any(name_matches(p, value) for p in self.service_names)
        allowed = self.etcd_prefixes if subject == "etcd" else self.consulkv_prefixes
        return any(covers(p, normal_prefix(value)) for p in allowed)

    def reserves(self, subject: Subject, value: str) -> bool:
        """Whether ``value`` collides with something this policy allows to its namespaces.

        A name: the same as :meth:`allows`. A prefix: equal to, under or above
        an allowed prefix — whoever writes above ``/team-a`` can write into it.
        """
        if subject == "service":
            return self.allows(subject, value)
        allowed = self.etcd_prefixes if subject == "etcd" else self.consulkv_prefixes
        mine = normal_prefix(value)
        return any(covers(p, mine) or covers(mine, p) for p in allowed)


def _strings(raw: object, where: str, problems: list[str]) -> list[object]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append(f"{where}: must be a list")
        return []
    return list(raw)


def parse(name: str, spec: Mapping[str, Any]) -> Policy:
    """A policy from its spec as stored; never raises: problems go into ``Policy.problems``."""
    selector, problems = parse_selector(spec.get("namespaceSelector"))
    names: list[str] = []
    raw_names = _strings(spec.get("consulServiceNames"), "spec.consulServiceNames", problems)
    for i, pattern in enumerate(raw_names):
        if not isinstance(pattern, str) or not _NAME_PATTERN.match(pattern):
            problems.append(
                f"spec.consulServiceNames[{i}]: {pattern!r} is not a service-name pattern "
                "(letters, digits, '-' and '*', at most 63 characters, e.g. team-a-*)"
            )
        else:
            names.append(pattern)
    prefixes: dict[Subject, list[str]] = {"etcd": [], "consulkv": []}
    fields: tuple[tuple[Subject, str], ...] = (("etcd", "etcdPrefixes"), ("consulkv", "consulKVPrefixes"))
    for subject, field in fields:
        for i, prefix in enumerate(_strings(spec.get(field), f"spec.{field}", problems)):
            problem = prefix_problem(prefix, subject)
            if problem:
                problems.append(f"spec.{field}[{i}]: {prefix!r} {problem}")
            else:
                prefixes[subject].append(normal_prefix(str(prefix)))
    adopt = spec.get("allowAdopt", False)
    if not isinstance(adopt, bool):
        problems.append(f"spec.allowAdopt: {adopt!r} must be true or false")
        adopt = False
    return Policy(
        name=name, selector=selector, service_names=tuple(names),
        etcd_prefixes=tuple(prefixes["etcd"]), consulkv_prefixes=tuple(prefixes["consulkv"]),
        allow_adopt=adopt, problems=tuple(problems),
    )


# -- decisions -----------------------------------------------------------------


@dataclass(frozen=True)
class Claims:
    """What one resource asks for: a service name or a prefix, and whether it adopts."""

    subject: Subject
    value: str
    adopt: bool = False

    def describe(self) -> str:
        return f"{_WHAT[self.subject]} {self.value!r}"


@dataclass(frozen=True)
class Decision:
    """Allowed, or refused with a message; ``policies`` are the ones that applied."""

    allowed: bool
    message: str = ""
    policies: tuple[str, ...] = ()  # the policies that refused it (empty when allowed)


ALLOWED = Decision(True)


def _names(policies: Iterable[Policy]) -> str:
    return ", ".join(sorted(p.name for p in policies))


def decide(
    policies: Sequence[Policy], namespace: str, labels: Mapping[str, str], claims: Claims,
    *, default: Default = "allow",
) -> Decision:
    """The contract's rules, in order, for ``claims`` in ``namespace`` (with ``labels``)."""
    selecting = [p for p in policies if p.selects(labels)]
    others = [p for p in policies if not p.selects(labels)]
    what = claims.describe()
    refused_value: Decision | None = None
    if any(p.allows(claims.subject, claims.value) for p in selecting):
        pass  # rule 1
    elif selecting:  # rule 2: restrict
        reserving = [p for p in others if p.reserves(claims.subject, claims.value)]
        applied = sorted({p.name for p in (*selecting, *reserving)})
        message = (
            f"{what} is not allowed in namespace {namespace!r}: the TetherPolicies selecting it "
            f"({_names(selecting)}) do not allow it"
        )
        if reserving:
            message += f", and {_names(reserving)} reserve it for other namespaces"
        refused_value = Decision(False, message, tuple(applied))
    else:
        reserving = [p for p in others if p.reserves(claims.subject, claims.value)]
        if reserving:  # rule 2: reserved
            kind = "it or a prefix above or below it" if claims.subject != "service" else "it"
            refused_value = Decision(
                False,
                f"{what} is not allowed in namespace {namespace!r}: TetherPolicies "
                f"{_names(reserving)} reserve {kind} for other namespaces",
                tuple(sorted(p.name for p in reserving)),
            )
        elif default == "deny":  # rule 3
            refused_value = Decision(
                False,
                f"{what} is not allowed in namespace {namespace!r}: no TetherPolicy selects the "
                "namespace and TETHER_POLICY_DEFAULT is deny",
            )
    if refused_value is not None:
        return refused_value
    if claims.adopt and selecting and not any(p.allow_adopt for p in selecting):  # rule 4
        return Decision(
            False,
            f"adopt: true is not allowed in namespace {namespace!r}: none of the TetherPolicies "
            f"selecting it ({_names(selecting)}) sets allowAdopt",
            tuple(sorted(p.name for p in selecting)),
        )
    return ALLOWED
