"""clients/consul"""
