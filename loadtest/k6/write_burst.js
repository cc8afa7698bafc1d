// k6: a write burst through the edge (issue 4): link creations, each sent
// as soon as the previous one of its VU was acknowledged (201 = appended to
// the link log and fsynced), by VUS concurrent clients.
//
// Reports `creations` (count and creations/s). Thresholds: no request error,
// every answer a 201, and at least MIN_RATE creations/s (the target
// is 5000; MIN_RATE=0 turns that threshold off).
//
// Environment: BASE_URL (http://127.0.0.1:8080), ULOAD_API_KEY (required),
// VUS (64), DURATION (20s), MIN_RATE (5000), BULK (0: one link per POST
// /api/links; N > 0: POST /api/links/bulk with N links, counted per link).
//
//   ULOAD_API_KEY=... k6 run -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/write_burst.js
import http from 'k6/http';
import { check, fail } from 'k6';
import { Counter } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const KEY = __ENV.ULOAD_API_KEY || '';
const MIN_RATE = parseFloat(__ENV.MIN_RATE || '5000');
const BULK = parseInt(__ENV.BULK || '0', 10);

const creations = new Counter('creations');
const refused = new Counter('creations_refused');

const thresholds = {
  http_req_failed: ['rate==0'],
  checks: ['rate==1'],
  creations_refused: ['count==0'],
};
if (MIN_RATE > 0) thresholds.creations = [`rate>=${MIN_RATE}`];

export const options = {
  scenarios: {
    burst: {
      executor: 'constant-vus',
      vus: parseInt(__ENV.VUS || '64', 10),
      duration: __ENV.DURATION || '20s',
    },
  },
  discardResponseBodies: false,
  summaryTrendStats: ['avg', 'med', 'p(90)', 'p(99)', 'max'],
  thresholds,
};

const headers = { 'Content-Type': 'application/json', Authorization: `Bearer ${KEY}` };

export function setup() {
  if (KEY.length < 16) fail('set ULOAD_API_KEY (at least 16 characters) to the key of the uload under test');
  const a = http.get(`${BASE}/api/health`);
  if (a.status !== 200) fail(`${BASE}/api/health answered ${a.status}: is the admin up?`);
  return { run: Date.now().toString(36) };
}

export default function (data) {
  const base = `https://example.com/k6/burst/${data.run}/${__VU}/${__ITER}`;
  if (BULK > 0) {
    const links = [];
    for (let i = 0; i < BULK; i++) links.push({ url: `${base}/${i}` });
    const res = http.post(`${BASE}/api/links/bulk`, JSON.stringify({ links }), { headers, tags: { name: 'bulk' } });
    let ok = 0;
    if (res.status === 200) {
      for (const r of res.json('results')) if (r.status === 201) ok++;
    }
    check(res, { 'bulk: 200, every item 201': () => res.status === 200 && ok === BULK });
    creations.add(ok);
    refused.add(BULK - ok);
    return;
  }
  const res = http.post(`${BASE}/api/links`, JSON.stringify({ url: base }), { headers, tags: { name: 'create' } });
  if (check(res, { 'create: 201': (r) => r.status === 201 })) {
    creations.add(1);
  } else {
    refused.add(1);
  }
}
