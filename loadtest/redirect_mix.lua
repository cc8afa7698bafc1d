-- wrk script: the redirect mix of issue 4.
--
--   LT_ZIPF_SHARE (0.70)   Zipf-popular known codes (rank r has weight 1/r^s)
--   rest                   uniformly random known codes
--   LT_UNKNOWN_SHARE (0.05) codes that are not in the link set
--
-- Environment:
--   LT_CODES    codes.txt from loadtest/gen_links.py (required): every known
--               code, fixed width, one per line; line 0 is the most popular
--   LT_UNKNOWN  unknown.txt (required): codes that are not in the set
--   LT_ZIPF_S   Zipf exponent (default 1.0)
--   LT_SEED     RNG seed (default 1; thread k uses seed + k)
--   LT_GCPAUSE  LuaJIT GC pause in % (default 100; see init())
--
-- The code list is kept as ONE Lua string and indexed by offset, so 10M
-- codes cost 80 MB in the load generator, not a table of 10M strings.
--
-- Counts every response's status (wrk's response() hook). A connection's
-- responses cannot be matched to its requests from Lua, so the count of
-- non-3xx answers to KNOWN codes is: responses that are neither 3xx nor 404,
-- plus 404s beyond the number of unknown-code requests sent (each unknown
-- code must get exactly one 404). compare.py also checks a sample of codes
-- one by one (status and Location) before loading each server.
--
-- done() prints one line `LT_RESULT {json}` with requests, errors, the
-- status counts and latency percentiles (p50, p90, p99, p99.9, max; µs).
--
-- Usage: LT_CODES=... LT_UNKNOWN=... wrk -t1 -c32 -d10s --latency \
--          -s loadtest/redirect_mix.lua http://127.0.0.1:8080

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local function load(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local s = f:read("*a")
  f:close()
  local nl = s:find("\n", 1, true)
  assert(nl and nl > 1, path .. ": expected one code per line")
  local width = nl -- code length + 1
  assert(#s % width == 0, path .. ": codes must all have the same length")
  return s, width, #s / width
end

local codes, cw, ncodes
local unknown, uw, nunknown
local zipf_share, unknown_share, zipf_s, zipf_a
local head, tail
local floor, random, pow = math.floor, math.random, math.pow or function(a, b) return a ^ b end

-- per-thread counters (read by done() through thread:get)
sent_known, sent_unknown = 0, 0
n_resp, n_3xx, n_404, n_other = 0, 0, 0, 0

function init(args)
  -- Collect garbage continuously (a new cycle as soon as one ends). With the
  -- default pause (200%) LuaJIT lets garbage grow to the size of the live
  -- heap, which the code list makes 80 MB at 10M links; millions of dead
  -- request strings then pile up and the string table's resizes stall this
  -- thread for tens of ms, which shows up as p99.9 latency of the SERVER
  -- (measured: p99.9 21.7 ms -> 1.2 ms against a trivial nginx).
  collectgarbage("setpause", tonumber(os.getenv("LT_GCPAUSE") or "100"))
  codes, cw, ncodes = load(os.getenv("LT_CODES"))
  unknown, uw, nunknown = load(os.getenv("LT_UNKNOWN"))
  zipf_share = tonumber(os.getenv("LT_ZIPF_SHARE") or "0.70")
  unknown_share = tonumber(os.getenv("LT_UNKNOWN_SHARE") or "0.05")
  zipf_s = tonumber(os.getenv("LT_ZIPF_S") or "1.0")
  math.randomseed(tonumber(os.getenv("LT_SEED") or "1") + (tid or 0))
  -- continuous inverse-CDF approximation of Zipf over ranks 1..n
  zipf_a = 1 - zipf_s
  local host = wrk.headers["Host"] or wrk.host
  head = "GET /"
  -- LT_CLOSE=1: one request per connection; wrk connects again after each
  -- answer, so every request pays a TCP handshake, as clicks from many
  -- clients do.
  local close = os.getenv("LT_CLOSE") == "1" and "Connection: close\r\n" or ""
  tail = " HTTP/1.1\r\nHost: " .. host .. "\r\n" .. close .. "\r\n"
end

local function zipf_index()
  local u = random()
  local x
  if math.abs(zipf_a) < 1e-9 then
    x = pow(ncodes + 1, u)
  else
    x = pow((pow(ncodes + 1, zipf_a) - 1) * u + 1, 1 / zipf_a)
  end
  local r = floor(x) -- 1..n
  if r > ncodes then r = ncodes end
  return r - 1
end

function request()
  local u = random()
  local code
  if u < unknown_share then
    local i = floor(random() * nunknown)
    code = unknown:sub(i * uw + 1, i * uw + uw - 1)
    sent_unknown = sent_unknown + 1
  else
    local i
    if u < unknown_share + zipf_share then
      i = zipf_index()
    else
      i = floor(random() * ncodes)
    end
    code = codes:sub(i * cw + 1, i * cw + cw - 1)
    sent_known = sent_known + 1
  end
  return head .. code .. tail
end

function response(status, headers, body)
  n_resp = n_resp + 1
  if status >= 300 and status < 400 then
    n_3xx = n_3xx + 1
  elseif status == 404 then
    n_404 = n_404 + 1
  else
    n_other = n_other + 1
  end
end

function done(summary, latency, requests)
  local t = { sent_known = 0, sent_unknown = 0, n_resp = 0, n_3xx = 0, n_404 = 0, n_other = 0 }
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do
      t[k] = t[k] + (th:get(k) or 0)
    end
  end
  local extra_404 = t.n_404 - t.sent_unknown
  if extra_404 < 0 then extra_404 = 0 end
  local e = summary.errors
  local socket_errors = e.connect + e.read + e.write + e.timeout
  local secs = summary.duration / 1e6
  local out = string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.1f,'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f,'
      .. '"err_connect":%d,"err_read":%d,"err_write":%d,"err_timeout":%d,"err_status":%d,'
      .. '"socket_errors":%d,"responses":%d,"n_3xx":%d,"n_404":%d,"n_other":%d,'
      .. '"sent_known":%d,"sent_unknown":%d,"known_non_3xx":%d}',
    summary.requests, summary.duration, summary.bytes, summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    e.connect, e.read, e.write, e.timeout, e.status,
    socket_errors, t.n_resp, t.n_3xx, t.n_404, t.n_other,
    t.sent_known, t.sent_unknown, t.n_other + extra_404)
  io.write("LT_RESULT " .. out .. "\n")
end
