"""The ConsulService resource: its spec as a typed, validated model.

Two modes share the kind: a fixed instance (``address``/``port``/``checks``,
registered on the agent) and endpoints mode (``endpoints``: every endpoint of
a Kubernetes Service an instance in Consul's catalog). :func:`parse` returns
the model of either; ``spec.endpoints`` is set only in endpoints mode.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from tether.api import InvalidSpec, durations

PLURAL = "consulservices"
KIND = "ConsulService"

CheckKind = Literal["http", "tcp", "grpc", "ttl"]
CHECK_KINDS: tuple[CheckKind, ...] = ("http", "tcp", "grpc", "ttl")

# Meta keys Tether writes itself to mark what it owns; a spec may not set them.
META_EXTERNAL_SOURCE = "external-source"
META_CLUSTER = "tether-cluster"
META_NAMESPACE = "tether-namespace"
META_NAME = "tether-name"
RESERVED_META = frozenset({META_EXTERNAL_SOURCE, META_CLUSTER, META_NAMESPACE, META_NAME})

# Consul's own limits on service meta (agent/structs: metaKeyFormat and friends).
_META_KEY = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_META_MAX_PAIRS = 64
_META_MAX_VALUE = 512
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# Consul refuses "/" in service IDs used in URL paths and treats "?"/"#" badly.
_SERVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Consul raises any deregisterCriticalServiceAfter below one minute to one minute,
# and any check interval below one second to one second (checks.MinInterval);
# accepting a smaller value would make the status lie about what Consul does.
_MIN_DEREGISTER_NS = 60_000_000_000
_MIN_INTERVAL_NS = 1_000_000_000


@dataclass(frozen=True)
class Check:
    """One health check, normalised (durations in nanoseconds)."""

    name: str
    kind: CheckKind
    target: str  # URL, host:port, gRPC target, or TTL duration text
    interval_ns: int | None = None
    timeout_ns: int | None = None
    deregister_after_ns: int | None = None
    method: str | None = None
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    tls_skip_verify: bool = False
    ttl_ns: int | None = None
    grpc_use_tls: bool = False


@dataclass(frozen=True)
class EndpointsRef:
    """Endpoints mode: the Service whose endpoints become instances, and which port."""

    service: str
    # The Service's port name (str) or port number (int); None: its only port.
    port: str | int | None = None


@dataclass(frozen=True)
class ConsulServiceSpec:
    """What a ConsulService asks Consul to hold.

    In endpoints mode ``endpoints`` is set, ``address``/``port``/``checks`` are
    empty, and ``id`` is the prefix of every instance's service ID.
    """

    name: str
    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: tuple[tuple[str, str], ...] = ()
    checks: tuple[Check, ...] = ()
    deletion_policy: Literal["Delete", "Orphan"] = "Delete"
    endpoints: EndpointsRef | None = None


def parse(namespace: str, name: str, spec: Mapping[str, Any]) -> ConsulServiceSpec:
    """Validate ``spec`` (as the API server stored it) and return the typed model."""
    svc_name = _str(spec.get("name") or name, "spec.name")
    if not _SERVICE_NAME.match(svc_name):
        raise InvalidSpec(
            f"spec.name: {svc_name!r} is not a valid Consul service name "
            "(letters, digits and '-', at most 63 characters, not starting or ending with '-')"
        )
    svc_id = _str(spec.get("id") or f"{namespace}-{name}", "spec.id")
    if not _SERVICE_ID.match(svc_id):
        raise InvalidSpec(
            f"spec.id: {svc_id!r} is not a usable Consul service ID "
            "(letters, digits, '_', '.', ':' and '-', at most 128 characters)"
        )
    endpoints = _parse_endpoints(spec)
    address = _str(spec.get("address", ""), "spec.address")
    if address and not _is_address(address):
        raise InvalidSpec(f"spec.address: {address!r} is neither an IP address nor a hostname")
    port = spec.get("port")
    if endpoints is not None:
        port = 0  # each instance has its endpoint's own port
    elif not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise InvalidSpec(f"spec.port: {port!r} must be an integer from 1 to 65535")

    tags_raw = spec.get("tags") or []
    if not isinstance(tags_raw, list) or not all(isinstance(t, str) for t in tags_raw):
        raise InvalidSpec("spec.tags: must be a list of strings")
    dupes = sorted({t for t in tags_raw if tags_raw.count(t) > 1})
    if dupes:
        raise InvalidSpec(f"spec.tags: duplicate tags {dupes}")
    if any(not t for t in tags_raw):
        raise InvalidSpec("spec.tags: tags must not be empty strings")

    meta = _parse_meta(spec.get("meta") or {})
    checks_raw = spec.get("checks") or []
    if not isinstance(checks_raw, list):
        raise InvalidSpec("spec.checks: must be a list")
    checks = tuple(_parse_check(i, c) for i, c in enumerate(checks_raw))
    names = [c.name for c in checks]
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        raise InvalidSpec(f"spec.checks: duplicate check names {dup_names}")

    policy = spec.get("deletionPolicy", "Delete")
    if policy not in ("Delete", "Orphan"):
        raise InvalidSpec(f"spec.deletionPolicy: {policy!r} must be Delete or Orphan")
    return ConsulServiceSpec(
        name=svc_name,
        id=svc_id,
        address=address,
        port=port,
        tags=tuple(tags_raw),
        meta=meta,
        checks=checks,
        deletion_policy=policy,
        endpoints=endpoints,
    )


def _parse_endpoints(spec: Mapping[str, Any]) -> EndpointsRef | None:
    raw = spec.get("endpoints")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidSpec("spec.endpoints: must be an object with service and port")
    # The schema's CEL rule says the same; an API server without CEL (or an
    # object stored before the rule) must still not mix the two modes.
    mixed = [key for key in ("address", "port", "checks") if spec.get(key) not in (None, "", [])]
    if mixed:
        raise InvalidSpec(
            f"spec.endpoints is exclusive with {', '.join('spec.' + k for k in mixed)}: in endpoints "
            "mode every endpoint's own address and port are registered, with a check that follows "
            "the endpoint's conditions"
        )
    service = raw.get("service")
    if not isinstance(service, str) or not _DNS_LABEL.match(service):
        raise InvalidSpec(
            f"spec.endpoints.service: {service!r} must name a Service in this namespace "
            "(a DNS label: lowercase letters, digits and '-')"
        )
    port = raw.get("port")
    if port is None or port == "":
        return EndpointsRef(service, None)
    if isinstance(port, bool) or not isinstance(port, int | str):
        raise InvalidSpec("spec.endpoints.port: must be a port name or a number")
    if isinstance(port, int) and not 1 <= port <= 65535:
        raise InvalidSpec(f"spec.endpoints.port: {port} must be from 1 to 65535")
    if isinstance(port, str) and not _DNS_LABEL.match(port):
        raise InvalidSpec(f"spec.endpoints.port: {port!r} is not a valid port name")
    return EndpointsRef(service, port)


def _parse_meta(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping):
        raise InvalidSpec("spec.meta: must be a map of string to string")
    if len(raw) > _META_MAX_PAIRS - len(RESERVED_META):
        raise InvalidSpec(
            f"spec.meta: {len(raw)} entries; Consul allows {_META_MAX_PAIRS} and Tether "
            f"uses {len(RESERVED_META)} for ownership, so at most "
            f"{_META_MAX_PAIRS - len(RESERVED_META)}"
        )
    out = []
    for key, value in sorted(raw.items()):
        if not isinstance(key, str) or not _META_KEY.match(key):
            raise InvalidSpec(
                f"spec.meta: key {key!r} must be 1-128 letters, digits, '_' or '-' (Consul's rule)"
            )
        if key in RESERVED_META or key.startswith(("consul-", "tether-")):
            raise InvalidSpec(
                f"spec.meta: key {key!r} is reserved ('external-source', 'tether-*' for "
                "Tether's ownership markers, 'consul-*' for Consul)"
            )
        if not isinstance(value, str):
            raise InvalidSpec(f"spec.meta.{key}: value must be a string, not {type(value).__name__}")
        # Consul counts bytes (Go's len), not characters: 512 'é' are 1024 bytes.
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > _META_MAX_VALUE:
            raise InvalidSpec(
                f"spec.meta.{key}: value is {size} bytes in UTF-8; Consul allows {_META_MAX_VALUE} bytes"
            )
        out.append((key, value))
    return tuple(out)


def _parse_check(index: int, raw: Any) -> Check:
    where = f"spec.checks[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidSpec(f"{where}: must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidSpec(f"{where}.name: required")
    where = f"spec.checks[{index}] ({name if len(name) <= 64 else name[:64] + '…'})"
    kinds = [k for k in CHECK_KINDS if raw.get(k) not in (None, "")]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none"
        raise InvalidSpec(f"{where}: needs exactly one of http, tcp, grpc, ttl (found: {found})")
    kind = kinds[0]
    target = raw[kind]
    if not isinstance(target, str):
        raise InvalidSpec(f"{where}.{kind}: must be a string")

    def dur(key: str) -> int | None:
        value = raw.get(key)
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise InvalidSpec(f"{where}.{key}: must be a duration string such as 10s")
        ns = durations.parse_ns(value, field=f"{where}.{key}")
        if ns <= 0:
            raise InvalidSpec(f"{where}.{key}: must be positive")
        return ns

    interval = dur("interval")
    timeout = dur("timeout")
    deregister = dur("deregisterCriticalServiceAfter")
    if deregister is not None and deregister < _MIN_DEREGISTER_NS:
        raise InvalidSpec(
            f"{where}.deregisterCriticalServiceAfter: Consul's minimum is 1m "
            "(it silently raises smaller values)"
        )
    method = raw.get("method")
    header_raw = raw.get("header") or {}
    tls_skip = raw.get("tlsSkipVerify", False)
    if kind != "http" and (method or header_raw):
        raise InvalidSpec(f"{where}: method and header apply to http checks only")
    if kind not in ("http", "grpc") and tls_skip:
        raise InvalidSpec(f"{where}: tlsSkipVerify applies to http and grpc checks only")

    grpc_tls = raw.get("grpcUseTLS", False)
    if not isinstance(grpc_tls, bool):
        raise InvalidSpec(f"{where}.grpcUseTLS: must be true or false")
    if kind != "grpc" and grpc_tls:
        raise InvalidSpec(f"{where}: grpcUseTLS applies to grpc checks only")

    ttl_ns = None
    if kind == "ttl":
        ttl_ns = durations.parse_ns(target, field=f"{where}.ttl")
        if ttl_ns <= 0:
            # Consul: "TTL must be > 0 for TTL checks".
            raise InvalidSpec(f"{where}.ttl: must be positive (e.g. 30s)")
        if interval is not None or timeout is not None:
            raise InvalidSpec(f"{where}: a ttl check takes no interval or timeout")
    else:
        if interval is None:
            raise InvalidSpec(f"{where}.interval: required for {kind} checks (e.g. 10s)")
        if interval < _MIN_INTERVAL_NS:
            raise InvalidSpec(
                f"{where}.interval: Consul's minimum is 1s (it silently raises smaller values)"
            )
        if timeout is not None and timeout > interval:
            raise InvalidSpec(f"{where}.timeout: must not exceed interval")
    if kind == "http":
        _check_url(where, target)
        if method is not None and (not isinstance(method, str) or method not in _HTTP_METHODS):
            raise InvalidSpec(f"{where}.method: {method!r} must be one of {sorted(_HTTP_METHODS)}")
    elif kind in ("tcp", "grpc"):
        _check_host_port(where, kind, target)
    header = _parse_header(where, header_raw)
    return Check(
        name=name,
        kind=kind,
        target=target,
        interval_ns=interval,
        timeout_ns=timeout,
        deregister_after_ns=deregister,
        method=method,
        header=header,
        tls_skip_verify=bool(tls_skip),
        ttl_ns=ttl_ns,
        grpc_use_tls=grpc_tls,
    )


def _parse_header(where: str, raw: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(raw, Mapping):
        raise InvalidSpec(f"{where}.header: must be a map of header name to list of values")
    out = []
    for key, values in sorted(raw.items()):
        if not isinstance(key, str) or not re.match(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$", key):
            raise InvalidSpec(f"{where}.header: {key!r} is not a valid HTTP header name")
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise InvalidSpec(f"{where}.header.{key}: must be a list of strings")
        if any("\n" in v or "\r" in v for v in values):
            raise InvalidSpec(f"{where}.header.{key}: values must not contain line breaks")
        out.append((key, tuple(values)))
    return tuple(out)


def _check_url(where: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidSpec(f"{where}.http: {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidSpec(
            f"{where}.http: {url!r} must be an absolute http:// or https:// URL with a host"
        )
    if port == 0:
        raise InvalidSpec(f"{where}.http: {url!r} has port 0")


def _check_host_port(where: str, kind: str, target: str) -> None:
    hostport = target.split("/", 1)[0] if kind == "grpc" else target
    host, sep, port_text = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidSpec(
            f"{where}.{kind}: {target!r} must be host:port"
            + (" optionally followed by /service" if kind == "grpc" else "")
            + " with a port from 1 to 65535"
        )
    if not _is_address(host):
        raise InvalidSpec(f"{where}.{kind}: {host!r} is neither an IP address nor a hostname")


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(text))


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidSpec(f"{where}: must be a string")
    return value
