-- The totals of 002's views for one owner at a time, for the GetJobStatistics RPC.
-- 002's views group by GROUPING SETS, through which PostgreSQL pushes no condition: a
-- call for one owner's month aggregated every owner's history (1.8 s for 400,000 jobs).
-- Grouped by (bucket, owner) alone, `WHERE owner = …` reaches the table and its
-- (owner, created_at) index, so a call reads only the caller's jobs. The columns and
-- their meaning are 002's.

CREATE VIEW job_history_ended AS
SELECT owner, state, error_code, total_bytes, zip_bytes,
       date_trunc('hour', finished_at) AS hour,
       date_trunc('day', finished_at) AS day,
       extract(epoch FROM finished_at - started_at) * 1000 AS duration_ms,
       extract(epoch FROM started_at - created_at) * 1000 AS queue_wait_ms
FROM download_jobs
WHERE finished_at IS NOT NULL;

CREATE VIEW job_history_owner_hourly AS
SELECT hour AS bucket, owner,
       count(*) AS jobs,
       count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE state = 'FAILED') AS failed,
       count(*) FILTER (WHERE state = 'CANCELLED') AS cancelled,
       coalesce(sum(total_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS bytes,
       coalesce(sum(zip_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS zip_bytes,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE state = 'COMPLETED') AS duration_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE state = 'COMPLETED') AS duration_p95_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY queue_wait_ms) AS queue_wait_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY queue_wait_ms) AS queue_wait_p95_ms
FROM job_history_ended
GROUP BY hour, owner;

CREATE VIEW job_history_owner_daily AS
SELECT day AS bucket, owner,
       count(*) AS jobs,
       count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE state = 'FAILED') AS failed,
       count(*) FILTER (WHERE state = 'CANCELLED') AS cancelled,
       coalesce(sum(total_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS bytes,
       coalesce(sum(zip_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS zip_bytes,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE state = 'COMPLETED') AS duration_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) FILTER (WHERE state = 'COMPLETED') AS duration_p95_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY queue_wait_ms) AS queue_wait_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY queue_wait_ms) AS queue_wait_p95_ms
FROM job_history_ended
GROUP BY day, owner;

CREATE VIEW job_failures_owner_hourly AS
SELECT hour AS bucket, owner, error_code, count(*) AS failed
FROM job_history_ended WHERE state = 'FAILED'
GROUP BY hour, owner, error_code;

CREATE VIEW job_failures_owner_daily AS
SELECT day AS bucket, owner, error_code, count(*) AS failed
FROM job_history_ended WHERE state = 'FAILED'
GROUP BY day, owner, error_code;
