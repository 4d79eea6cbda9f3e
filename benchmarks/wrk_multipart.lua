-- wrk script for benchmarks/bench_serve.py: POST /predict with prebuilt multipart bodies.
--
--   wrk -t1 -c16 -d8s --latency --timeout 60s -s wrk_multipart.lua URL -- LIST BOUNDARY MAX_REQUESTS THREADS [API_KEY]
--
-- LIST names one body file per line (already multipart-encoded by the Python side). Each thread
-- formats every request once in init() and cycles through them in request(), so the per-request
-- cost is a table lookup. response() counts status codes (per thread) and, with MAX_REQUESTS > 0,
-- stops the thread after its share (MAX_REQUESTS / THREADS, rounded up) and prints "WRKDONE". done() prints one JSON line prefixed "WRKJSON " for Python.

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("id", thread_count)
  table.insert(threads, thread)
end

local requests = {}
local next_index = 1
local responses = 0
local budget = 0
statuses = {} -- global: done() reads it from each thread with thread:get()

function init(args)
  local list, boundary = args[1], args[2]
  local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
  if args[5] and args[5] ~= "" then
    headers["X-API-Key"] = args[5]
  end
  for path in io.lines(list) do
    if path ~= "" then
      local file = assert(io.open(path, "rb"))
      local body = file:read("*a")
      file:close()
      table.insert(requests, wrk.format("POST", "/predict", headers, body))
    end
  end
  assert(#requests > 0, "no request bodies in " .. list)
  -- Threads start at different bodies so that two threads do not send the same sequence.
  next_index = ((id or 1) - 1) % #requests + 1
  local max_requests, thread_total = tonumber(args[3] or "0"), tonumber(args[4] or "1")
  if max_requests > 0 then
    budget = math.ceil(max_requests / thread_total)
  end
end

function request()
  local req = requests[next_index]
  next_index = next_index % #requests + 1
  return req
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  responses = responses + 1
  if budget > 0 and responses == budget then
    -- wrk itself runs for the whole -d duration: tell Python, which ends wrk with SIGINT (wrk
    -- then prints its summary and calls done() as usual).
    wrk.thread:stop()
    io.write("WRKDONE\n")
    io.flush()
  end
end

local function json_object(counts)
  local parts = {}
  for key, value in pairs(counts) do
    table.insert(parts, string.format('"%s": %d', key, value))
  end
  return "{" .. table.concat(parts, ", ") .. "}"
end

function done(summary, latency, _requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses") or {}
    for key, value in pairs(counts) do
      merged[key] = (merged[key] or 0) + value
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, '
      .. '"statuses": %s, "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    json_object(merged), e.connect, e.read, e.write, e.status, e.timeout
  ))
end
