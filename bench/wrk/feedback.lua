-- wrk traffic for recsvc: POST /v1/feedback only, a click on an item of a served slate.
-- FEEDBACK_PAIRS names a file of "request_id item_id" lines (slates served before the
-- run); each wrk thread walks it from its own offset. done() prints one JSON line.
local path = os.getenv("FEEDBACK_PAIRS")
local headers = {["Content-Type"] = "application/json"}

local pairs_ = {}
for line in io.lines(path) do
  local rid, item = string.match(line, "^(%S+) (%S+)$")
  if rid then table.insert(pairs_, {rid, item}) end
end

-- setup() and the global ``threads``, from threads.lua beside this script
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "threads.lua")

function init(args)
  accepted, other = 0, 0
  pos = (tid - 1) * 7919 % #pairs_
end

function request()
  pos = pos % #pairs_ + 1
  local p = pairs_[pos]
  return wrk.format("POST", "/v1/feedback", headers, string.format(
    '{"request_id":"%s","item_id":"%s","event":"click"}', p[1], p[2]))
end

function response(status, hdrs, body)
  -- 202 accepted; 200 is a repeat of an accepted event (the file wrapped around)
  if (status == 202 or status == 200) and string.find(body, '"accepted"', 1, true) then
    accepted = accepted + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local a, o = 0, 0
  for _, thread in ipairs(threads) do
    a = a + (thread:get("accepted") or 0)
    o = o + (thread:get("other") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"accepted":%d,"other":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.timeout, a, o))
end
