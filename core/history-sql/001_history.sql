-- One row per job, as its latest change left it, and one row per change of state.
-- Times are the job record's own (milliseconds in Redis), not when the writer got to them.

CREATE TABLE download_jobs (
  job_id text PRIMARY KEY,
  owner text NOT NULL,
  labels jsonb,
  file_ids bigint[] NOT NULL,
  total_bytes bigint NOT NULL DEFAULT 0,
  zip_bytes bigint,
  created_at timestamptz NOT NULL,
  started_at timestamptz,
  finished_at timestamptz,
  state text NOT NULL,
  error_code text,
  error_message text,
  attempts integer NOT NULL DEFAULT 0,
  cancelled_by text,
  -- The record's version this row shows: an older change arriving late never overwrites it.
  version integer NOT NULL,
  updated_at timestamptz NOT NULL
);
CREATE INDEX download_jobs_owner_created ON download_jobs (owner, created_at DESC);
CREATE INDEX download_jobs_finished ON download_jobs (finished_at);

-- Keyed by the record's version, which every change bumps: a change applied twice (a
-- writer that crashed before XACK, a replay) is one row.
CREATE TABLE job_events (
  job_id text NOT NULL REFERENCES download_jobs (job_id) ON DELETE CASCADE,
  version integer NOT NULL,
  state text NOT NULL,
  attempt integer NOT NULL,
  at timestamptz NOT NULL,
  PRIMARY KEY (job_id, version)
);

-- Owners whose history was erased, by SHA-256 of the owner (not the name itself): a
-- change of theirs that was still in the outbox must not bring a job back.
CREATE TABLE history_erasures (
  owner_sha256 bytea PRIMARY KEY,
  erased_at timestamptz NOT NULL
);
