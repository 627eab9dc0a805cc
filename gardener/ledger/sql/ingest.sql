-- Queries of the sample writer (gardener/ingest/writer.py). Every write is one set-based
-- statement over arrays, so a batch of thousands of samples costs a handful of round trips.

-- name: trials_by_name
SELECT canon_name, seed, account FROM igla_race_trials WHERE canon_name = ANY($1::text[])

-- name: insert_samples
-- New samples, and in the same statement the per-trial summary from the rows actually
-- inserted (a re-delivered sample changes nothing, not even last_sample_at). last_step and
-- last_bpb follow the highest step ever seen, so a late, out-of-order sample cannot move them
-- backwards. Returns the inserted rows.
WITH ins AS (
    INSERT INTO bpb_samples (canon_name, seed, step, bpb, ts, source)
    SELECT u.canon_name, u.seed, u.step, u.bpb, coalesce(u.ts, now()), u.source
    FROM unnest($1::text[], $2::bigint[], $3::integer[], $4::float8[], $5::timestamptz[],
                $6::text[]) AS u(canon_name, seed, step, bpb, ts, source)
    ON CONFLICT (canon_name, seed, step) DO NOTHING
    RETURNING id, canon_name, step, bpb
),
latest AS (
    SELECT DISTINCT ON (canon_name) canon_name, step, bpb,
           min(bpb) OVER (PARTITION BY canon_name) AS best
    FROM ins
    ORDER BY canon_name, step DESC
),
summary AS (
    UPDATE igla_race_trials t SET
        last_step = CASE WHEN t.last_step IS NULL OR l.step >= t.last_step
                         THEN l.step ELSE t.last_step END,
        last_bpb = CASE WHEN t.last_step IS NULL OR l.step >= t.last_step
                        THEN l.bpb ELSE t.last_bpb END,
        best_bpb = least(t.best_bpb, l.best),
        last_sample_at = now(),
        updated_at = now()
    FROM latest l
    WHERE t.canon_name = l.canon_name
    RETURNING 1
)
SELECT id, canon_name, step FROM ins

-- name: existing_samples
-- The stored value of samples the insert skipped: equal is a re-delivery, different a conflict.
SELECT u.i, b.bpb
FROM unnest($1::text[], $2::bigint[], $3::integer[]) WITH ORDINALITY AS u(canon_name, seed, step, i)
JOIN bpb_samples b ON b.canon_name = u.canon_name AND b.seed = u.seed AND b.step = u.step

-- name: quarantine
INSERT INTO sample_quarantine (source, account, canon_name, raw, reason)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])

-- name: record_corpus
UPDATE igla_race_trials t SET
    corpus = u.corpus, corpus_sha256 = u.sha256, corpus_reported_at = now(), updated_at = now()
FROM unnest($1::text[], $2::text[], $3::text[]) AS u(canon_name, corpus, sha256)
WHERE t.canon_name = u.canon_name

-- name: notify_samples
SELECT pg_notify('gardener_samples', $1)
