"""Authentication through twisted.cred: the cred interfaces and realm around the core's pure
credentials, the static, TURN REST secret and account database checkers, their plugins, and the
REST credentials (tokens) format.

Layer 4: imports `relay.storage` and below; never `relay.ledger`, `relay.net` or higher.
"""
