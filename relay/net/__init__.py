"""The Twisted adapters: UDP/TCP/TLS client listeners and their login dispatcher, relay sockets,
RFC 6062 stream relays, and the TLS context.

Layer 5: imports `relay.auth`, `relay.ledger` and below; never `relay.web` or higher.
"""
