-- wrk: every request creates a book, as the token in WRK_TOKEN's owner (bench/run.py logs in first).
wrk.method = "POST"
wrk.body = '{"title": "benchmark book"}'
wrk.headers["Content-Type"] = "application/json"
local token = os.getenv("WRK_TOKEN")
if token and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
