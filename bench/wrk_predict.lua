-- wrk script: every request is POST /predict with one image as the multipart field `file`.
--
--   WRK_IMAGE=cat.jpg wrk -t1 -c256 -d20s --latency -s bench/wrk_predict.lua http://127.0.0.1:8000
--
-- The body is built once (wrk then sends the same bytes on every request, its fast path: no
-- request() or response() callback). wrk does not honour Retry-After: each connection sends its
-- next request as soon as the last is answered, like a retrying client or a crowd of users.
-- done() prints one machine-readable line with the latency quantiles over all answers
-- (bench/wrk_predict.py reads it, with the counts from the server's /metrics).

local path = os.getenv("WRK_IMAGE") or "cat.jpg"
local file = assert(io.open(path, "rb"), "WRK_IMAGE: cannot open " .. path)
local image = file:read("*a")
file:close()

local boundary = "----shapservewrkboundary7d1b"
wrk.method = "POST"
wrk.path = "/predict"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
    .. 'Content-Disposition: form-data; name="file"; filename="image.jpg"\r\n'
    .. "Content-Type: image/jpeg\r\n\r\n"
    .. image .. "\r\n--" .. boundary .. "--\r\n"

function done(summary, latency, requests)
    -- quantiles in microseconds over every answer (2xx and refusals alike), 0.1 % steps at the top
    local parts = {}
    for _, q in ipairs({50, 90, 95, 99, 99.9}) do
        parts[#parts + 1] = string.format('"%g":%d', q, latency:percentile(q))
    end
    -- p(q) for q from 0 to 100 in steps of 0.1, so that the 2xx p99 can be bounded afterwards
    local fine = {}
    for i = 0, 1000 do
        fine[#fine + 1] = tostring(latency:percentile(i / 10))
    end
    io.write(string.format(
        'WRK_JSON {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,'
            .. '"write_errors":%d,"timeouts":%d,"status_errors":%d,"quantiles_us":{%s},"fine_us":[%s]}\n',
        summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
        summary.errors.write, summary.errors.timeout, summary.errors.status,
        table.concat(parts, ","), table.concat(fine, ",")))
end
