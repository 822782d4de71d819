"""Unit tests for the pure parts of the etcd client: settings, error mapping, messages.

The client is split into plain values (:mod:`tether.clients.etcd.values`), errors
(:mod:`tether.clients.etcd.errors`), wire conversions (:mod:`tether.clients.etcd.wire`) and
the connection settings (:mod:`tether.clients.etcd.connection`); each is tested here
without a server.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from aetcd import rpc

from tether import errors
from tether.clients.etcd import values, wire
from tether.clients.etcd.connection import EtcdConnection
from tether.clients.etcd.errors import (
    Compacted,
    EtcdRejected,
    EtcdUnavailable,
    RequestTooLarge,
    TooManyOps,
)
from tether.clients.etcd.values import Compare, Delete, KeyValue, Put

# --------------------------------------------------------------------------- from_env


def test_from_env_defaults_to_local_plaintext_etcd() -> None:
    conn = EtcdConnection.from_env({})
    assert conn.endpoints == ("http://127.0.0.1:2379",)
    assert conn.ca_cert is conn.cert is conn.key is None
    assert conn.username is conn.password is None
    assert conn.timeout == 5.0


def test_from_env_blank_endpoints_mean_default() -> None:
    assert EtcdConnection.from_env({"ETCD_ENDPOINTS": "  "}).endpoints == ("http://127.0.0.1:2379",)


def test_from_env_splits_and_normalizes_endpoints() -> None:
    conn = EtcdConnection.from_env(
        {"ETCD_ENDPOINTS": "http://127.0.0.1:2379, 127.0.0.1:22379 ,https://localhost:32379/"}
    )
    assert conn.endpoints == (
        "http://127.0.0.1:2379",
        "http://127.0.0.1:22379",
        "https://localhost:32379",
    )


def test_from_env_accepts_ipv6_literals() -> None:
    conn = EtcdConnection.from_env({"ETCD_ENDPOINTS": "[::1]:2379"})
    assert conn.endpoints == ("http://[::1]:2379",)


def test_bare_endpoint_uses_https_when_tls_files_are_set(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    conn = EtcdConnection.from_env({"ETCD_ENDPOINTS": "127.0.0.1:2379", "ETCD_CACERT": str(ca)})
    assert conn.endpoints == ("https://127.0.0.1:2379",)
    assert conn.ca_cert == str(ca)


def test_https_without_ca_uses_system_roots() -> None:
    conn = EtcdConnection.from_env({"ETCD_ENDPOINTS": "https://etcd.example:2379"})
    assert conn.endpoints == ("https://etcd.example:2379",)
    assert conn.ca_cert is None


def test_from_env_reads_client_certificate_and_credentials(tmp_path: Path) -> None:
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("x")
    conn = EtcdConnection.from_env(
        {
            "ETCD_ENDPOINTS": "https://127.0.0.1:2379",
            "ETCD_CERT": str(tmp_path / "cert.pem"),
            "ETCD_KEY": str(tmp_path / "key.pem"),
            "ETCD_USERNAME": "tether",
            "ETCD_PASSWORD": " s3cret ",
        }
    )
    assert conn.cert == str(tmp_path / "cert.pem")
    assert conn.key == str(tmp_path / "key.pem")
    assert conn.username == "tether"
    assert conn.password == " s3cret "  # passwords are taken verbatim


def test_password_is_not_in_repr() -> None:
    conn = EtcdConnection(endpoints=("http://127.0.0.1:2379",), username="u", password="hunter2")
    assert "hunter2" not in repr(conn)


@pytest.mark.parametrize(
    ("endpoints", "fragment"),
    [
        ("unix:///var/run/etcd.sock", "http:// or https://"),
        ("grpc://127.0.0.1:2379", "http:// or https://"),
        ("http://127.0.0.1", "needs a port"),
        ("http://:2379", "no host"),
        ("http://127.0.0.1:2379/v3", "no path"),
        ("http://127.0.0.1:99999", "not a valid endpoint"),
        ("http://127.0.0.1:abc", "not a valid endpoint"),
        ("http://127.0.0.1:0", "port 0"),
        ("http://user:pw@127.0.0.1:2379", "ETCD_USERNAME"),
        ("http://127.0.0.1:2379,,http://127.0.0.1:2380", "empty entry"),
    ],
)
def test_from_env_rejects_bad_endpoints(endpoints: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="ETCD_ENDPOINTS") as info:
        EtcdConnection.from_env({"ETCD_ENDPOINTS": endpoints})
    assert fragment in str(info.value)


def test_credentials_in_endpoint_are_not_echoed() -> None:
    with pytest.raises(ValueError) as info:
        EtcdConnection.from_env({"ETCD_ENDPOINTS": "http://user:hunter2@127.0.0.1:2379"})
    assert "hunter2" not in str(info.value)


def test_cert_without_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    with pytest.raises(ValueError, match="ETCD_KEY"):
        EtcdConnection.from_env(
            {"ETCD_ENDPOINTS": "https://127.0.0.1:2379", "ETCD_CERT": str(tmp_path / "cert.pem")}
        )


def test_key_without_cert_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    with pytest.raises(ValueError, match="ETCD_CERT"):
        EtcdConnection.from_env(
            {"ETCD_ENDPOINTS": "https://127.0.0.1:2379", "ETCD_KEY": str(tmp_path / "key.pem")}
        )


def test_username_without_password_is_an_error() -> None:
    with pytest.raises(ValueError, match="ETCD_PASSWORD"):
        EtcdConnection.from_env({"ETCD_USERNAME": "root"})


def test_password_without_username_is_an_error() -> None:
    with pytest.raises(ValueError, match="ETCD_USERNAME"):
        EtcdConnection.from_env({"ETCD_PASSWORD": "pw"})


def test_missing_tls_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match=f"ETCD_CACERT={missing}: no such file"):
        EtcdConnection.from_env({"ETCD_CACERT": str(missing)})


def test_tls_files_with_plaintext_endpoint_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    with pytest.raises(ValueError, match="plaintext"):
        EtcdConnection.from_env(
            {"ETCD_ENDPOINTS": "http://127.0.0.1:2379", "ETCD_CACERT": str(tmp_path / "ca.pem")}
        )


def test_constructor_validates_too() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        EtcdConnection(endpoints=())
    with pytest.raises(ValueError, match="http:// or https://"):
        EtcdConnection(endpoints=("127.0.0.1:2379",))
    with pytest.raises(ValueError, match="timeout"):
        EtcdConnection(endpoints=("http://127.0.0.1:2379",), timeout=0)


# --------------------------------------------------------------------------- error mapping

EP = "http://127.0.0.1:2379"


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", EtcdUnavailable),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: no leader", EtcdUnavailable),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out", EtcdUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", EtcdUnavailable),
        (grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: not leader", EtcdUnavailable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: too many requests", EtcdUnavailable),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "etcdserver: mvcc: database space exceeded",
            EtcdUnavailable,
        ),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", EtcdUnavailable),
        (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied", EtcdRejected),
        (grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token", EtcdRejected),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: authentication failed, invalid user ID or password",
            EtcdRejected,
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: duplicate key given in txn", EtcdRejected),
        (grpc.StatusCode.UNIMPLEMENTED, "unknown service etcdserverpb.KV", EtcdRejected),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "etcdserver: too many operations in txn request",
            TooManyOps,
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large", RequestTooLarge),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "grpc: received message larger than max (3145800 vs. 2097152)",
            RequestTooLarge,
        ),
        (
            grpc.StatusCode.OUT_OF_RANGE,
            "etcdserver: mvcc: required revision has been compacted",
            Compacted,
        ),
        (
            grpc.StatusCode.OUT_OF_RANGE,
            "etcdserver: mvcc: required revision is a future revision",
            EtcdRejected,
        ),
    ],
)
def test_error_from_status(code: grpc.StatusCode, details: str, expected: type[Exception]) -> None:
    error = wire.error_from_status(code, details, endpoint=EP)
    assert type(error) is expected
    assert EP in str(error)


def test_specific_rejections_are_rejections() -> None:
    assert issubclass(TooManyOps, EtcdRejected)
    assert issubclass(RequestTooLarge, EtcdRejected)
    assert not issubclass(Compacted, EtcdRejected | EtcdUnavailable)


def test_etcd_errors_speak_the_shared_vocabulary() -> None:
    """The skeleton maps the shared bases; etcd's errors must be subclasses of them."""
    assert issubclass(EtcdUnavailable, errors.BackendUnavailable)
    assert issubclass(EtcdRejected, errors.BackendRejected)
    assert issubclass(TooManyOps, errors.TooManyOperations)
    assert issubclass(RequestTooLarge, errors.RequestTooLarge)
    assert not issubclass(EtcdUnavailable, errors.BackendRejected)
    assert not issubclass(EtcdRejected, errors.BackendUnavailable)


