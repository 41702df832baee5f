"""The peer policy (no open relay into the operator's network) and stateless nonces."""
from __future__ import annotations

import base64

import pytest

from relay.core.nonces import (
    COOKIE,
    FEATURE_PASSWORD_ALGORITHMS,
    FEATURE_USERNAME_ANONYMITY,
    NonceIssuer,
    NonceStatus,
)
from relay.core.peers import OwnEndpoints, PeerPolicy, embedded_ipv4, parse_rule

FEATURES = FEATURE_PASSWORD_ALGORITHMS | FEATURE_USERNAME_ANONYMITY
SECRET, OLD_SECRET = b"k" * 32, b"o" * 32
NOW = 1_700_000_000.0
CLIENT = "198.51.100.20"


# -- PeerPolicy ---------------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111",
                                  "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                  "2002:808:808::1"])
def test_public_addresses_pass(host):
    assert PeerPolicy().permits(host)


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.255.0.9", "::1",                      # loopback
    "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1",  # RFC 1918
    "100.64.0.1", "169.254.169.254", "0.0.0.0", "192.0.0.8", "192.0.2.1", "198.18.0.1",
    "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::", "100::1", "2001:db8::1", "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",   # v4-mapped
    "64:ff9b::a00:1", "64:ff9b::7f00:1",                                # NAT64
    "2002:0a00:0001::1", "2002:a9fe:a9fe::1",                           # 6to4
    "::a00:1", "::7f00:1",                                              # v4-compatible
])
def test_forbidden_addresses_are_refused(host):
    assert not PeerPolicy().permits(host)


@pytest.mark.parametrize("host", ["", "not an address", "8.8.8", "1.2.3.4.5", "fe80::1%eth0x"])
def test_garbage_is_refused(host):
    assert not PeerPolicy().permits(host)


def test_allow_rules_beat_deny_rules():
    policy = PeerPolicy(allowed=["10.1.2.3"], denied=["10.0.0.0/8"])
    assert policy.permits("10.1.2.3")
    assert not policy.permits("10.1.2.4")


def test_allow_rules_beat_the_defaults():
    policy = PeerPolicy(allowed=["192.168.5.0/24", "fd00::/64"])
    assert policy.permits("192.168.5.7")
    assert policy.permits("fd00::5")
    assert not policy.permits("192.168.6.1")
    assert not policy.permits("fd00:0:0:1::5")


def test_deny_rules_beat_the_defaults():
    policy = PeerPolicy(denied=["8.8.8.0/24", "2606:4700::/32"])
    assert not policy.permits("8.8.8.8")
    assert not policy.permits("2606:4700::1111")
    assert policy.permits("8.8.4.4")


def test_deny_rules_apply_to_embedded_ipv4():
    policy = PeerPolicy(denied=["8.8.8.8"])
    assert not policy.permits("::ffff:8.8.8.8")
    assert not policy.permits("64:ff9b::808:808")


def test_allow_rule_range():
    policy = PeerPolicy(allowed=["10.0.0.5-10.0.0.9"])
    assert [policy.permits(f"10.0.0.{i}") for i in range(4, 11)] == \
        [False, True, True, True, True, True, False]


def test_allow_loopback():
    policy = PeerPolicy(allow_loopback=True)
    assert policy.permits("127.0.0.1") and policy.permits("127.8.9.10")
    assert policy.permits("::1") and policy.permits("::ffff:127.0.0.1")
    assert not policy.permits("10.0.0.1")
    assert not policy.permits("169.254.169.254")


def test_deny_rule_beats_allow_loopback():
    policy = PeerPolicy(denied=["127.0.0.53"], allow_loopback=True)
    assert not policy.permits("127.0.0.53")
    assert policy.permits("127.0.0.1")


def test_rules_of_the_other_family_do_not_match():
    policy = PeerPolicy(allowed=["::/0"])
    assert not policy.permits("10.0.0.1")
    assert PeerPolicy(denied=["0.0.0.0/0"]).permits("2606:4700::1111")


def test_cluster_networks_beat_allow_rules_and_allow_loopback():
    policy = PeerPolicy(allowed=["10.0.0.0/8"], cluster=["10.96.0.0/12", "fd00:10:96::/108",
                                                         "127.0.0.64/26"], allow_loopback=True)
    assert policy.permits("10.1.2.3") and policy.permits("127.0.0.1")
    for host in ("10.96.0.1", "10.111.255.254", "::ffff:10.96.0.10", "fd00:10:96::1",
                 "127.0.0.65"):
        assert not policy.permits(host), host


