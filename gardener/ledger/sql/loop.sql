-- Queries of the worker loop (gardener/loop, gardener/ledger/snapshot.py, apply.py).

-- name: now_epoch
SELECT extract(epoch FROM now())::float8

-- name: max_sample_id
SELECT coalesce(max(id), 0) FROM bpb_samples

-- name: new_samples_by_race
-- The running races with samples of id in ($1, $2], one row per race however many trials sent
-- them: whether one of them took a live trial to a rung above its recorded one ($3, the
-- boundaries as in live_crossings) and whether one lies below the floor $4.
SELECT t.race,
       coalesce(bool_or(t.desired_state = 'running'
                        AND s.max_step >= (($3::jsonb -> t.race) ->> (t.rung + 1))::integer),
                false) AS crossed,
       coalesce(bool_or(s.min_bpb < $4), false) AS below_floor
FROM (SELECT b.canon_name, max(b.step) AS max_step, min(b.bpb) AS min_bpb
      FROM bpb_samples b
      WHERE b.id > $1 AND b.id <= $2
      GROUP BY b.canon_name) s
JOIN igla_race_trials t ON t.canon_name = s.canon_name
JOIN races r ON r.name = t.race AND r.status = 'running'
GROUP BY t.race

-- name: live_crossings
-- Level-triggered rescan: the live trials of running races whose highest step reached a rung
-- above their recorded one, and only those (the fleet's other trials stay in PostgreSQL).
-- $1 {race: [the lowest boundary above rung -1, above rung 0, ...]} (a race not in it is not
-- looked at); $2 a sample id: the samples above it are read, the rest is known from
-- ``last_step``, which the ingest writer moves in the same transaction as its rows (0 reads
-- every sample: the rescan at start).
WITH fresh AS (
    SELECT s.canon_name, s.seed, max(s.step) AS step
    FROM bpb_samples s
    WHERE s.id > $2
    GROUP BY s.canon_name, s.seed
)
SELECT t.race, t.canon_name
FROM igla_race_trials t
JOIN races r ON r.name = t.race AND r.status = 'running'
LEFT JOIN fresh f ON f.canon_name = t.canon_name AND f.seed = t.seed
WHERE t.desired_state = 'running'
  AND greatest(t.last_step, f.step) >= (($1::jsonb -> t.race) ->> (t.rung + 1))::integer

-- name: stalled_candidates
-- Trials that should be running, are observed running, and have been silent longer than $1
-- seconds, with no stalled tripwire recorded yet.
SELECT t.race, t.canon_name
FROM igla_race_trials t
JOIN races r ON r.name = t.race AND r.status = 'running'
WHERE t.desired_state = 'running' AND t.observed_state = 'running'
  AND coalesce(t.last_sample_at,
               (SELECT max(s.ts) FROM bpb_samples s WHERE s.canon_name = t.canon_name),
               t.observed_at, t.updated_at) < now() - make_interval(secs => $1)
  AND NOT EXISTS (SELECT 1 FROM tripwire_events e WHERE e.dedupe_key = 'stalled:' || t.canon_name)

-- name: running_races
SELECT name, account, kind, status, horizon, config FROM races
WHERE status = 'running' AND kind <> 'backtest'
ORDER BY name

-- name: race_row
SELECT name, account, kind, status, horizon, config FROM races WHERE name = $1

-- name: snapshot_trials
-- One race's trials with their samples in arrival order, and times as epoch seconds.
SELECT t.canon_name, t.variant, t.seed, t.format, t.hidden_size, t.parent, t.rung,
       t.desired_state, t.observed_state, t.corpus_sha256, t.corpus, t.steps AS max_steps, t.exp_id,
       t.account, t.seed_state,
       extract(epoch FROM coalesce(t.last_sample_at, s.last_ts, t.observed_at, t.updated_at))::float8
           AS silent_since,
       coalesce(s.steps, '{}'::int[]) AS sample_steps,
       coalesce(s.bpbs, '{}'::float8[]) AS sample_bpbs
FROM igla_race_trials t
LEFT JOIN LATERAL (
    SELECT array_agg(b.step ORDER BY b.id) AS steps, array_agg(b.bpb ORDER BY b.id) AS bpbs,
           max(b.ts) AS last_ts
    FROM bpb_samples b WHERE b.canon_name = t.canon_name AND b.seed = t.seed
) s ON true
WHERE t.race = $1
ORDER BY t.created_at, t.canon_name

-- name: used_seeds_for
SELECT variant, array_agg(seed) AS seeds FROM used_seeds WHERE variant = ANY($1::text[])
GROUP BY variant

-- name: race_tripwires
-- The tripwires of a race or of one of its trials (both by index: 0008).
SELECT e.id, e.kind, e.canon_name, e.evidence, e.blocks_promotions, e.acknowledged_at
FROM tripwire_events e
WHERE e.id IN (SELECT x.id FROM tripwire_events x WHERE x.race = $1
               UNION
               SELECT x.id FROM tripwire_events x
               JOIN igla_race_trials t ON t.canon_name = x.canon_name
               WHERE t.race = $1)
ORDER BY e.id

-- name: insert_applied_decision
INSERT INTO gardener_decisions (
    race, rung, canon_name, action, seed_state, numbers, reason, applied, applied_at, decided_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, true, now(), $8)
ON CONFLICT (canon_name, rung, action) WHERE applied DO NOTHING
RETURNING id

-- name: insert_held_decision
INSERT INTO gardener_decisions (
    race, rung, canon_name, action, seed_state, numbers, reason, applied, held_reason, decided_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, false, $8, $9)
ON CONFLICT (canon_name, rung, action) WHERE NOT applied DO NOTHING
RETURNING id

-- name: trial_row_for_update
SELECT * FROM igla_race_trials WHERE canon_name = $1 FOR UPDATE

-- name: record_decided
-- The trial's rung, seed state and fit after a decision (the rung never goes down).
UPDATE igla_race_trials
SET rung = greatest(rung, $2),
    seed_state = coalesce($3, seed_state),
    fit_bpb_inf = coalesce($4, fit_bpb_inf),
    fit_ci_low = coalesce($5, fit_ci_low),
    fit_ci_high = coalesce($6, fit_ci_high),
    fit_p = coalesce($7, fit_p),
    fit_a = coalesce($8, fit_a),
    updated_at = now()
WHERE canon_name = $1

-- name: stop_trial
UPDATE igla_race_trials SET desired_state = 'stopped', updated_at = now()
WHERE canon_name = $1 AND desired_state = 'running'

-- name: insert_tripwire
INSERT INTO tripwire_events (kind, race, canon_name, dedupe_key, evidence, blocks_promotions)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id

-- name: finished_races
-- Running races whose every trial has ended: finished (succeeded or failed), or asked to stop
-- and no longer running (or never started); and with no sample above the watermark $1, which
-- the loop has not decided on yet. Only the races named in $2 (NULL: every running race).
SELECT r.name, r.account, r.config
FROM races r
WHERE r.status = 'running' AND r.kind <> 'backtest'
  AND ($2::text[] IS NULL OR r.name = ANY($2::text[]))
  AND EXISTS (SELECT 1 FROM igla_race_trials t WHERE t.race = r.name)
  AND NOT EXISTS (
      SELECT 1 FROM bpb_samples s JOIN igla_race_trials t ON t.canon_name = s.canon_name
      WHERE t.race = r.name AND s.id > $1)
  AND NOT EXISTS (
      SELECT 1 FROM igla_race_trials t
      WHERE t.race = r.name
        AND NOT (t.observed_state IN ('succeeded', 'failed')
                 OR (t.desired_state <> 'running'
                     AND (t.observed_state IN ('stopped', 'removed')
                          OR (t.service_id IS NULL AND t.observed_state = 'pending')))))

-- name: mark_race_done
UPDATE races SET status = 'done', finished_at = now() WHERE name = $1 AND status = 'running'
RETURNING name

-- name: teardown_race
UPDATE igla_race_trials SET desired_state = 'removed', updated_at = now()
WHERE race = $1 AND desired_state <> 'removed'

-- name: desired_trials
-- What the reconciler should drive: every trial of a race that is not done with, or not removed.
SELECT t.canon_name, t.account, t.race, t.desired_state, t.observed_state, t.steps,
       t.hidden_size, t.variables, t.service_id, t.deployment_id, t.backend, r.horizon
FROM igla_race_trials t
JOIN races r ON r.name = t.race
WHERE r.kind <> 'backtest'
  AND ($1::text IS NULL OR t.account = $1)
  AND NOT (t.desired_state = 'removed' AND t.observed_state = 'removed')

-- name: desired_trials_keyed
-- desired_trials for the daemon's reconciler: the variables as text, decoded only for a trial
-- whose spec is not cached yet (ten thousand JSON objects a pass otherwise).
SELECT t.canon_name, t.account, t.race, t.desired_state, t.observed_state, t.steps,
       t.hidden_size, t.variables::text AS variables_text, t.service_id, t.deployment_id,
       t.backend, r.horizon
FROM igla_race_trials t
JOIN races r ON r.name = t.race
WHERE r.kind <> 'backtest'
  AND ($1::text IS NULL OR t.account = $1)
  AND NOT (t.desired_state = 'removed' AND t.observed_state = 'removed')

-- name: set_observed
UPDATE igla_race_trials
SET observed_state = $2, service_id = coalesce($3, service_id),
    deployment_id = coalesce($4, deployment_id),
    observed_at = CASE WHEN observed_state IS DISTINCT FROM $2 THEN now() ELSE observed_at END,
    updated_at = CASE WHEN observed_state IS DISTINCT FROM $2 THEN now() ELSE updated_at END
WHERE canon_name = $1
  AND (observed_state IS DISTINCT FROM $2 OR service_id IS DISTINCT FROM coalesce($3, service_id)
       OR deployment_id IS DISTINCT FROM coalesce($4, deployment_id))

-- name: hunt_status
SELECT t.canon_name, t.race, t.account, t.desired_state, t.observed_state, t.rung, t.seed_state,
       t.fit_bpb_inf, t.fit_ci_low, t.fit_ci_high, t.seed,
       coalesce(t.last_step, s.max_step) AS last_step, coalesce(t.last_bpb, s.last_bpb) AS last_bpb,
       d.action AS decision, d.reason AS decision_reason, d.numbers AS decision_numbers
FROM igla_race_trials t
LEFT JOIN LATERAL (
    SELECT max(b.step) AS max_step,
           (array_agg(b.bpb ORDER BY b.step DESC))[1] AS last_bpb
    FROM bpb_samples b WHERE b.canon_name = t.canon_name AND b.seed = t.seed
) s ON true
LEFT JOIN LATERAL (
    SELECT g.action, g.reason, g.numbers FROM gardener_decisions g
    WHERE g.canon_name = t.canon_name AND ($2::int IS NULL OR g.rung = $2)
    ORDER BY g.id DESC LIMIT 1
) d ON true
WHERE t.account = $1 AND ($3::text IS NULL OR t.race = $3)
ORDER BY t.race, t.canon_name

-- name: snapshot_trials_meta
-- One race's trials without their samples (the loop's sample cache holds those), with how
-- many samples each has now: a count above what the cache holds plus what is new by id means
-- a row committed behind the cache's watermark, and that trial is read again in full.
SELECT t.canon_name, t.variant, t.seed, t.format, t.hidden_size, t.parent, t.rung,
       t.desired_state, t.observed_state, t.corpus_sha256, t.corpus, t.steps AS max_steps,
       extract(epoch FROM t.last_sample_at)::float8 AS last_sample_epoch,
       extract(epoch FROM coalesce(t.observed_at, t.updated_at))::float8 AS fallback_epoch,
       (SELECT count(*) FROM bpb_samples b
        WHERE b.canon_name = t.canon_name AND b.seed = t.seed) AS n_samples
