"""Free loopback ports for the processes a test starts."""

from __future__ import annotations

from tether_dev import ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    Chosen as the dev stack chooses its own: at random from *below* the kernel's
    ephemeral range and checked bindable. A port the kernel picked (bind to port
    0) is an ephemeral one, and the kernel may hand it to any outgoing connection
    (a test's own HTTP calls) before the process it was meant for binds it: over
    a long fault run that race was lost once ("Address already in use").
    """
    return ports.allocate(1)[0]
