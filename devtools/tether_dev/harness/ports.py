"""Free loopback ports for the processes a test starts."""

from __future__ import annotations

from tether_dev import ports

#: The wildcard address: the operator (and the other programs a test starts) listen
#: on every address, so a port is free only if nothing listens on *any* 127.0.0.x.
ANY = "0.0.0.0"


def free_port() -> int:
    """A TCP port that nothing listens on right now, on any address.

    Chosen as the dev stack chooses its own: at random from *below* the kernel's
    ephemeral range and checked bindable. A port the kernel picked (bind to port
    0) is an ephemeral one, and the kernel may hand it to any outgoing connection
    (a test's own HTTP calls) before the process it was meant for binds it: over
    a long fault run that race was lost once ("Address already in use").

    Checked on the wildcard address, not on 127.0.0.1: the operator's /metrics and
    health servers bind 0.0.0.0, and the HA stack's members listen on 127.0.0.10 and
    up. A port held by a member is free on 127.0.0.1 yet refused to a wildcard
    bind; a fault run that reached the start-up tests with the HA stack still up
    drew such a port once and the operator died with "Address already in use".
    """
    return ports.allocate(1, host=ANY)[0]
