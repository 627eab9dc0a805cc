-- The worker loop: held decisions are logged once per natural key, and the time the observed
-- state of a trial last changed is kept (a trial that runs and never reports is stalled).

-- A held decision (applied = false) is recorded once per (canon name, rung, action), not once
-- per tick; the applied one keeps its own index from 0001.
CREATE UNIQUE INDEX gardener_decisions_held_once
    ON gardener_decisions (canon_name, rung, action) WHERE NOT applied;

ALTER TABLE igla_race_trials ADD COLUMN observed_at timestamptz;

-- The loop asks "which running trials of running races" every tick.
CREATE INDEX races_running ON races (name) WHERE status = 'running';

-- A change of what a trial should be doing (a kill from the CLI, a teardown, a new trial)
-- wakes the reconciler at once; the payload is only a hint, the reconciler reads the table.
CREATE FUNCTION igla_race_trials_desired_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gardener_desired', NEW.canon_name);
    RETURN NEW;
END $$;
CREATE TRIGGER igla_race_trials_desired_changed
    AFTER INSERT OR UPDATE OF desired_state ON igla_race_trials
    FOR EACH ROW EXECUTE FUNCTION igla_race_trials_desired_notify();
