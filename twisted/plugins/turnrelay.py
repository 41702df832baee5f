from twisted.application.service import ServiceMaker

from relay.authplugins import db, rest_secret, static  # noqa: F401  (found by getPlugins)

turnrelay = ServiceMaker("turnrelay", "relay.tap", "STUN/TURN relay (RFC 8489, RFC 8656)", "turnrelay")
