"""Pure: is ``CONSUL_HTTP_ADDR`` one agent, as the agent API assumes?

Registrations go through the agent API and drift is scanned on the same
agent. Behind a load balancer (or a Kubernetes Service over several agents or
servers) the calls land on different nodes: a registration made on one node is
"missing" on the next, and is written again and again. The agent names its
node in ``/v1/agent/self``; a name that keeps changing between calls gives it
away. One change alone is allowed (an agent replaced by a new one); a second
within the window is not.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# Two node changes within this many seconds: several agents behind one address.
WINDOW_SECONDS = 600.0


@dataclass
class NodeTracker:
    """The agent node names seen, and when the name changed."""

    url: str
    current: str | None = None
    previous: str | None = None
    changes: deque[float] = field(default_factory=deque)

    def seen(self, node: str, now: float) -> str | None:
        """Record one answer's node name; a message when the address is load-balanced."""
        if not node:
            return None  # unknown (no agent:read): nothing to compare
        if self.current is not None and node != self.current:
            self.previous = self.current
            self.changes.append(now)
        self.current = node
        while self.changes and now - self.changes[0] > WINDOW_SECONDS:
            self.changes.popleft()
        if len(self.changes) < 2:
            return None
        return (
            f"CONSUL_HTTP_ADDR={self.url} reaches several Consul agents (answered as node "
            f"{self.previous!r}, then {self.current!r}): registrations made through the agent API "
            "land on one node and are missing on the next. Point CONSUL_HTTP_ADDR at one agent — "
            "the client agent on the operator's node (status.hostIP:8500) or one agent's own "
            "address — not at a load balancer or a Service over several agents or servers"
        )
