"""Redirects of new Allocates (relay.core.redirect, relay.service.redirects): a full or
draining relay sends them to the nearest healthy relay of its region, else of the nearest
serving region, never to itself, and answers 508 when nowhere is left."""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from relay.core.redirect import Alternate
from relay.proto import stun
from relay.service.redirects import RegionRedirects, region_tiers
from relay.web.regions import Region
from support.core_harness import Harness, error_code

# The four regions of docs/regions.md's worked example, at their cloud regions' coordinates.
REGIONS = {
    "us-east": Region("192.0.2.1", location=(38.94, -77.46)),
    "us-west": Region("192.0.2.2", location=(45.84, -119.70)),
    "eu-west": Region("turn-eu-west.example.org", location=(53.35, -6.26)),
    "ap-south": Region("192.0.2.4", location=(19.08, 72.88)),
}
EU = ("198.51.100.3", "2001:db8::3")  # what turn-eu-west.example.org resolves to


def full(**config) -> Harness:
    """A relay at its --total-quota of one allocation."""
    harness = Harness(total_quota=1, **config)
    harness.client(address=("198.51.100.9", 40000)).allocate_ok()
    return harness


def test_a_full_relay_redirects_to_a_relay_of_its_region_signed_and_counted():
    harness = full(alternate_servers=(("192.0.2.7", 3478),))
    client = harness.client()
    response = client.allocate()
    assert (error_code(response), response.get(stun.ALTERNATE_SERVER)) == (300, ("192.0.2.7", 3478))
    assert response.check_integrity(client.last_key)
    assert harness.server.stats.redirected == {"full": 1}
    assert len(harness.server.allocations) == 1


def test_a_full_relay_without_an_alternate_answers_508_as_before():
    harness = full()
    assert error_code(harness.client().allocate()) == 508
    assert harness.server.stats.redirected == {}


def test_without_a_relay_of_its_region_the_nearest_serving_region_is_next():
    harness = full()
    harness.server.redirects.regions = region_tiers(
        {**REGIONS, "us-west": Region("192.0.2.2", location=(45.84, -119.70), draining=True)},
        "us-east", {"turn-eu-west.example.org": EU})
    # us-west is nearer us-east but draining: eu-west, by its address of the client's family.
    assert harness.client().allocate().get(stun.ALTERNATE_SERVER) == (EU[0], 3478)
    v6 = harness.client(address=("2001:db8:1::5", 40000)).allocate()
    assert v6.get(stun.ALTERNATE_SERVER) == (EU[1], 3478)
    tls = harness.client(transport="tls").allocate()
    assert tls.get(stun.ALTERNATE_SERVER) == (EU[0], 5349)
    assert tls.get(stun.ALTERNATE_DOMAIN) == "turn-eu-west.example.org"
    # The region's own relays come first whenever there are any.
    harness.server.config.alternate_servers = (("192.0.2.7", 3478),)
    assert harness.client().allocate().get(stun.ALTERNATE_SERVER) == ("192.0.2.7", 3478)
    assert harness.server.stats.redirected == {"full": 4}


def test_a_relay_never_redirects_to_itself():
    harness = full(alternate_servers=(("192.0.2.10", 3478),))
    harness.server.config.policy.own.add("192.0.2.10", 3478)
    assert error_code(harness.client().allocate()) == 508
    harness.server.redirects.regions = ((Alternate(("192.0.2.10", 3478)),),
                                        (Alternate(("192.0.2.4", 3478)),))
    assert harness.client().allocate().get(stun.ALTERNATE_SERVER) == ("192.0.2.4", 3478)


def test_draining_is_counted_apart_and_dtls_clients_get_508():
    harness = Harness(alternate_servers=(("192.0.2.7", 3478),))
    harness.server.drain()
    assert error_code(harness.client().allocate()) == 300
    assert error_code(harness.client(transport="dtls").allocate()) == 508
    assert harness.server.stats.redirected == {"draining": 1}


def test_regions_come_nearest_first_without_the_relays_own_nor_unready_ones():
    regions = {**REGIONS, "ap-south": Region("192.0.2.4", location=(19.08, 72.88), ready=False),
               "lab": Region("192.0.2.9")}
    tiers = region_tiers(regions, "us-east", {"turn-eu-west.example.org": EU[:1]})
    assert tiers == (
        (Alternate(("192.0.2.2", 3478)), Alternate(("192.0.2.2", 5349), True)),
        (Alternate((EU[0], 3478)), Alternate((EU[0], 5349), True, "turn-eu-west.example.org")),
        (Alternate(("192.0.2.9", 3478)), Alternate(("192.0.2.9", 5349), True)),  # no location: last
    )
    # A name not resolved (yet) gives no alternate; a region whose location is unknown
    # orders the rest by name.
    assert [t[0].address[0] for t in region_tiers(regions, "lab", {})] == ["192.0.2.1", "192.0.2.2"]


def test_the_regions_file_is_followed_with_its_names_resolved(tmp_path):
    harness = Harness()
    path = tmp_path / "regions.toml"
    path.write_text('[regions.us-east]\nhost = "192.0.2.1"\n'
                    '[regions.eu-west]\nhost = "turn-eu-west.example.org"\n')
    version = [1]
    pending = {}

    def resolve(host: str) -> Deferred:
        pending[host] = Deferred()
        return pending[host]
    watch = RegionRedirects(harness.server, str(path), "us-east", lambda p: version[0], resolve)
    watch.look()
    assert harness.server.redirects.regions == ()  # eu-west's name not resolved yet
    pending["turn-eu-west.example.org"].callback(EU[:1])
    assert harness.server.redirects.regions[0][0] == Alternate((EU[0], 3478))
    path.write_text('[regions.us-east]\nhost = "192.0.2.1"\n'
                    '[regions.eu-west]\nhost = "turn-eu-west.example.org"\ndraining = true\n')
    watch.look()  # the same stamp: not read again
    assert harness.server.redirects.regions != ()
    version[0] = 2
    watch.look()
    assert harness.server.redirects.regions == ()
    path.write_text("not toml [")
    version[0] = 3
    watch.look()  # a file that does not load keeps what was
    assert harness.server.redirects.regions == ()
    path.write_text('[regions.eu-west]\nhost = "192.0.2.3"\n')
    version[0] = 4
    RegionRedirects(harness.server, str(path), "us-east", lambda p: version[0],
                    lambda host: succeed(())).look()
    assert harness.server.redirects.regions == ((Alternate(("192.0.2.3", 3478)),
                                                 Alternate(("192.0.2.3", 5349), True)),)
