"""The process: options, the twistd plugin's makeService, the services it composes, worker
processes and their shared quota book, host probing.

Layer 7: imports any layer below; only `relay.cli` imports it.
"""
