"""config/stores"""