FROM igla_race_trials t
WHERE t.race = $1
ORDER BY t.created_at, t.canon_name

-- name: race_samples_after
-- The samples of a race's trials with id above $2, in arrival order.
SELECT b.id, b.canon_name, b.seed, b.step, b.bpb, extract(epoch FROM b.ts)::float8 AS ts
FROM bpb_samples b
JOIN igla_race_trials t ON t.canon_name = b.canon_name AND t.seed = b.seed
WHERE t.race = $1 AND b.id > $2
ORDER BY b.id

-- name: trial_samples_full
-- Every sample of the named trials of a race, in arrival order, with the highest id and time.
SELECT t.canon_name, t.seed,
       coalesce(s.steps, '{}'::int[]) AS sample_steps,
       coalesce(s.bpbs, '{}'::float8[]) AS sample_bpbs,
       s.max_id, extract(epoch FROM s.last_ts)::float8 AS last_ts
FROM igla_race_trials t
LEFT JOIN LATERAL (
    SELECT array_agg(b.step ORDER BY b.id) AS steps, array_agg(b.bpb ORDER BY b.id) AS bpbs,
           max(b.id) AS max_id, max(b.ts) AS last_ts
    FROM bpb_samples b WHERE b.canon_name = t.canon_name AND b.seed = t.seed
) s ON true
WHERE t.race = $1 AND t.canon_name = ANY($2::text[])

-- name: recent_acks
-- Tripwires acknowledged in the last $1 seconds, with the race each one holds.
SELECT e.id, coalesce(e.race, t.race) AS race
FROM tripwire_events e
LEFT JOIN igla_race_trials t ON t.canon_name = e.canon_name
WHERE e.acknowledged_at > now() - make_interval(secs => $1)

-- name: lock_trials_in_order
-- The trial rows one apply transaction changes, locked in name order up front (as the ingest
-- writer locks them), so the two never wait on each other in a cycle.
SELECT 1 FROM igla_race_trials WHERE canon_name = ANY($1::text[]) ORDER BY canon_name FOR UPDATE;
