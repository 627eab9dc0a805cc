-- Queries of the race commands: smoke race progress, Gate-0 criteria, leaderboard, report.

-- name: advisory_lock_smoke
SELECT pg_advisory_xact_lock(hashtext('gardener:smoke-race'))

-- name: used_seeds_in_block
SELECT seed FROM used_seeds WHERE variant = $1 AND seed BETWEEN $2 AND $3 ORDER BY seed

-- name: latest_race
SELECT name FROM races WHERE ($1::text IS NULL OR kind = $1) ORDER BY created_at DESC, name DESC
LIMIT 1

-- name: race_progress
SELECT t.canon_name, t.desired_state, t.observed_state, t.created_at,
       s.last_step, s.last_bpb, s.samples
FROM igla_race_trials t
LEFT JOIN LATERAL (
    SELECT max(b.step) AS last_step,
           (array_agg(b.bpb ORDER BY b.step DESC))[1] AS last_bpb,
           count(*) AS samples
    FROM bpb_samples b WHERE b.canon_name = t.canon_name AND b.seed = t.seed
) s ON true
WHERE t.race = $1
ORDER BY t.canon_name

-- name: stop_race_trials
UPDATE igla_race_trials SET desired_state = $2, updated_at = now()
WHERE race = $1 AND desired_state <> $2 AND desired_state <> 'removed'
RETURNING canon_name

-- name: set_race_status
UPDATE races SET status = $2, finished_at = CASE WHEN $2 = 'running' THEN NULL ELSE now() END
WHERE name = $1

-- name: leaderboard
-- Final BPB is the value at the trial's last step; best is its lowest value. The gate's step
-- is the race's horizon; open tripwires name the trial or its race. $2: one account only.
SELECT t.canon_name, t.seed, t.variant, t.race, t.account, t.desired_state, t.observed_state,
       t.seed_state, t.rung, s.final_step, s.final_bpb, s.best_bpb, coalesce(s.samples, 0) AS samples,
       coalesce(t.steps, r.horizon) AS horizon,
       (SELECT count(*) FROM tripwire_events e
        WHERE e.acknowledged_at IS NULL
          AND (e.canon_name = t.canon_name OR (e.canon_name IS NULL AND e.race = t.race)))
           AS open_tripwires
FROM igla_race_trials t
JOIN races r ON r.name = t.race
LEFT JOIN LATERAL (
    SELECT max(b.step) AS final_step,
           (array_agg(b.bpb ORDER BY b.step DESC))[1] AS final_bpb,
           min(b.bpb) AS best_bpb,
           count(*) AS samples
    FROM bpb_samples b WHERE b.canon_name = t.canon_name AND b.seed = t.seed
) s ON true
WHERE ($1::text IS NULL OR t.race = $1)
  AND ($2::text IS NULL OR t.account = $2)
ORDER BY t.canon_name

-- name: latest_race_of
SELECT name FROM races WHERE ($1::text IS NULL OR account = $1) ORDER BY created_at DESC, name DESC
LIMIT 1

-- name: trial_names
SELECT canon_name FROM igla_race_trials WHERE race = $1 ORDER BY canon_name

-- name: first_sample_latency
-- Criterion 1: when step 10 arrived, in seconds after the trial was admitted.
SELECT t.canon_name,
       extract(epoch FROM (min(least(b.ts, b.ingested_at)) - t.created_at)) AS latency_s,
       count(b.id) AS at_step
FROM igla_race_trials t
LEFT JOIN bpb_samples b ON b.canon_name = t.canon_name AND b.seed = t.seed AND b.step = $2
WHERE t.race = $1
GROUP BY t.canon_name, t.created_at
ORDER BY t.canon_name

-- name: quarantined_bpb_tokens
-- Criterion 2: rejected lines of this race's trials that carried a BPB token.
SELECT q.canon_name, q.raw, q.reason
FROM sample_quarantine q
WHERE q.canon_name IN (SELECT canon_name FROM igla_race_trials WHERE race = $1)
  AND q.raw LIKE '%BPB=%'
ORDER BY q.id

-- name: bpb_not_four_decimals
-- Criterion 2: stored values that could not have come from a \d\.\d{4} token.
SELECT b.canon_name, b.step, b.bpb
FROM bpb_samples b
JOIN igla_race_trials t ON t.canon_name = b.canon_name AND t.seed = b.seed
WHERE t.race = $1
  AND (b.bpb >= 10 OR abs(b.bpb * 10000 - round(b.bpb * 10000)) > 1e-6)
ORDER BY b.canon_name, b.step

-- name: samples_per_trial
SELECT t.canon_name, t.seed, count(b.id) AS samples
FROM igla_race_trials t
LEFT JOIN bpb_samples b ON b.canon_name = t.canon_name AND b.seed = t.seed
WHERE t.race = $1
GROUP BY t.canon_name, t.seed
ORDER BY t.canon_name

-- name: ledger_footprint
-- What the probes must leave unchanged.
SELECT (SELECT count(*) FROM igla_race_trials) AS trials,
       (SELECT count(*) FROM used_seeds) AS used_seeds,
       (SELECT count(*) FROM exp_ids) AS exp_ids,
       (SELECT count(*) FROM races) AS races

-- name: champion_slot
SELECT exp_id, canon_name, bpb, seed, locked, note FROM champion_slots WHERE exp_id = $1

-- name: trial_state
SELECT canon_name, account, desired_state, observed_state, updated_at
FROM igla_race_trials WHERE canon_name = $1

-- name: running_trial_of_race
SELECT canon_name, seed, desired_state, observed_state FROM igla_race_trials
WHERE race = $1 AND desired_state = 'running'
ORDER BY observed_state = 'running' DESC, canon_name LIMIT 1

-- name: exp_ids_claimed
SELECT exp_id, account, claimed_by FROM exp_ids WHERE exp_id = ANY($1::int[]) ORDER BY exp_id

-- name: corpus_reports
SELECT canon_name, corpus, corpus_sha256,
       extract(epoch FROM (corpus_reported_at - created_at)) AS latency_s
FROM igla_race_trials WHERE race = $1 ORDER BY canon_name

-- name: open_tripwires_of_race
SELECT id, kind, canon_name, dedupe_key, evidence, fired_at
FROM tripwire_events
WHERE acknowledged_at IS NULL
  AND (race = $1 OR canon_name IN (SELECT canon_name FROM igla_race_trials WHERE race = $1))
ORDER BY id

-- name: race_states
SELECT canon_name, desired_state, observed_state FROM igla_race_trials WHERE race = $1
ORDER BY canon_name

-- name: race_verdict
SELECT id, action, reason, numbers, applied, decided_at FROM gardener_decisions
WHERE race = $1 AND canon_name = $1 AND action = 'verdict'
ORDER BY id DESC LIMIT 1

-- name: insert_race_verdict
INSERT INTO gardener_decisions (race, rung, canon_name, action, numbers, reason, applied,
                                applied_at, decided_by)
VALUES ($1, -1, $1, 'verdict', $2, $3, true, now(), $4)
ON CONFLICT (canon_name, rung, action) WHERE applied DO NOTHING
RETURNING id

-- name: race_decisions
SELECT id, rung, canon_name, action, seed_state, numbers, reason, applied, held_reason,
       decided_by, decided_at
FROM gardener_decisions WHERE race = $1 ORDER BY decided_at, id

-- name: race_samples
SELECT b.canon_name, b.step, b.bpb
FROM bpb_samples b JOIN igla_race_trials t ON t.canon_name = b.canon_name AND t.seed = b.seed
WHERE t.race = $1
ORDER BY b.canon_name, b.step
