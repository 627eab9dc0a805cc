-- The worker loop: held decisions are logged once per natural key, and the time the observed
-- state of a trial last changed is kept (a trial that runs and never reports is stalled).

-- A held decision (applied = false) is recorded once per (canon name, rung, action), not once
-- per tick; the applied one keeps its own index from 0001.
CREATE UNIQUE INDEX gardener_decisions_held_once
    ON gardener_decisions (canon_name, rung, action) WHERE NOT applied;

ALTER TABLE igla_race_trials ADD COLUMN observed_at timestamptz;

-- The loop asks "which running trials of running races" every tick.
CREATE INDEX races_running ON races (name) WHERE status = 'running';
