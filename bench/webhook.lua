-- wrk script: POST a distinct WATI text message per request and print a JSON summary at the end.
-- The body template comes from the first script argument (a file written by bench/parts.py), with
-- @MID@, @ID@ and @WA@ placeholders; the second argument is a run prefix so ids never repeat across runs.
local threads = {}
local counter = 0
local template = nil
local prefix = ""

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  local file = io.open(args[1], "r")
  template = file:read("*a")
  file:close()
  prefix = (args[2] or "run") .. "t" .. tid .. "n"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local mid = prefix .. counter
  local body = template:gsub("@MID@", "wamid." .. mid):gsub("@ID@", mid)
  body = body:gsub("@WA@", string.format("5037%07d", (counter * 7 + tid) % 5000))
  return wrk.format("POST", nil, nil, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"status_errors": %d, "timeouts": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, errors.connect, errors.read, errors.write, errors.status,
    errors.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
