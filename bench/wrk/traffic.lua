-- wrk traffic for recsvc: recommend for varied users with repeating contexts, and a
-- click on the first item of a share of the slates (SOAK_FEEDBACK of all requests).
-- Settings come from the environment; done() prints one JSON line for bench/soak.py.
local users = tonumber(os.getenv("SOAK_USERS") or "2000")
local ncontexts = tonumber(os.getenv("SOAK_CONTEXTS") or "50")
local delay_ms = tonumber(os.getenv("SOAK_DELAY_MS") or "0")
local fb_share = tonumber(os.getenv("SOAK_FEEDBACK") or "0")
local api_key = os.getenv("SOAK_API_KEY")

local jobs = {"student", "engineer", "artist", "writer", "doctor", "retired", "technician"}
local times = {"weekday evening", "weekend morning", "late night", "lunch break"}
local contexts = {}
for i = 1, ncontexts do
  contexts[i] = string.format("%d year old %s %s, %s", 18 + (i * 7) % 50,
    (i % 2 == 0) and "female" or "male", jobs[i % #jobs + 1], times[i % #times + 1])
end

local headers = {["Content-Type"] = "application/json"}
if api_key and api_key ~= "" then headers["X-API-Key"] = api_key end

-- after a recommend, queue a click with this probability so that clicks are
-- fb_share of all requests
local p_click = fb_share > 0 and fb_share / (1 - fb_share) or 0

-- setup() and the global ``threads``, from threads.lua beside this script
dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "threads.lua")

function init(args)
  math.randomseed(tid * 7919 + os.time())
  rec_ok, rec_other, fb_ok, fb_other, unknown = 0, 0, 0, 0, 0
  queue = {}
end

function request()
  local job = table.remove(queue)
  if job then
    return wrk.format("POST", "/v1/feedback", headers, string.format(
      '{"request_id":"%s","item_id":"%s","event":"click"}', job[1], job[2]))
  end
  return wrk.format("POST", "/v1/recommend", headers, string.format(
    '{"user_id":"u-%d","context":{"text":"%s"},"k":10}',
    math.random(users), contexts[math.random(ncontexts)]))
end

function response(status, hdrs, body)
  if string.find(body, '"request_id"', 1, true) and string.find(body, '"items"', 1, true) then
    if status == 200 then
      rec_ok = rec_ok + 1
      if math.random() < p_click then
        local rid = string.match(body, '"request_id":"([^"]+)"')
        local item = string.match(body, '"item_id":"([^"]+)"')
        if rid and item then table.insert(queue, {rid, item}) end
      end
    else
      rec_other = rec_other + 1
    end
  elseif string.find(body, '"accepted"', 1, true) then
    if status == 202 or status == 200 then fb_ok = fb_ok + 1 else fb_other = fb_other + 1 end
  else
    unknown = unknown + 1  -- an error body (or anything else): counted as an error
  end
end

function delay()
  return delay_ms
end

function done(summary, latency, requests)
  local t = {rec_ok = 0, rec_other = 0, fb_ok = 0, fb_other = 0, unknown = 0}
  for _, thread in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + (thread:get(k) or 0) end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"rec_ok":%d,"rec_other":%d,"fb_ok":%d,"fb_other":%d,"unknown":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout,
    t.rec_ok, t.rec_other, t.fb_ok, t.fb_other, t.unknown))
end
