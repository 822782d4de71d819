"""Where a credential sent without TLS may go: the one loopback rule of every client's settings.

Pure (no I/O library), so that the connection settings, in the pure core,
may use it. A token or password over plain HTTP is refused by nobody but
warned about at start-up, unless the address is a loopback one.
"""

from __future__ import annotations

import ipaddress


def loopback(host: str) -> bool:
    """A loopback host (``localhost``, 127.0.0.0/8, ``::1``): cleartext never leaves the
    machine (or the Pod). ``host`` is a bare host name or address, without brackets."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
