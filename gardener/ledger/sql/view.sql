-- Queries of the read-only race view (gardener/view). Nothing here writes.

-- name: watermarks
-- What changed since the last look: one number per table the page shows. Ids only grow;
-- a trial's row changes its updated_at (decisions, kills) or observed_at (the reconciler);
-- a race's status change sets finished_at.
SELECT (SELECT coalesce(max(id), 0) FROM bpb_samples) AS samples,
       (SELECT coalesce(max(id), 0) FROM gardener_decisions) AS decisions,
       (SELECT coalesce(max(id), 0) FROM tripwire_events) AS tripwires,
       (SELECT count(*) || ':' || coalesce(max(extract(epoch FROM
                greatest(updated_at, observed_at)))::text, '')
        FROM igla_race_trials) AS trials,
       (SELECT count(*) || ':' || coalesce(max(extract(epoch FROM
                greatest(created_at, finished_at)))::text, '')
                || ':' || count(*) FILTER (WHERE status = 'running')
        FROM races) AS races

-- name: races
SELECT r.name, r.account, r.kind, r.status, r.horizon, r.created_at, r.finished_at,
       count(t.canon_name) AS trials,
       count(t.canon_name) FILTER (WHERE t.desired_state = 'running') AS live,
       (SELECT count(*) FROM gardener_decisions d WHERE d.race = r.name) AS decisions,
       (SELECT max(d.decided_at) FROM gardener_decisions d WHERE d.race = r.name)
           AS last_decision_at
FROM races r
LEFT JOIN igla_race_trials t ON t.race = r.name
WHERE ($1::text IS NULL OR r.account = $1)
GROUP BY r.name
ORDER BY (r.status = 'running') DESC, r.created_at DESC, r.name

-- name: race
SELECT name, account, kind, status, horizon, config, created_at, finished_at
FROM races WHERE name = $1 AND ($2::text IS NULL OR account = $2)

-- name: trials
-- One race's trials with their samples sorted by step, and whether a prune stopped them.
SELECT t.canon_name, t.account, t.variant, t.seed, t.exp_id, t.parent, t.spawn_reason,
       t.seed_strategy, t.steps AS max_steps, t.desired_state, t.observed_state, t.seed_state,
       t.rung, t.created_at, t.last_sample_at,
       EXISTS (SELECT 1 FROM gardener_decisions d
               WHERE d.canon_name = t.canon_name AND d.action = 'prune' AND d.applied) AS pruned,
       coalesce(s.steps, '{}'::int[]) AS sample_steps,
       coalesce(s.bpbs, '{}'::float8[]) AS sample_bpbs
FROM igla_race_trials t
LEFT JOIN LATERAL (
    SELECT array_agg(b.step ORDER BY b.step) AS steps, array_agg(b.bpb ORDER BY b.step) AS bpbs
    FROM bpb_samples b WHERE b.canon_name = t.canon_name AND b.seed = t.seed
) s ON true
WHERE t.race = $1
ORDER BY t.created_at, t.canon_name

-- name: tripwires
SELECT e.id, e.kind, e.canon_name, e.evidence, e.blocks_promotions, e.fired_at,
       e.acknowledged_by, e.acknowledged_at
FROM tripwire_events e
WHERE e.race = $1
   OR e.canon_name IN (SELECT canon_name FROM igla_race_trials WHERE race = $1)
ORDER BY e.id

-- name: decisions_latest
-- The newest $2 decisions of a race (returned oldest first).
SELECT * FROM (
    SELECT id, race, rung, canon_name, action, seed_state, numbers, reason, applied,
           held_reason, decided_by, decided_at
    FROM gardener_decisions WHERE race = $1
    ORDER BY id DESC LIMIT $2
) d ORDER BY id

-- name: decisions_after
-- A race's decisions with an id above $2, oldest first, at most $3.
SELECT id, race, rung, canon_name, action, seed_state, numbers, reason, applied,
       held_reason, decided_by, decided_at
FROM gardener_decisions WHERE race = $1 AND id > $2
ORDER BY id LIMIT $3
