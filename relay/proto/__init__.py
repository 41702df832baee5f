"""Wire formats, no state: the STUN codec (RFC 8489), ChannelData framing and SASLprep.

Layer 1: imports only `relay.util`.  No Twisted, no sockets, no clock.
"""
