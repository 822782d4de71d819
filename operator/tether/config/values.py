"""Store-neutral values of the configuration engine: entries, guards, operations.

A key-value store that offers guarded multi-key transactions (etcd's
``Txn`` with ``mod_revision`` compares, Consul's ``/v1/txn`` with
``ModifyIndex`` check-and-set) is described to the planner with these types;
each store's adapter translates them to its wire form. ``revision`` is the
store's per-key modification stamp (etcd ``mod_revision``, Consul
``ModifyIndex``); 0 means "the key does not exist".

Values are bytes and may be Secret data: they are left out of every repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """One key as the store holds it."""

    key: str
    value: bytes = field(repr=False)
    revision: int


@dataclass(frozen=True)
class Guard:
    """The key is still as it was read: at ``revision``, or absent when it is 0."""

    key: str
    revision: int

    @property
    def absent(self) -> bool:
        return self.revision == 0


@dataclass(frozen=True)
class Put:
    """Set ``key`` to ``value``."""

    key: str
    value: bytes = field(repr=False)


@dataclass(frozen=True)
class Delete:
    """Delete exactly ``key`` (never a range or a tree)."""

    key: str


Op = Put | Delete


@dataclass(frozen=True)
class Committed:
    """What one transaction did: whether its guards held, and the store's stamp after it.

    ``revision`` is the revision/index every operation of the transaction
    carries (0 when the store did not say, e.g. a Consul transaction of
    deletes only).
    """

    succeeded: bool
    revision: int


@dataclass(frozen=True)
class Change:
    """A change a store's watch reported: the key's new value, or None when deleted."""

    key: str
    value: bytes | None = field(repr=False)
