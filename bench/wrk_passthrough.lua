-- wrk script for passthrough_vs_direct.py: every request is the same POST, whichever system it goes to. The URL
-- carries the path; the body, the Bearer token and extra headers come from the environment: BENCH_BODY, BENCH_TOKEN,
-- and BENCH_HEADERS, one "name: value" per line (x-node-id or x-node-alias, x-folder-id).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
for name, value in string.gmatch(os.getenv("BENCH_HEADERS") or "", "([^:\n]+):[ \t]*([^\n]*)") do
   wrk.headers[name] = value
end
