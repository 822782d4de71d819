"""Tether's benchmarks: ``make bench`` runs :mod:`benchmarks.run`.

They measure the operator against a real dev stack (kube-apiserver, etcd,
Consul) and against a *floor*: a plain script that makes the same writes with
no operator at all. They print figures and never assert wall time.
"""
