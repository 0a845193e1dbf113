-- wrk script for alias_routing.py: every request is the documented execute call, as in wrk_post.lua (the URL
-- carries the path; BENCH_BODY and BENCH_TOKEN come from the environment). With BENCH_ROUTE_KEYS=N (N > 0) each
-- request also carries an `x-cellnode-route-key` header, cycling through N keys per wrk thread ("t1-1" ...).
-- Every variant runs through this script, so that wrk does the same work for all: the requests are built once in
-- init() and request() only hands out the next one.
local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_id", threads)
end

function init(args)
   local keys = tonumber(os.getenv("BENCH_ROUTE_KEYS") or "0")
   local body = os.getenv("BENCH_BODY")
   local headers = {
      ["Content-Type"] = "application/json",
      ["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN"),
   }
   requests = {}
   for i = 1, math.max(keys, 1) do
      if keys > 0 then
         headers["x-cellnode-route-key"] = string.format("t%d-%d", thread_id, i)
      end
      requests[i] = wrk.format("POST", nil, headers, body)
   end
   next_request = 0
end

function request()
   next_request = next_request % #requests + 1
   return requests[next_request]
end
