-- name: next_exp_id
-- The id the next claim would get, without taking it: skips ids claimed explicitly.
WITH seq AS (
    SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END AS v FROM exp_id_seq
)
-- The answer is the sequence's next value or one past an id already held at or beyond it.
SELECT min(c) FROM (
    SELECT v AS c FROM seq
    UNION ALL
    SELECT e.exp_id + 1 FROM exp_ids e, seq WHERE e.exp_id >= seq.v
) AS candidates
WHERE NOT EXISTS (SELECT 1 FROM exp_ids e WHERE e.exp_id = c)

-- name: claim_from_sequence
INSERT INTO exp_ids (exp_id, account, claimed_by)
VALUES (nextval('exp_id_seq'), $1, $2)
ON CONFLICT (exp_id) DO NOTHING
RETURNING exp_id

-- name: skip_to_exp_id
-- Move the sequence forward to $1 (the next claim takes $1 + 1), never back: a concurrent
-- claim that moved it further keeps its place, and ON CONFLICT still guards every id.
SELECT setval('exp_id_seq', $1::bigint) FROM exp_id_seq WHERE last_value < $1::bigint

-- name: exp_id_row
SELECT e.exp_id, e.account, e.canon_name, e.claimed_by, s.exp_id IS NOT NULL AS is_slot,
       s.locked, s.canon_name AS slot_canon
FROM exp_ids e LEFT JOIN champion_slots s USING (exp_id)
WHERE e.exp_id = $1

-- name: claim_exact_exp_id
INSERT INTO exp_ids (exp_id, account, canon_name, claimed_by) VALUES ($1, $2, $3, $4)
ON CONFLICT (exp_id) DO NOTHING
RETURNING exp_id

-- name: bind_exp_id
UPDATE exp_ids SET canon_name = $2 WHERE exp_id = $1 AND canon_name IS NULL AND account = $3
RETURNING exp_id

-- name: champion_slots
SELECT s.exp_id, s.canon_name, s.bpb, s.seed, s.locked, s.note, s.account AS owner,
       t.desired_state, t.observed_state, t.account
FROM champion_slots s LEFT JOIN igla_race_trials t ON t.canon_name = s.canon_name
WHERE ($1::text IS NULL OR s.account = $1)
ORDER BY s.exp_id

-- name: champion_slot_for_update
SELECT s.exp_id, s.canon_name, s.locked, s.account AS owner, t.desired_state,
       t.observed_state, t.account
FROM champion_slots s LEFT JOIN igla_race_trials t ON t.canon_name = s.canon_name
WHERE s.exp_id = $1
FOR UPDATE OF s

-- name: rebind_champion_slot
UPDATE champion_slots SET canon_name = $2, seed = $3, bpb = $4, note = $5, updated_at = now()
WHERE exp_id = $1

-- name: ensure_race
INSERT INTO races (name, account, kind, horizon, config) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (name) DO NOTHING

-- name: race
SELECT name, account, kind, status, horizon, config, created_at, finished_at FROM races WHERE name = $1

-- name: use_seed
INSERT INTO used_seeds (variant, seed, canon_name) VALUES ($1, $2, $3)
ON CONFLICT (variant, seed) DO NOTHING
RETURNING canon_name

-- name: seed_owner
SELECT canon_name FROM used_seeds WHERE variant = $1 AND seed = $2

-- name: used_seeds_of
SELECT seed FROM used_seeds WHERE variant = $1

-- name: insert_trial
INSERT INTO igla_race_trials (
    canon_name, race, account, model, format, tags, variant, hidden_size, seed, exp_id,
    parent, spawn_reason, seed_strategy, steps, variables, backend)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
ON CONFLICT (canon_name) DO NOTHING
RETURNING canon_name

-- name: trial
SELECT * FROM igla_race_trials WHERE canon_name = $1

-- name: trial_for_update
SELECT * FROM igla_race_trials WHERE canon_name = $1 FOR UPDATE

-- name: set_desired_state
UPDATE igla_race_trials SET desired_state = $2, updated_at = now() WHERE canon_name = $1

-- name: insert_decision
INSERT INTO gardener_decisions (
    race, rung, canon_name, action, seed_state, numbers, reason, applied, applied_at,
    held_reason, decided_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $8 THEN now() END, $9, $10)
ON CONFLICT (canon_name, rung, action) WHERE applied DO NOTHING
RETURNING id

-- name: control
SELECT paused, reason, changed_by, changed_at FROM gardener_control WHERE id = 1

-- name: set_paused
UPDATE gardener_control SET paused = $1, reason = $2, changed_by = $3, changed_at = now()
WHERE id = 1
RETURNING paused, reason, changed_by, changed_at

-- name: tripwire_for_update
SELECT t.*, coalesce(tr.account, r.account) AS account
FROM tripwire_events t
LEFT JOIN igla_race_trials tr ON tr.canon_name = t.canon_name
LEFT JOIN races r ON r.name = t.race
WHERE t.id = $1
FOR UPDATE OF t

-- name: ack_tripwire
UPDATE tripwire_events SET acknowledged_by = $2, acknowledged_at = now()
WHERE id = $1 AND acknowledged_at IS NULL
RETURNING id

-- name: ledger_counts
-- Everything, or only what concerns the account $1.
SELECT (SELECT count(*) FROM races WHERE $1::text IS NULL OR account = $1) AS races,
       (SELECT count(*) FROM igla_race_trials WHERE $1::text IS NULL OR account = $1) AS trials,
       (SELECT count(*) FROM bpb_samples b WHERE $1::text IS NULL OR EXISTS (
            SELECT 1 FROM igla_race_trials t WHERE t.canon_name = b.canon_name AND t.account = $1
       )) AS samples,
       (SELECT count(*) FROM gardener_decisions d WHERE $1::text IS NULL OR EXISTS (
            SELECT 1 FROM races r WHERE r.name = d.race AND r.account = $1)) AS decisions,
       (SELECT count(*) FROM sample_quarantine WHERE $1::text IS NULL OR account = $1)
           AS quarantined,
       (SELECT count(*) FROM tripwire_events e
        LEFT JOIN igla_race_trials t ON t.canon_name = e.canon_name
        LEFT JOIN races r ON r.name = e.race
        WHERE e.acknowledged_at IS NULL
          AND ($1::text IS NULL OR coalesce(t.account, r.account) = $1)) AS open_tripwires,
       (SELECT count(*) FROM exp_ids WHERE $1::text IS NULL OR account = $1) AS exp_ids_taken

-- name: trial_by_exp_id
SELECT * FROM igla_race_trials WHERE exp_id = $1

-- name: trials_by_seed
-- A trial named by its seed alone (`--leader 200`): the account's trials with that seed,
-- running ones first.
SELECT * FROM igla_race_trials WHERE account = $1 AND seed = $2
ORDER BY desired_state = 'running' DESC, created_at DESC, canon_name

-- name: tripwire_list
-- Open (or, with $1, all) tripwire events; with $2 only those of that account's trials and races.
SELECT e.id, e.kind, e.race, e.canon_name, e.evidence, e.fired_at, e.acknowledged_by,
       coalesce(t.account, r.account) AS account
FROM tripwire_events e
LEFT JOIN igla_race_trials t ON t.canon_name = e.canon_name
LEFT JOIN races r ON r.name = e.race
WHERE ($1 OR e.acknowledged_at IS NULL)
  AND ($2::text IS NULL OR coalesce(t.account, r.account) = $2)
ORDER BY e.id
