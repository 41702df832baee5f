// turnrelay's ICE servers for a web page, nearest region first as measured from this browser.
// Served by the tokens API at /v1/ice.js (relay/web/ice.js); no dependencies; docs/regions.md.
//
//   import {nearestIceServers} from "https://turn.example.org:8443/v1/ice.js";
//   const {iceServers} = await nearestIceServers({api: "https://turn.example.org:8443",
//                                                 key: "trbk_..."});
//   const pc = new RTCPeerConnection({iceServers});
//
// The tokens API orders the regions by distance from the visitor's address (GeoIP); this
// module confirms by measuring: it gathers a relay candidate from each of the top regions at
// once and puts first the region whose first relay candidate came soonest (a TURN Allocate
// is two round trips to the relay, so that time tracks the path's round trip).  The winner is
// remembered in localStorage for `cacheSeconds`, so later page loads skip the measurement.

const CACHE_PREFIX = "turnrelay.ice.winner:";

// The tokens API's answer for a browser key: {username, password, ttl, region, regions:
// [{name, ice_servers}], ice_servers, ...}.  Throws an Error saying why when it refuses.
export async function fetchIceServers({api, key, regions = 3, ttl} = {}) {
  const form = new URLSearchParams({key, regions: String(regions)});
  if (ttl) form.set("ttl", String(ttl));
  let answer;
  try {
    // A form body and no custom header: a CORS simple request, sent without a preflight.
    answer = await fetch(api.replace(/\/+$/, "") + "/v1/ice-servers",
                         {method: "POST", body: form, credentials: "omit", cache: "no-store"});
  } catch (e) {
    throw new Error("turnrelay: no answer from " + api + " that this page may read (is the "
                    + "page's origin, " + location.origin + ", one of the browser key's?): " + e);
  }
  const body = await answer.json().catch(() => ({}));
  if (answer.status !== 201) throw new Error("turnrelay: " + (body.message || "HTTP " + answer.status));
  return body;
}

// Milliseconds from creating a relay-only peer connection over `iceServers` to its first relay
// candidate; null when none came within `timeoutMs` (the region is unreachable from here).
export function timeToRelay(iceServers, timeoutMs = 5000) {
  return new Promise(resolve => {
    const turn = iceServers.filter(server => [].concat(server.urls).some(url => /^turns?:/i.test(url)));
    const started = performance.now();
    let pc;
    try {
      pc = new RTCPeerConnection({iceServers: turn, iceTransportPolicy: "relay"});
    } catch (e) {
      resolve(null);
      return;
    }
    let done = false;
    const finish = ms => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      pc.close();
      resolve(ms);
    };
    const timer = setTimeout(() => finish(null), timeoutMs);
    pc.onicecandidate = event => {
      if (!event.candidate) finish(null);  // gathering ended without a relay candidate
      else if (/ typ relay /.test(event.candidate.candidate)) finish(performance.now() - started);
    };
    pc.createDataChannel("turnrelay-measure");  // something to gather candidates for
    pc.setLocalDescription().catch(() => finish(null));
  });
}

// `regions` ([{name, ...}]) with their measured `times` ({name: ms or null}), fastest first;
// those that gave no relay candidate last, in the order given.
export function orderByTime(regions, times) {
  const rank = region => times[region.name] == null ? Infinity : times[region.name];
  return regions.map((region, index) => [region, index])
                .sort(([a, i], [b, j]) => rank(a) - rank(b) || i - j)
                .map(([region]) => region);
}

// {iceServers, chosen, regions: [{name, ms}] in the order chosen, cached, answer}: the ICE
// servers of the top `regions` regions, the fastest first.  `storage` is where the winner is
// remembered (localStorage by default; null to always measure).
export async function nearestIceServers({api, key, regions = 3, ttl, timeoutMs = 5000,
                                         cacheSeconds = 600, storage = globalThis.localStorage}
                                        = {}) {
  const answer = await fetchIceServers({api, key, regions, ttl});
  const cacheKey = CACHE_PREFIX + api;
  let cached = null;
  try {
    cached = storage ? JSON.parse(storage.getItem(cacheKey)) : null;
  } catch (e) {
    cached = null;  // storage unavailable (a sandboxed frame) or garbled: measure
  }
  const now = Date.now();
  let ordered, times = {}, fromCache = false;
  if (cached && cached.expires > now && answer.regions.some(r => r.name === cached.region)) {
    times[cached.region] = cached.ms;
    ordered = orderByTime(answer.regions, times);
    fromCache = true;
  } else {
    const measured = await Promise.all(answer.regions.map(r => timeToRelay(r.ice_servers, timeoutMs)));
    answer.regions.forEach((region, i) => { times[region.name] = measured[i]; });
    ordered = orderByTime(answer.regions, times);
    const winner = ordered[0];
    if (storage && times[winner.name] != null) {
      try {
        storage.setItem(cacheKey, JSON.stringify({region: winner.name, ms: times[winner.name],
                                                  expires: now + cacheSeconds * 1000}));
      } catch (e) { /* storage full or refused: measure again next time */ }
    }
  }
  return {iceServers: ordered.flatMap(region => region.ice_servers),
          chosen: ordered[0].name,
          regions: ordered.map(region => ({name: region.name, ms: times[region.name] ?? null})),
          cached: fromCache, answer};
}
