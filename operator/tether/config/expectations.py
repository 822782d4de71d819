"""What every managed key should hold, shared by a config kind and its store's watcher.

Each reconcile registers, *before* it reads the store, a digest of the value
every key it manages should hold (``None``: the key should be absent). A
watcher hands in the changes its store reports; a change whose value differs
from what some resource expects names that resource. Registering before
reading closes the race in which an edit lands between the read and the
registration. Tether's own writes carry the registered values, so they wake
nobody.

Only digests are kept: values may be Secret data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

from tether.api import ObjectRef
from tether.config.values import Change


def digest(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=16).digest()


def root_of(key: str) -> str:
    """The first path segment of ``key`` with its separators (``/app/``, ``shop/``)."""
    leading = "/" if key.startswith("/") else ""
    head, sep, _ = key[len(leading):].partition("/")
    return leading + head + sep


class Expectations:
    """Managed key → the resources that manage it and the digest each expects."""

    def __init__(self) -> None:
        # Usually one resource per key; two while both declare a key and one of
        # them is about to find itself in conflict.
        self._expect: dict[str, tuple[tuple[ObjectRef, bytes | None], ...]] = {}
        self._tracked: dict[ObjectRef, dict[str, bytes | None]] = {}
        self._known: set[ObjectRef] = set()
        self._listeners: list[Callable[[], None]] = []
        # Managed keys per root, kept as keys come and go: the root watchers
        # ask for the roots after every change, and recomputing them from every
        # key made each new resource cost O(all keys) — O(N²) to converge N.
        self._roots: dict[str, int] = {}

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever the set of roots changes (a root appears or empties)."""
        self._listeners.append(listener)

    def roots(self) -> set[str]:
        """The roots of every managed key (:func:`root_of`)."""
        return set(self._roots)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def expected(self, ref: ObjectRef) -> Mapping[str, bytes | None] | None:
        return self._tracked.get(ref)

    def track(self, ref: ObjectRef, expected: dict[str, bytes | None]) -> None:
        self.untrack(ref)
        self._known.add(ref)
        self._tracked[ref] = expected
        new_root = False
        for key, value in expected.items():
            before = self._expect.get(key, ())
            if not before:
                root = root_of(key)
                count = self._roots.get(root, 0)
                new_root = new_root or count == 0
                self._roots[root] = count + 1
            self._expect[key] = (*before, (ref, value))
        if new_root:
            self._notify()

    def untrack(self, ref: ObjectRef) -> None:
        """Stop watching ``ref``'s keys (its own deletions must not look like drift)."""
        gone_root = False
        for key in self._tracked.pop(ref, {}):
            rest = tuple(entry for entry in self._expect.get(key, ()) if entry[0] != ref)
            if rest:
                self._expect[key] = rest
            elif self._expect.pop(key, None) is not None:
                root = root_of(key)
                self._roots[root] -= 1
                if not self._roots[root]:
                    del self._roots[root]
                    gone_root = True
        if gone_root:
            self._notify()

    def seen(self, ref: ObjectRef) -> None:
        """``ref`` was reconciled: re-check it after a watch lost events."""
        self._known.add(ref)

    def forget(self, ref: ObjectRef) -> None:
        self.untrack(ref)
        self._known.discard(ref)

    def drifted(self, changes: Iterable[Change]) -> set[ObjectRef]:
        """Resources owning a key that a change left different from what they want."""
        out: set[ObjectRef] = set()
        for change in changes:
            entries = self._expect.get(change.key)
            if not entries:
                continue
            actual = None if change.value is None else digest(change.value)
            out.update(ref for ref, wanted in entries if wanted != actual)
        return out

    def managed_keys(self) -> Iterable[str]:
        """Every key some resource expects (what a store's watcher must cover)."""
        return self._expect.keys()

    def under(self, prefix: str) -> list[ObjectRef]:
        """Resources that manage some key starting with ``prefix``."""
        return sorted(
            ref for ref, keys in self._tracked.items() if any(key.startswith(prefix) for key in keys)
        )

    def known(self) -> list[ObjectRef]:
        """Every resource reconciled and not yet forgotten (to re-check after lost events)."""
        return sorted(self._known)

    def tracked_count(self) -> int:
        return len(self._tracked)
