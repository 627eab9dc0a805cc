-- Queries of the sample writer (gardener/ingest/writer.py). Every write is one set-based
-- statement over arrays, so a batch of thousands of samples costs a handful of round trips.

-- name: trials_by_name
SELECT canon_name, seed, account FROM igla_race_trials WHERE canon_name = ANY($1::text[])

-- name: insert_samples
-- The batch's samples, skipping any (canon_name, seed, step) already stored (the path taken
-- when the COPY fast path meets one). Parameters: $1 the batch's distinct canon names, $2
-- their seeds, $3 its distinct sources; then one comma-separated list per column, one entry
-- per row: $4 name index (1-based into $1), $5 step, $6 bpb, $7 ts (ISO 8601; empty, or $7
-- NULL, means now()), $8 source index. Answers one row: how many were inserted, the highest
-- new id, and the row numbers (1-based) the insert skipped.
WITH u AS (
    SELECT r.i, ($1::text[])[r.k] AS canon_name, ($2::bigint[])[r.k] AS seed, r.step, r.bpb,
           coalesce(r.ts, now()) AS ts, ($3::text[])[r.s] AS source
    FROM unnest(string_to_array($4, ',')::integer[], string_to_array($5, ',')::integer[],
                string_to_array($6, ',')::float8[], string_to_array($7, ',', '')::timestamptz[],
                string_to_array($8, ',')::integer[]) WITH ORDINALITY AS r(k, step, bpb, ts, s, i)
),
ins AS (
    INSERT INTO bpb_samples (canon_name, seed, step, bpb, ts, source)
    SELECT canon_name, seed, step, bpb, ts, source FROM u
    ON CONFLICT (canon_name, seed, step) DO NOTHING
    RETURNING id, canon_name, step
),
counts AS (
    SELECT count(*) AS inserted, max(id) AS max_id FROM ins
)
SELECT c.inserted, c.max_id,
       CASE WHEN c.inserted = (SELECT count(*) FROM u) THEN '{}'::bigint[]
            ELSE ARRAY(SELECT u.i FROM u
                       WHERE NOT EXISTS (SELECT 1 FROM ins
                                         WHERE ins.canon_name = u.canon_name
                                           AND ins.step = u.step)
                       ORDER BY u.i)
       END AS skipped
FROM counts c

-- name: last_sample_id
-- The id this session's COPY assigned last.
SELECT currval(pg_get_serial_sequence('bpb_samples', 'id'))

-- name: lock_trials
-- The trial rows a batch updates, locked in name order (the writer passes them sorted).
SELECT 1 FROM igla_race_trials WHERE canon_name = ANY($1::text[]) ORDER BY canon_name FOR UPDATE

-- name: update_summaries
-- Per trial, from the rows just inserted: $2 the highest step, $3 its BPB, $4 the lowest BPB.
-- A re-delivered sample changes nothing, not even last_sample_at; last_step and last_bpb
-- follow the highest step ever seen, so a late, out-of-order sample cannot move them back.
UPDATE igla_race_trials t SET
    last_step = CASE WHEN t.last_step IS NULL OR u.step >= t.last_step
                     THEN u.step ELSE t.last_step END,
    last_bpb = CASE WHEN t.last_step IS NULL OR u.step >= t.last_step
                    THEN u.bpb ELSE t.last_bpb END,
    best_bpb = least(t.best_bpb, u.best),
    last_sample_at = now(),
    updated_at = now()
FROM unnest($1::text[], $2::integer[], $3::float8[], $4::float8[]) AS u(canon_name, step, bpb, best)
WHERE t.canon_name = u.canon_name

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
-- $1 the channel (gardener_samples), $2 the payload {"max_id", "count"}.
SELECT pg_notify($1, $2)
