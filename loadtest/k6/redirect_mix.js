// k6: the redirect mix of issue 4 (the same mix as loadtest/redirect_mix.lua).
//
//   ZIPF_SHARE (0.70) Zipf-popular known codes, the rest of the known share
//   uniformly random known codes, UNKNOWN_SHARE (0.05) unknown codes.
//
// Environment:
//   BASE_URL   the edge (default http://127.0.0.1:8080)
//   CODES      codes.txt from loadtest/gen_links.py (line 0 = most popular)
//   UNKNOWN    unknown.txt (default: next to CODES)
//   CODES_MAX  codes kept (default 1000000; k6 holds them as strings)
//   VUS (32), DURATION (20s), ZIPF_S (1.0)
//
// Redirects are not followed. Unlike wrk, k6 knows which request each
// answer belongs to: a known code must get a 3xx, an unknown one a 404.
// Thresholds fail the run on any other answer and on any request error.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 \
//          -e CODES=/var/tmp/uload-loadtest/links-1000000/codes.txt loadtest/k6/redirect_mix.js
import http from 'k6/http';
import { check } from 'k6';
import { SharedArray } from 'k6/data';
import { Counter } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const CODES = __ENV.CODES || '/var/tmp/uload-loadtest/links-1000000/codes.txt';
const UNKNOWN = __ENV.UNKNOWN || CODES.replace(/[^/]*$/, 'unknown.txt');
const CODES_MAX = parseInt(__ENV.CODES_MAX || '1000000', 10);
const ZIPF_SHARE = parseFloat(__ENV.ZIPF_SHARE || '0.70');
const UNKNOWN_SHARE = parseFloat(__ENV.UNKNOWN_SHARE || '0.05');
const ZIPF_S = parseFloat(__ENV.ZIPF_S || '1.0');

const codes = new SharedArray('codes', () =>
  open(CODES).split('\n').filter((c) => c.length > 0).slice(0, CODES_MAX));
const unknown = new SharedArray('unknown', () =>
  open(UNKNOWN).split('\n').filter((c) => c.length > 0).slice(0, 100000));

const knownNon3xx = new Counter('known_non_3xx');
const unknownNot404 = new Counter('unknown_not_404');

export const options = {
  scenarios: {
    mix: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '32', 10),
      duration: __ENV.DURATION || '20s',
    },
  },
  maxRedirects: 0,
  discardResponseBodies: true,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'p(99.9)', 'max'],
  thresholds: {
    http_req_failed: ['rate==0'],
    known_non_3xx: ['count==0'],
    unknown_not_404: ['count==0'],
    checks: ['rate==1'],
  },
};

const expectRedirect = http.expectedStatuses({ min: 300, max: 399 });
const expect404 = http.expectedStatuses(404);

function zipfIndex(n) {
  const u = Math.random();
  const a = 1 - ZIPF_S;
  const x = Math.abs(a) < 1e-9 ? Math.pow(n + 1, u) : Math.pow((Math.pow(n + 1, a) - 1) * u + 1, 1 / a);
  return Math.min(Math.floor(x), n) - 1;
}

export default function () {
  const u = Math.random();
  if (u < UNKNOWN_SHARE) {
    const code = unknown[Math.floor(Math.random() * unknown.length)];
    const res = http.get(`${BASE}/${code}`, { responseCallback: expect404, tags: { name: 'unknown' } });
    if (!check(res, { 'unknown code: 404': (r) => r.status === 404 })) unknownNot404.add(1);
    return;
  }
  const n = codes.length;
  const i = u < UNKNOWN_SHARE + ZIPF_SHARE ? zipfIndex(n) : Math.floor(Math.random() * n);
  const res = http.get(`${BASE}/${codes[i]}`, { responseCallback: expectRedirect, tags: { name: 'known' } });
  const ok = check(res, {
    'known code: 3xx': (r) => r.status >= 300 && r.status < 400,
    'known code: Location': (r) => !!r.headers['Location'],
  });
  if (!ok) knownNon3xx.add(1);
}
