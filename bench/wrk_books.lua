-- wrk: GET /books/ (the URL given), or with WRK_TOKEN set every request creates a book as that
-- token's owner (bench/run.py logs in first). At the end, the 95th percentile of the latency,
-- which wrk's --latency table leaves out (it prints 50, 75, 90, 99).
local token = os.getenv("WRK_TOKEN")
if token and token ~= "" then
  wrk.method = "POST"
  wrk.body = '{"title": "benchmark book"}'
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. token
end

function done(summary, latency, requests)
  io.write(string.format("p95 latency: %d us\n", latency:percentile(95.0)))
end
