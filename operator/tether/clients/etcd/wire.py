"""Conversions between etcd's protobuf messages and :mod:`tether.clients.etcd.values`, and
the mapping of gRPC statuses to :mod:`tether.clients.etcd.errors`.

Pure functions over aetcd's generated messages; no channel, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import grpc
from aetcd import rpc

from tether.clients.etcd.errors import (
    Compacted,
    EtcdError,
    EtcdRejected,
    EtcdUnavailable,
    RequestTooLarge,
    TooManyOps,
)
from tether.clients.etcd.values import Compare, Delete, KeyValue, Put, WatchEvent

# Bytes of a server message kept in an error; etcd's messages are short, but
# a proxy in between could return anything.
_MAX_DETAIL: Final = 300


_COMPARE_TARGETS: Final[Mapping[str, tuple[int, str]]] = {
    # target -> (protobuf enum value, protobuf field holding the operand)
    "version": (rpc.Compare.VERSION, "version"),
    "create": (rpc.Compare.CREATE, "create_revision"),
    "mod": (rpc.Compare.MOD, "mod_revision"),
    "value": (rpc.Compare.VALUE, "value"),
}

_COMPARE_OPS: Final[Mapping[str, int]] = {
    "=": rpc.Compare.EQUAL,
    "!=": rpc.Compare.NOT_EQUAL,
    "<": rpc.Compare.LESS,
    ">": rpc.Compare.GREATER,
}


def compare_to_pb(compare: Compare) -> Any:
    """Build the ``etcdserverpb.Compare`` message for ``compare``."""
    target, operand_field = _COMPARE_TARGETS[compare.target]
    return rpc.Compare(
        key=compare.key,
        target=target,
        result=_COMPARE_OPS[compare.op],
        **{operand_field: compare.value},
    )


def op_to_pb(op: Put | Delete) -> Any:
    """Build the ``etcdserverpb.RequestOp`` message for a transaction operation."""
    if isinstance(op, Put):
        return rpc.RequestOp(request_put=rpc.PutRequest(key=op.key, value=op.value, lease=op.lease))
    if isinstance(op, Delete):
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key))
    raise TypeError(f"not a transaction operation: {type(op).__name__}")


def txn_to_pb(
    compares: Sequence[Compare], success: Sequence[Put | Delete], failure: Sequence[Put | Delete]
) -> Any:
    """Build the ``etcdserverpb.TxnRequest`` message."""
    return rpc.TxnRequest(
        compare=[compare_to_pb(c) for c in compares],
        success=[op_to_pb(op) for op in success],
        failure=[op_to_pb(op) for op in failure],
    )


def keyvalue_from_pb(kv: Any) -> KeyValue:
    """Convert an ``mvccpb.KeyValue`` message."""
    return KeyValue(
        key=bytes(kv.key),
        value=bytes(kv.value),
        create_revision=int(kv.create_revision),
        mod_revision=int(kv.mod_revision),
        version=int(kv.version),
    )


def event_from_pb(event: Any) -> WatchEvent:
    """Convert an ``mvccpb.Event`` message."""
    kind: Literal["put", "delete"] = "delete" if event.type == rpc.Event.DELETE else "put"
    return WatchEvent(type=kind, kv=keyvalue_from_pb(event.kv))


# etcd's messages (api/v3rpc/rpctypes) that mean "authenticate again and retry":
# the simple token expired, the auth store changed under the token, or no token
# was sent because none was held yet.
_REAUTH_MARKERS: Final = (
    "invalid auth token",
    "revision of auth store is old",
    "user name is empty",
)

# Refusals that retrying cannot fix; used where there is no status code (a
# watch cancel reason) and for codes that are otherwise transient.
_REJECTED_MARKERS: Final = (
    "permission denied",
    "invalid auth token",
    "user name is empty",
    "authentication failed",
    "authentication is not enabled",
)

# Codes meaning "this endpoint cannot serve now": try another, or later.
FAILOVER_CODES: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# gRPC's words for a call that failed while connecting, before any byte of the
# request was written: the channel had no connection ("failed to connect to
# all addresses" is how a call on a channel in TRANSIENT_FAILURE fails fast),
# or the connection was refused. A request can only be written on an
# established connection, so such a call never reached etcd, and even a
# transaction may be sent to another member. A broken connection after
# sending ("Socket closed", "Connection reset by peer", "GOAWAY") is not here.
_NEVER_SENT_MARKERS: Final = (
    "failed to connect to all addresses",
    "connection refused",
)

# Codes meaning a transient failure of the server or the connection; everything
# else (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED, ...) is a refusal.
_TRANSIENT_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
        # "too many requests" and "database space exceeded" (NOSPACE alarm):
        # the cluster cannot take writes now, an operator or time fixes it.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def never_sent(code: grpc.StatusCode | None, details: str) -> bool:
    """Whether a failed call provably never reached the server (see ``_NEVER_SENT_MARKERS``).

    Only ``UNAVAILABLE`` qualifies: a deadline that passed while connecting
    looks the same as one that passed while etcd was applying the request.
    """
    if code != grpc.StatusCode.UNAVAILABLE:
        return False
    lowered = details.lower()
    return any(marker in lowered for marker in _NEVER_SENT_MARKERS)


def needs_reauth(details: str) -> bool:
    """Whether etcd's error message says the auth token must be renewed."""
    lowered = details.lower()
    return any(marker in lowered for marker in _REAUTH_MARKERS)


def error_from_status(code: grpc.StatusCode | None, details: str, *, endpoint: str) -> EtcdError:
    """Map a gRPC status (or, with ``code=None``, a bare etcd message) to an exception.

    The message names the endpoint and keeps etcd's own words, which never
    contain values.
    """
    text = " ".join(details.split())[:_MAX_DETAIL] or (code.name if code else "unknown error")
    lowered = text.lower()
    where = f"etcd {endpoint}"
    if "too many operations in txn request" in lowered:
        return TooManyOps(
            f"{where}: the transaction has more operations than the server allows "
            f"(--max-txn-ops, 128 by default): {text}"
        )
    if "request is too large" in lowered or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in lowered
    ):
        return RequestTooLarge(
            f"{where}: the request is larger than the server accepts "
            f"(--max-request-bytes, 1.5 MiB by default): {text}"
        )
    if "compacted" in lowered and code in (None, grpc.StatusCode.OUT_OF_RANGE):
        return Compacted(0, f"{where}: {text}")
    if "not leader" in lowered or "no leader" in lowered or "leader changed" in lowered:
        # FAILED_PRECONDITION "not leader" is a transient election state.
        return EtcdUnavailable(f"{where}: {text}")
    if code is None:
        if any(marker in lowered for marker in _REJECTED_MARKERS):
            return EtcdRejected(f"{where}: {text}")
        return EtcdUnavailable(f"{where}: {text}")
    if code in _TRANSIENT_CODES:
        return EtcdUnavailable(f"{where}: {code.name}: {text}")
    return EtcdRejected(f"{where}: {code.name}: {text}")
