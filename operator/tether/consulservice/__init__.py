"""ConsulService: planner (pure), agent adapter (I/O), reconciler and watcher."""