def test_own_endpoints_are_never_peers():
    own = OwnEndpoints(local=["203.0.113.7", "192.0.2.10"])
    own.add("127.0.0.1", 3478)
    own.add("::", 5349)          # a wildcard listener: every address of this host
    own.add("0.0.0.0", 9100)
    policy = PeerPolicy(allowed=["0.0.0.0/0", "::/0"], allow_loopback=True, own=own)
    for peer in [("127.0.0.1", 3478), ("::ffff:127.0.0.1", 3478), ("::127.0.0.1", 3478),
                 ("64:ff9b::7f00:1", 3478), ("2002:7f00:1::", 3478),
                 ("127.0.0.1", 5349), ("127.0.0.2", 5349), ("::1", 5349), ("::", 5349),
                 ("203.0.113.7", 5349), ("192.0.2.10", 9100), ("0.0.0.0", 9100),
                 ("0.0.0.0", 3478), ("::", 3478)]:
        assert peer in own and not policy.permits_peer(peer), peer
    # The same addresses on other ports, and other hosts on those ports, are peers like any.
    for peer in [("127.0.0.1", 3479), ("127.0.0.2", 3478), ("8.8.8.8", 5349),
                 ("203.0.113.7", 3478), ("garbage", 3478)]:
        assert peer not in own, peer
    assert policy.permits_peer(("127.0.0.1", 3479)) and policy.permits_peer(("8.8.8.8", 5349))


FIB_TRIE = """Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.2
              /32 host LOCAL
        |-- 192.0.2.255
           /32 link BROADCAST
"""
IF_INET6 = """fe8000000000000000fc00fffe000001 04 40 20 80     eth0
20010db8000000000000000000000007 04 40 00 82     eth0
"""


def test_a_wildcard_listener_covers_every_interface_address(tmp_path):
    from relay.service.host import local_addresses
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    found = local_addresses(str(tmp_path / "fib_trie"), str(tmp_path / "if_inet6"))
    assert found == ["127.0.0.1", "192.0.2.2", "fe80::fc:ff:fe00:1", "2001:db8::7"]
    assert local_addresses(str(tmp_path / "none"), str(tmp_path / "none")) == []
    own = OwnEndpoints(found)
    own.add("0.0.0.0", 3478)
    own.add("::", 3478)
    assert ("192.0.2.2", 3478) in own and ("2001:db8::7", 3478) in own
    assert ("192.0.2.255", 3478) not in own and ("192.0.2.2", 3479) not in own


@pytest.mark.parametrize("rule", ["10.0.0.9-10.0.0.5", "10.0.0.1-::1", "bogus", "10.0.0.0/33"])
def test_bad_rules_raise(rule):
    with pytest.raises(ValueError):
        parse_rule(rule)


def test_embedded_ipv4_forms():
    import ipaddress
    v6 = ipaddress.IPv6Address
    assert str(embedded_ipv4(v6("::ffff:1.2.3.4"))) == "1.2.3.4"
    assert str(embedded_ipv4(v6("2002:102:304::"))) == "1.2.3.4"
    assert str(embedded_ipv4(v6("64:ff9b::102:304"))) == "1.2.3.4"
    assert str(embedded_ipv4(v6("::102:304"))) == "1.2.3.4"
    assert embedded_ipv4(v6("::1")) is None and embedded_ipv4(v6("::")) is None
    assert embedded_ipv4(v6("2606:4700::1111")) is None


# -- NonceIssuer --------------------------------------------------------------------------------

def test_nonce_starts_with_the_cookie_and_features():
    nonce = NonceIssuer([SECRET], 600, FEATURES).issue(CLIENT, NOW)
    assert nonce.startswith(COOKIE + base64.b64encode(b"\xc0\x00\x00").decode())


def test_nonce_without_features_has_no_cookie():
    issuer = NonceIssuer([SECRET], 600, 0)
    nonce = issuer.issue(CLIENT, NOW)
    assert not nonce.startswith(COOKIE)
    assert issuer.check(nonce, CLIENT, NOW) is NonceStatus.VALID


def test_nonce_from_one_issuer_is_accepted_by_another_with_the_same_secret():
    nonce = NonceIssuer([SECRET], 600, FEATURES).issue(CLIENT, NOW)
    assert NonceIssuer([SECRET], 600, FEATURES).check(nonce, CLIENT, NOW + 5) is NonceStatus.VALID


def test_nonce_from_another_secret_is_invalid():
    nonce = NonceIssuer([OLD_SECRET], 600, FEATURES).issue(CLIENT, NOW)
    assert NonceIssuer([SECRET], 600, FEATURES).check(nonce, CLIENT, NOW) is NonceStatus.INVALID


def test_old_key_still_verifies_during_rotation():
    old_nonce = NonceIssuer([OLD_SECRET], 600, FEATURES).issue(CLIENT, NOW)
    rotated = NonceIssuer([SECRET, OLD_SECRET], 600, FEATURES)
    assert rotated.check(old_nonce, CLIENT, NOW) is NonceStatus.VALID
    # The first key signs: a process that has only the new key accepts the new nonces.
    new_nonce = rotated.issue(CLIENT, NOW)
    assert NonceIssuer([SECRET], 600, FEATURES).check(new_nonce, CLIENT, NOW) is NonceStatus.VALID
    assert NonceIssuer([OLD_SECRET], 600, FEATURES).check(new_nonce, CLIENT, NOW) is NonceStatus.INVALID


