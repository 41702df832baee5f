from twisted.application.service import ServiceMaker

turnrelay = ServiceMaker("turnrelay", "relay.tap", "STUN/TURN relay (RFC 8489, RFC 8656)", "turnrelay")
