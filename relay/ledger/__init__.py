"""Accounting: the usage records and backend interfaces, the ledger service that writes them,
the SQLite/PostgreSQL/JSON-lines backends and their plugins, pricing, monthly quotas, usage
triggers and their webhooks, retention and the report reader.

Layer 4: imports `relay.storage` and below; never `relay.auth`, `relay.net` or higher.
"""
