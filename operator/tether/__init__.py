"""Tether: Kubernetes custom resources as the source of truth for Consul and etcd."""

__version__ = "0.1.0"
