-- wrk script for execute_vs_fastapi.py: every request is the documented execute call.
-- The URL given to wrk carries the path; the body and the token come from the environment.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
