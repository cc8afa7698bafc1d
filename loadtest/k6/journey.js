// k6: the management journey through the edge (issue 4).
//
// Each iteration, all through the edge (BASE_URL):
//   1. POST /api/links (Authorization: Bearer $ULOAD_API_KEY)   -> 201
//   2. GET /{code} without following redirects, polled until it redirects:
//      `create_to_served_ms` = time from the 201 to the first redirect
//      (the target: p99 under 5 ms); Location must be the URL
//   3. PATCH /api/links/{code} with a new URL                  -> 200,
//      polled until the edge answers with the new Location (`update_to_served_ms`)
//   4. DELETE /api/links/{code}                                -> 204,
//      polled until the edge answers 404 (`delete_to_gone_ms`)
//   5. GET /api/links/{code}                                   -> 404
//
// The times are wall-clock, from the moment k6 has the write's answer to
// the moment it has the answer that shows the change, both read from
// k6/execution's currentTestRunDuration (microsecond resolution; Date.now()
// has milliseconds). They include the last poll whole and k6's own time
// between polls, so they are an upper bound. (Until 2026-11-28 they were the
// sum of the polls' durations plus the nominal pauses, which left out k6's
// time between polls and that a 0.5 ms sleep lasts about 1.2 ms here: an
// underestimate.) A poll loop gives up after 2 s (journey_failed).
//
// Environment: BASE_URL (http://127.0.0.1:8080), ULOAD_API_KEY (required),
// VUS (4), DURATION (20s), POLL_PAUSE_MS (0.5).
//
//   ULOAD_API_KEY=... k6 run -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/journey.js
import http from 'k6/http';
import { check, fail, sleep } from 'k6';
import { Counter, Rate, Trend } from 'k6/metrics';
import exec from 'k6/execution';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const KEY = __ENV.ULOAD_API_KEY || '';
const PAUSE_MS = parseFloat(__ENV.POLL_PAUSE_MS || '0.5');
const POLL_LIMIT_MS = 2000;

const createToServed = new Trend('create_to_served_ms');
const updateToServed = new Trend('update_to_served_ms');
const deleteToGone = new Trend('delete_to_gone_ms');
const servedFirstPoll = new Rate('served_on_first_poll');
const journeyFailed = new Counter('journey_failed');
const journeys = new Counter('journeys');

export const options = {
  scenarios: {
    journey: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '4', 10),
      duration: __ENV.DURATION || '20s',
    },
  },
  maxRedirects: 0,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'max'],
  thresholds: {
    checks: ['rate==1'],
    http_req_failed: ['rate==0'],
    journey_failed: ['count==0'],
    create_to_served_ms: ['p(99)<5'],
  },
};

const json = { 'Content-Type': 'application/json' };
const auth = { Authorization: `Bearer ${KEY}` };
const headers = Object.assign({}, json, auth);
// Polls may see "not yet" (404 before a create is applied, the old
// Location, 3xx before a delete is applied): those are expected answers.
const pollStatuses = http.expectedStatuses(404, { min: 300, max: 399 });

export function setup() {
  if (KEY.length < 16) fail('set ULOAD_API_KEY (at least 16 characters) to the key of the uload under test');
  const h = http.get(`${BASE}/health`);
  if (h.status !== 200) fail(`${BASE}/health answered ${h.status}`);
  const a = http.get(`${BASE}/api/health`);
  if (a.status !== 200) fail(`${BASE}/api/health answered ${a.status}: is the admin up?`);
}

// Milliseconds since the test began, with microseconds.
const now = () => exec.instance.currentTestRunDuration;

// Polls GET /{code} until done(res) is true; returns the ms from `since`
// (a now() reading) to the answer that was done, or -1.
function pollUntil(code, done, tag, since) {
  let first = true;
  while (now() - since < POLL_LIMIT_MS) {
    const res = http.get(`${BASE}/${code}`, { responseCallback: pollStatuses, tags: { name: tag } });
    const at = now();
    if (res.status !== 404 && (res.status < 300 || res.status > 399)) return -1;
    if (done(res)) {
      if (tag === 'poll_create') servedFirstPoll.add(first);
      return at - since;
    }
    first = false;
    if (PAUSE_MS > 0) sleep(PAUSE_MS / 1000);
  }
  return -1;
}

export default function () {
  const url = `https://example.com/k6/journey/${__VU}/${__ITER}/${Date.now()}`;
  const created = http.post(`${BASE}/api/links`, JSON.stringify({ url }), { headers, tags: { name: 'create' } });
  const createdAt = now();
  if (!check(created, { 'create: 201': (r) => r.status === 201 })) {
    journeyFailed.add(1);
    return;
  }
  const code = created.json('code');

  const t1 = pollUntil(code, (r) => r.status >= 300 && r.status < 400, 'poll_create', createdAt);
  if (!check(t1, { 'created link served': (t) => t >= 0 })) {
    journeyFailed.add(1);
    return;
  }
  createToServed.add(t1);
  const follow = http.get(`${BASE}/${code}`, { tags: { name: 'follow' } });
  check(follow, {
    'follow: 3xx': (r) => r.status >= 300 && r.status < 400,
    'follow: Location is the URL': (r) => r.headers['Location'] === url,
  });

  const url2 = `${url}/v2`;
  const patched = http.patch(`${BASE}/api/links/${code}`, JSON.stringify({ url: url2 }),
    { headers, tags: { name: 'update' } });
  const patchedAt = now();
  check(patched, { 'update: 200': (r) => r.status === 200 && r.json('url') === url2 });
  const t2 = pollUntil(code, (r) => r.headers['Location'] === url2, 'poll_update', patchedAt);
  if (!check(t2, { 'update served': (t) => t >= 0 })) {
    journeyFailed.add(1);
    return;
  }
  updateToServed.add(t2);

  const deleted = http.del(`${BASE}/api/links/${code}`, null, { headers: auth, tags: { name: 'delete' } });
  const deletedAt = now();
  check(deleted, { 'delete: 204': (r) => r.status === 204 });
  const t3 = pollUntil(code, (r) => r.status === 404, 'poll_delete', deletedAt);
  if (!check(t3, { 'delete served': (t) => t >= 0 })) {
    journeyFailed.add(1);
    return;
  }
  deleteToGone.add(t3);
  const gone = http.get(`${BASE}/api/links/${code}`,
    { headers: auth, responseCallback: http.expectedStatuses(404), tags: { name: 'read_deleted' } });
  check(gone, { 'read after delete: 404': (r) => r.status === 404 });
  journeys.add(1);
}
