"""The configuration engine shared by EtcdConfig and ConsulConfig (values, planner, reconciler)."""