def test_messages_explain_the_server_limit() -> None:
    too_many = wire.error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: too many operations in txn request",
        endpoint=EP,
    )
    assert "--max-txn-ops" in str(too_many)
    too_large = wire.error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: request is too large", endpoint=EP
    )
    assert "--max-request-bytes" in str(too_large)


def test_long_server_messages_are_truncated() -> None:
    error = wire.error_from_status(grpc.StatusCode.UNKNOWN, "x" * 10_000, endpoint=EP)
    assert len(str(error)) < 500


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("etcdserver: permission denied", EtcdRejected),
        ("etcdserver: invalid auth token", EtcdRejected),
        ("etcdserver: no leader", EtcdUnavailable),
        ("something unexpected", EtcdUnavailable),
    ],
)
def test_watch_cancel_reasons(reason: str, expected: type[Exception]) -> None:
    assert type(wire.error_from_status(None, reason, endpoint=EP)) is expected


@pytest.mark.parametrize(
    ("details", "expected"),
    [
        ("etcdserver: invalid auth token", True),
        ("etcdserver: revision of auth store is old", True),
        ("etcdserver: user name is empty", True),
        ("etcdserver: permission denied", False),
        ("etcdserver: authentication failed, invalid user ID or password", False),
    ],
)
def test_needs_reauth(details: str, expected: bool) -> None:
    assert wire.needs_reauth(details) is expected


_REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2379: "
    "Failed to connect to remote host: Connection refused"
)


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        # gRPC's words (1.85, measured) for a call on a channel that could not
        # connect: nothing was written, a transaction may go to the next member.
        (grpc.StatusCode.UNAVAILABLE, _REFUSED, True),
        (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: timeout", True),
        (grpc.StatusCode.UNAVAILABLE, "ipv4:127.0.0.1:2379: Connection refused", True),
        # The connection broke after sending, or etcd itself answered: unknown.
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", False),
        (grpc.StatusCode.UNAVAILABLE, "recvmsg:Connection reset by peer", False),
        (grpc.StatusCode.UNAVAILABLE, "GOAWAY received", False),
        (grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed", False),
        (grpc.StatusCode.UNAVAILABLE, "", False),
        # A deadline is never proof: it passes the same way while etcd applies.
        (grpc.StatusCode.DEADLINE_EXCEEDED, _REFUSED, False),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", False),
        (grpc.StatusCode.UNKNOWN, _REFUSED, False),
        (None, "connection refused", False),
    ],
)
def test_never_sent(code: grpc.StatusCode | None, details: str, expected: bool) -> None:
    assert wire.never_sent(code, details) is expected


def test_compacted_carries_the_revision() -> None:
    error = Compacted(42)
    assert error.compact_revision == 42
    assert "42" in str(error)


# --------------------------------------------------------------------------- protobuf building