def test_nonce_for_another_client_ip_is_invalid():
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    nonce = issuer.issue(CLIENT, NOW)
    assert issuer.check(nonce, "198.51.100.21", NOW) is NonceStatus.INVALID
    assert issuer.check(nonce, "2001:db8::20", NOW) is NonceStatus.INVALID


def test_nonce_goes_stale_after_its_lifetime():
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    nonce = issuer.issue(CLIENT, NOW)
    assert issuer.check(nonce, CLIENT, NOW + 600) is NonceStatus.VALID
    assert issuer.check(nonce, CLIENT, NOW + 601) is NonceStatus.STALE


def test_nonce_from_a_fleet_member_slightly_ahead_is_valid():
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    nonce = issuer.issue(CLIENT, NOW + 30)
    assert issuer.check(nonce, CLIENT, NOW) is NonceStatus.VALID
    far_future = issuer.issue(CLIENT, NOW + 31)
    assert issuer.check(far_future, CLIENT, NOW) is NonceStatus.STALE


def test_stripping_the_feature_set_invalidates_the_nonce():
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    nonce = issuer.issue(CLIENT, NOW)
    body = nonce[len(issuer.prefix):]
    downgraded = COOKIE + base64.b64encode(b"\x00\x00\x00").decode() + body
    assert issuer.check(downgraded, CLIENT, NOW) is NonceStatus.INVALID
    assert issuer.check(body, CLIENT, NOW) is NonceStatus.INVALID
    # Another process that signs without features does not accept a featured nonce either.
    assert NonceIssuer([SECRET], 600, 0).check(nonce, CLIENT, NOW) is NonceStatus.INVALID


@pytest.mark.parametrize("mangle", [
    lambda n: n[:-2],
    lambda n: n[:-4],
    lambda n: n[:-10] + ("B" if n[-10] != "B" else "C") + n[-9:],    # a MAC bit
    lambda n: n[:14] + ("B" if n[14] != "B" else "C") + n[15:],      # a timestamp bit
    lambda n: n[:13] + "!!!!" + n[17:],
    lambda n: n[:13] + "\u00e9" * 4,
    lambda n: "",
])
def test_tampered_nonces_are_invalid(mangle):
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    nonce = issuer.issue(CLIENT, NOW)
    assert issuer.check(mangle(nonce), CLIENT, NOW) is NonceStatus.INVALID


def test_a_kept_nonce_still_goes_stale_and_stays_bound_to_its_ip(monkeypatch):
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    nonce = issuer.issue(CLIENT, NOW)
    assert issuer.check(nonce, CLIENT, NOW) is NonceStatus.VALID  # now kept
    macs = []
    monkeypatch.setattr(issuer, "_mac", lambda *args: macs.append(args) or b"x" * 12)
    assert issuer.check(nonce, CLIENT, NOW + 10) is NonceStatus.VALID
    assert macs == []  # the kept issue time, no MAC
    assert issuer.check(nonce, CLIENT, NOW + 601) is NonceStatus.STALE
    assert issuer.check(nonce, "192.0.2.99", NOW) is NonceStatus.INVALID


def test_kept_nonces_are_bounded():
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    issuer.KEPT = 3
    for n in range(10):
        ip = f"192.0.2.{n}"
        assert issuer.check(issuer.issue(ip, NOW), ip, NOW) is NonceStatus.VALID
        assert len(issuer._verified) <= 3


def test_kept_peer_verdicts_follow_new_rules_and_loopback():
    policy = PeerPolicy()
    assert policy.permits("8.8.8.8") and not policy.permits("127.0.0.1")
    policy.set_rules([], ["8.8.8.0/24"], [])
    assert not policy.permits("8.8.8.8")
    policy.allow_loopback = True
    assert policy.permits("127.0.0.1")
    policy.set_rules([], [], ["127.0.0.0/8"])
    assert not policy.permits("127.0.0.1") and policy.permits("8.8.8.8")


def test_kept_peer_verdicts_are_bounded():
    policy = PeerPolicy()
    policy.KEPT = 3
    for n in range(10):
        assert policy.permits(f"8.8.8.{n}")
        assert len(policy._verdicts) <= 3


def test_a_nonce_is_made_once_a_second_per_address_and_the_same_as_made_anew(monkeypatch):
    issuer = NonceIssuer([SECRET], 600, FEATURES)
    first = issuer.issue(CLIENT, NOW)
    macs = []
    mac = issuer._mac
    monkeypatch.setattr(issuer, "_mac", lambda *args: macs.append(args) or mac(*args))
    assert issuer.issue(CLIENT, NOW + 0.5) == first and macs == []
    assert issuer.issue("192.0.2.7", NOW) != first
    later = issuer.issue(CLIENT, NOW + 1)
    assert later != first
    assert later == NonceIssuer([SECRET], 600, FEATURES).issue(CLIENT, NOW + 1)
    assert issuer.check(later, CLIENT, NOW + 1) is NonceStatus.VALID
