"""clients/kube"""
