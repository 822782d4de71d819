"""config/watchers"""
