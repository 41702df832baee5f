"""Command-line tools: `turnrelay` (accounts, tokens, usage, probe) and the blocking TURN
client it and the tests use.

Layer 8, the top: imports any layer.
"""
