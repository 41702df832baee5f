"""Everything the tests share: real servers and their fixtures (`servers`), the account and
ledger databases (`db`, `postgres`), clients of a running relay (`relay_clients`,
`wire_client`, `aioice_client`, `api`, `cli`), the sans-IO core's harness (`core_harness`),
ledger readings (`accounting`), certificates (`certs`), hypothesis strategies, the blackbox
load and the Kubernetes control plane.  tests/conftest.py registers the modules holding
fixtures; test modules import from here, never from one another.
"""
