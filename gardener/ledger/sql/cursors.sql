-- Log cursors of the reconciler's tails (0007_leader_lease.sql), so a restart resumes them.

-- name: load_cursors
SELECT canon_name, cursor FROM log_cursors WHERE backend = ANY($1::text[]);

-- name: save_cursors
-- One row per service: the newest cursor wins (a tail never goes backwards).
INSERT INTO log_cursors (canon_name, backend, cursor)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT (canon_name) DO UPDATE
   SET backend = EXCLUDED.backend, cursor = EXCLUDED.cursor, updated_at = now();
