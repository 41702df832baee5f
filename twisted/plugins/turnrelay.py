from twisted.application.service import ServiceMaker

from relay.auth.plugins import db, rest_secret, static  # noqa: F401  (found by getPlugins)
from relay.ledger.plugins import jsonl_usage, postgresql_usage, sqlite_usage  # noqa: F401

turnrelay = ServiceMaker("turnrelay", "relay.service.tap", "STUN/TURN relay (RFC 8489, RFC 8656)",
                         "turnrelay")
