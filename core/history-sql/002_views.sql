-- Totals of ended jobs by the hour and by the day they ended, per owner and (owner NULL)
-- for everyone. Durations run from the first start to the end; queue wait from creation
-- to the first start. Bytes are the sources' total of completed jobs.

CREATE VIEW job_history_hourly AS
SELECT date_trunc('hour', finished_at) AS bucket,
       owner,
       count(*) AS jobs,
       count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE state = 'FAILED') AS failed,
       count(*) FILTER (WHERE state = 'CANCELLED') AS cancelled,
       coalesce(sum(total_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS bytes,
       coalesce(sum(zip_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS zip_bytes,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
         FILTER (WHERE state = 'COMPLETED') AS duration_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
         FILTER (WHERE state = 'COMPLETED') AS duration_p95_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000)
         AS queue_wait_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000)
         AS queue_wait_p95_ms
FROM download_jobs
WHERE finished_at IS NOT NULL
GROUP BY GROUPING SETS ((1), (1, 2));

CREATE VIEW job_history_daily AS
SELECT date_trunc('day', finished_at) AS bucket,
       owner,
       count(*) AS jobs,
       count(*) FILTER (WHERE state = 'COMPLETED') AS completed,
       count(*) FILTER (WHERE state = 'FAILED') AS failed,
       count(*) FILTER (WHERE state = 'CANCELLED') AS cancelled,
       coalesce(sum(total_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS bytes,
       coalesce(sum(zip_bytes) FILTER (WHERE state = 'COMPLETED'), 0) AS zip_bytes,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
         FILTER (WHERE state = 'COMPLETED') AS duration_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
         FILTER (WHERE state = 'COMPLETED') AS duration_p95_ms,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000)
         AS queue_wait_p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at) * 1000)
         AS queue_wait_p95_ms
FROM download_jobs
WHERE finished_at IS NOT NULL
GROUP BY GROUPING SETS ((1), (1, 2));

-- Failed jobs by error code, by the hour and the day they ended.
CREATE VIEW job_failures_hourly AS
SELECT date_trunc('hour', finished_at) AS bucket, owner, error_code, count(*) AS failed
FROM download_jobs
WHERE state = 'FAILED'
GROUP BY GROUPING SETS ((1, 3), (1, 2, 3));

CREATE VIEW job_failures_daily AS
SELECT date_trunc('day', finished_at) AS bucket, owner, error_code, count(*) AS failed
FROM download_jobs
WHERE state = 'FAILED'
GROUP BY GROUPING SETS ((1, 3), (1, 2, 3));
