"""The etcd client's errors, as subclasses of Tether's one error vocabulary.

:class:`EtcdUnavailable` is a :class:`~tether.errors.BackendUnavailable` and
:class:`EtcdRejected` a :class:`~tether.errors.BackendRejected`, so the shared
skeleton maps them to conditions without knowing etcd.
"""

from __future__ import annotations

from tether import errors
from tether.errors import BackendError, BackendRejected, BackendUnavailable


class EtcdError(BackendError):
    """Base class of every error this client raises for etcd's sake."""


class EtcdUnavailable(EtcdError, BackendUnavailable):
    """etcd could not be reached or could not serve the request now; retry later."""


class EtcdRejected(EtcdError, BackendRejected):
    """etcd refused the request itself (permissions, credentials, invalid request)."""


class TooManyOps(EtcdRejected, errors.TooManyOperations):
    """The transaction has more operations than the server's ``--max-txn-ops``."""


class RequestTooLarge(EtcdRejected, errors.RequestTooLarge):
    """The request is larger than the server's ``--max-request-bytes``."""


class Compacted(EtcdError):
    """The requested revision was compacted; list again and watch from the new revision."""

    def __init__(self, compact_revision: int, message: str | None = None) -> None:
        self.compact_revision = compact_revision
        super().__init__(message or f"etcd revision has been compacted (compact revision {compact_revision})")
