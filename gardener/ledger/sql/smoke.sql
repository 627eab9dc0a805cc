-- Queries of an interrupted smoke race (gardener/race/smoke.py): what the worker loop would
-- have written back had it still been running.

-- name: set_trial_observed
UPDATE igla_race_trials
SET observed_state = $3,
    observed_at = CASE WHEN observed_state IS DISTINCT FROM $3 THEN now() ELSE observed_at END,
    updated_at = now()
WHERE race = $1 AND canon_name = $2 AND observed_state IS DISTINCT FROM $3

-- name: race_status
SELECT status FROM races WHERE name = $1
