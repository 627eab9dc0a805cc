-- The plan's workflow: champion slots have owners, and the champions' seeds are used seeds.
--
-- A slot belongs to the account that holds its EXP_ID (acc1 for E0001..E0004 from the first
-- migration); every change of a slot checks it. NEVER REUSE covers the champions too: the
-- seed of a seeded champion (E0004: IGLA-TRAIN_V2-FP32-CHAMP-seed42) is a used seed of its
-- variant, so no trial can be admitted under that name or seed again.
ALTER TABLE champion_slots ADD COLUMN account text;
UPDATE champion_slots s SET account = e.account FROM exp_ids e WHERE e.exp_id = s.exp_id;
ALTER TABLE champion_slots ALTER COLUMN account SET NOT NULL;

-- The variant is the canon name without its EXP_ID and seed (gardener.core.canon.variant).
INSERT INTO used_seeds (variant, seed, canon_name)
SELECT regexp_replace(s.canon_name, '(-E[0-9]{4,})?-seed[0-9]+$', ''), s.seed, s.canon_name
FROM champion_slots s
WHERE s.canon_name IS NOT NULL AND s.seed IS NOT NULL
ON CONFLICT (variant, seed) DO NOTHING;
