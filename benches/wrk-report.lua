-- wrk script for benches/compare.sh: sends the token header and, when the run ends,
-- prints one JSON line with the counts and latency percentiles in microseconds (the same
-- percentiles `credvault bench` reports, and the plot's spectrum), for benches/report.py.
local token = os.getenv("WRK_TOKEN") or ""

request = function()
    return wrk.format("GET", nil, { ["X-Vault-Token"] = token })
end

done = function(summary, latency, requests)
    local e = summary.errors
    local errors = e.connect + e.read + e.write + e.status + e.timeout
    local spectrum = {}
    for k = 0, 50 do
        local q = (1 - 10 ^ (-k / 10)) * 100
        spectrum[#spectrum + 1] = string.format("[%.6f, %d]", q, latency:percentile(math.max(q, 0.0001)))
    end
    spectrum[#spectrum + 1] = string.format("[100.0, %d]", latency.max)
    io.write(string.format(
        '{"requests": %d, "duration_us": %d, "errors": %d, "non_2xx": %d, "min": %d, "mean": %.1f, ' ..
        '"p50": %d, "p90": %d, "p95": %d, "p99": %d, "p999": %d, "max": %d, "distribution": [%s]}\n',
        summary.requests, summary.duration, errors, e.status, latency.min, latency.mean,
        latency:percentile(50), latency:percentile(90), latency:percentile(95), latency:percentile(99),
        latency:percentile(99.9), latency.max, table.concat(spectrum, ", ")))
end
