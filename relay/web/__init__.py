"""The HTTP side: one toolkit of replies and errors, the tokens, usage and triggers API, health,
metrics, the self-test page and the region directory.

Layer 6: imports `relay.net` and below; never `relay.service` or `relay.cli`.
"""
