"""etcd side of Tether: the EtcdConfig planner and its etcd client."""
