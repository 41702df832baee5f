"""Compatibility: the usage backend names third-party ledger plugins import from here, now kept
in `relay.ledger.records`."""
from relay.ledger.records import (  # noqa: F401
                                  END_REASONS,
                                  IClientAddressRetention,
                                  IUsageBackend,
                                  IUsageBackendFactory,
                                  Record,
                                  SessionEnded,
                                  SessionStarted,
                                  UsageDelta,
                                  as_dict,
)
