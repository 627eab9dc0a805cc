-- EXP_IDs have no upper bound: `E<EXP_ID:04>` is a minimum width, and a fleet running 60
-- trials a day passes E9999 within a year. Ids stay positive integers; E10000 and beyond
-- are allocated, stored and sorted like any other (the column is numeric, so they sort by
-- value, not by text).
ALTER TABLE igla_race_trials DROP CONSTRAINT igla_race_trials_exp_id_check;
ALTER TABLE igla_race_trials ADD CONSTRAINT igla_race_trials_exp_id_check CHECK (exp_id >= 1);
ALTER TABLE exp_ids DROP CONSTRAINT exp_ids_exp_id_check;
ALTER TABLE exp_ids ADD CONSTRAINT exp_ids_exp_id_check CHECK (exp_id >= 1);
ALTER SEQUENCE exp_id_seq MAXVALUE 2147483647;
