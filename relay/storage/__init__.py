"""SQL storage shared by the account database and the usage ledger: connection pools for
SQLite and PostgreSQL, and the accounts, keys and usage triggers tables.

Layer 3: imports `relay.core`, `relay.proto`, `relay.util`.
"""