@pytest.mark.parametrize(
    ("target", "value", "pb_target", "pb_field"),
    [
        ("version", 0, rpc.Compare.VERSION, "version"),
        ("create", 7, rpc.Compare.CREATE, "create_revision"),
        ("mod", 9, rpc.Compare.MOD, "mod_revision"),
        ("value", b"v", rpc.Compare.VALUE, "value"),
    ],
)
def test_compare_targets(target: str, value: int | bytes, pb_target: int, pb_field: str) -> None:
    message = wire.compare_to_pb(Compare(b"/k", target, "=", value))  # type: ignore[arg-type]
    assert message.key == b"/k"
    assert message.target == pb_target
    assert message.result == rpc.Compare.EQUAL
    assert message.WhichOneof("target_union") == pb_field
    assert getattr(message, pb_field) == value


@pytest.mark.parametrize(
    ("op", "pb_result"),
    [
        ("=", rpc.Compare.EQUAL),
        ("!=", rpc.Compare.NOT_EQUAL),
        ("<", rpc.Compare.LESS),
        (">", rpc.Compare.GREATER),
    ],
)
def test_compare_operators(op: str, pb_result: int) -> None:
    message = wire.compare_to_pb(Compare(b"/k", "mod", op, 3))  # type: ignore[arg-type]
    assert message.result == pb_result


def test_compare_rejects_mismatched_operands() -> None:
    with pytest.raises(TypeError, match="needs bytes"):
        Compare(b"/k", "value", "=", 3)
    with pytest.raises(TypeError, match="needs an int"):
        Compare(b"/k", "mod", "=", b"3")
    with pytest.raises(TypeError, match="needs an int"):
        Compare(b"/k", "version", "=", True)
    with pytest.raises(ValueError, match="unknown operator"):
        Compare(b"/k", "mod", "<=", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown target"):
        Compare(b"/k", "lease", "=", 3)  # type: ignore[arg-type]


def test_compare_error_does_not_echo_the_value() -> None:
    with pytest.raises(TypeError) as info:
        Compare(b"/k", "mod", "=", b"hunter2")
    assert "hunter2" not in str(info.value)


def test_values_are_not_in_reprs() -> None:
    assert "hunter2" not in repr(Put(b"/k", b"hunter2"))
    assert "hunter2" not in repr(Compare(b"/k", "value", "=", b"hunter2"))
    assert "hunter2" not in repr(KeyValue(b"/k", b"hunter2", 1, 2, 1))


def test_txn_request() -> None:
    message = wire.txn_to_pb(
        [Compare(b"/a", "version", "=", 0)],
        [Put(b"/a", b"1"), Delete(b"/b")],
        [Delete(b"/c")],
    )
    assert len(message.compare) == 1
    assert message.success[0].WhichOneof("request") == "request_put"
    assert message.success[0].request_put.key == b"/a"
    assert message.success[0].request_put.value == b"1"
    assert message.success[1].WhichOneof("request") == "request_delete_range"
    assert message.success[1].request_delete_range.key == b"/b"
    # A single-key delete: no range_end, or it would delete a range.
    assert message.success[1].request_delete_range.range_end == b""
    assert message.failure[0].request_delete_range.key == b"/c"


def test_op_to_pb_rejects_other_types() -> None:
    with pytest.raises(TypeError):
        wire.op_to_pb(Compare(b"/k", "mod", "=", 1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"/app/", b"/app0"),
        (b"a", b"b"),
        (b"a\xff", b"b"),
        (b"a\xfe", b"a\xff"),
        (b"\xff\xff", b"\0"),
        (b"", b"\0"),
    ],
)
def test_prefix_range_end(prefix: bytes, end: bytes) -> None:
    assert values.prefix_range_end(prefix) == end


def test_event_conversion() -> None:
    put = rpc.Event(
        type=rpc.Event.PUT,
        kv=rpc.KeyValue(key=b"/k", value=b"v", create_revision=2, mod_revision=3, version=2),
    )
    delete = rpc.Event(type=rpc.Event.DELETE, kv=rpc.KeyValue(key=b"/k", mod_revision=4))
    assert wire.event_from_pb(put) == values.WatchEvent(
        "put", KeyValue(b"/k", b"v", create_revision=2, mod_revision=3, version=2)
    )
    converted = wire.event_from_pb(delete)
    assert converted.type == "delete"
    assert converted.kv.value == b""
    assert converted.kv.mod_revision == 4
