"""The sans-IO TURN server (RFC 8656, RFC 6062): allocations, permissions, channels, TCP
relay connections, nonces, peer rules, budgets, and the pure credentials a login verifies.

Bytes and the time come in as arguments, actions go out through callables handed in; the
Twisted adapters in `relay.net` do the I/O.  Layer 2: imports `relay.proto` and `relay.util`
only.  No Twisted, no sockets, no wall clock.
"""
