-- Scale: the tick's fleet-wide questions touch only the live trials, and a race's snapshot
-- finds its tripwires by index, however long the ledger's history grows.

-- Live trials by race: the level-triggered rescan and the stall check read only these (a
-- ledger that ran a hundred races keeps their stopped trials forever).
CREATE INDEX igla_race_trials_live ON igla_race_trials (race) WHERE desired_state = 'running';

-- A race's tripwires, by race or by one of its trials (read at every snapshot of the race).
CREATE INDEX tripwire_events_race ON tripwire_events (race);
CREATE INDEX tripwire_events_canon_name ON tripwire_events (canon_name);
