"""Plain values of the etcd v3 API: keys, compares, puts, deletes, watch events.

No gRPC here: the wire conversions live in :mod:`tether.clients.etcd.wire`, so code
that only reasons about etcd data never loads the client's libraries.
Values are bytes and may be Secret data; they are left out of every repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it. ``value`` is left out of the repr: it may be a secret."""

    key: bytes
    value: bytes = field(repr=False)
    create_revision: int
    mod_revision: int
    version: int


CompareTarget = Literal["version", "create", "mod", "value"]
CompareOp = Literal["=", "!=", "<", ">"]
COMPARE_TARGETS: Final = frozenset({"version", "create", "mod", "value"})
COMPARE_OPS: Final = frozenset({"=", "!=", "<", ">"})


@dataclass(frozen=True)
class Compare:
    """A transaction guard: ``target`` of ``key`` compared with ``value`` by ``op``.

    ``version``, ``create`` and ``mod`` compare integers (``version = 0`` and
    ``create = 0`` mean "the key does not exist"); ``value`` compares bytes.
    """

    key: bytes
    target: CompareTarget
    op: CompareOp
    value: int | bytes = field(repr=False)

    def __post_init__(self) -> None:
        if self.target not in COMPARE_TARGETS:
            raise ValueError(f"compare on {self.key!r}: unknown target {self.target!r}")
        if self.op not in COMPARE_OPS:
            raise ValueError(f"compare on {self.key!r}: unknown operator {self.op!r}")
        if self.target == "value":
            if not isinstance(self.value, bytes):
                raise TypeError(f"compare on {self.key!r}: a value compare needs bytes")
        elif isinstance(self.value, bool) or not isinstance(self.value, int):
            # bool is an int subclass; True as a revision is always a mistake.
            raise TypeError(f"compare on {self.key!r}: a {self.target} compare needs an int")


@dataclass(frozen=True)
class Put:
    """Set ``key`` to ``value`` inside a transaction; ``lease``: attach it to that lease (0: none)."""

    key: bytes
    value: bytes = field(repr=False)
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    """Delete ``key`` (one key, not a range) inside a transaction."""

    key: bytes


@dataclass(frozen=True)
class TxnResult:
    """Whether the compares held, and the store revision after the transaction."""

    succeeded: bool
    revision: int


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched prefix.

    For ``delete``, ``kv.value`` is empty and ``kv.mod_revision`` is the
    revision of the deletion.
    """

    type: Literal["put", "delete"]
    kv: KeyValue


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that makes a Range or Watch cover every key starting with ``prefix``.

    That is the prefix with its last byte below 0xff incremented and what
    follows dropped; with no such byte (empty prefix, all 0xff) etcd's ``\\0``
    means "to the end of the keyspace".
    """
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"
