"""One error vocabulary for every backend, mapped to conditions in one place.

Adapters (the Consul and etcd clients, the Kubernetes facade) raise their own
errors, and each of them subclasses one of these bases. Each adapter picks
its error in one function, from what the call raised or the status it got
back (:func:`tether.clients.kube.http.kube_error`,
:func:`tether.clients.consul.client.consul_error`,
:func:`tether.clients.etcd.wire.error_from_status`). The shared skeleton
(:meth:`tether.reconciling.Outcome.from_error`) turns a base into the
``Ready`` condition's reason, so that a kind never decides by hand which
failure is retried and what it is called; nothing above the adapters looks
at a status code.
"""

from __future__ import annotations


class BackendError(Exception):
    """A call to an external system (Consul, etcd, Kubernetes) failed."""


class BackendUnavailable(BackendError):
    """The system could not be reached or could not serve the call now: retry later.

    Maps to ``Ready=False``, reason ``BackendUnavailable``, retried with backoff.
    """


class BackendRejected(BackendError):
    """The system answered "no" (permissions, limits, an invalid request).

    Maps to ``Ready=False``, reason ``BackendRejected``. Still retried with
    capped backoff: a fixed ACL policy or Role takes effect without a restart.
    """


class Contended(BackendError):
    """The backend kept changing under Tether's guarded writes (another writer).

    Maps to ``Ready=False``, reason ``Conflict``, retried with backoff.
    """


class TooManyOperations(BackendRejected):
    """A transaction had more operations than the server allows; send smaller ones."""


class RequestTooLarge(BackendRejected):
    """A request was larger than the server allows; send smaller ones."""
