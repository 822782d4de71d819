"""clients/etcd"""
