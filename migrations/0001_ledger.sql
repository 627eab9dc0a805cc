-- The ledger: trials, samples, EXP_IDs, champion slots, seeds, decisions, control, quarantine,
-- tripwires. Applied once, in one transaction, by `gardener migrate`.

CREATE TABLE races (
    name         text PRIMARY KEY,
    account      text NOT NULL,
    kind         text NOT NULL DEFAULT 'hunt' CHECK (kind IN ('smoke', 'hunt', 'champion', 'backtest')),
    config       jsonb NOT NULL DEFAULT '{}'::jsonb,
    status       text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'torn_down', 'failed')),
    horizon      integer CHECK (horizon > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);

CREATE TABLE igla_race_trials (
    canon_name      text PRIMARY KEY,
    race            text NOT NULL REFERENCES races (name),
    account         text NOT NULL,
    model           text NOT NULL,
    format          text NOT NULL,
    tags            text[] NOT NULL,
    variant         text NOT NULL,
    hidden_size     integer CHECK (hidden_size > 0),
    seed            bigint NOT NULL CHECK (seed >= 0 AND seed < 4294967296),
    exp_id          integer UNIQUE CHECK (exp_id BETWEEN 1 AND 9999),
    parent          text REFERENCES igla_race_trials (canon_name),
    spawn_reason    text NOT NULL DEFAULT 'initial',
    seed_strategy   text,
    steps           integer CHECK (steps > 0),
    variables       jsonb NOT NULL DEFAULT '{}'::jsonb,
    desired_state   text NOT NULL DEFAULT 'running' CHECK (desired_state IN ('running', 'stopped', 'removed')),
    observed_state  text NOT NULL DEFAULT 'pending',
    seed_state      text,
    rung            integer NOT NULL DEFAULT -1,
    fit_bpb_inf     double precision,
    fit_ci_low      double precision,
    fit_ci_high     double precision,
    fit_p           double precision,
    fit_a           double precision,
    best_bpb        double precision,
    last_step       integer,
    last_bpb        double precision,
    last_sample_at  timestamptz,
    corpus          text,
    corpus_sha256   text,
    corpus_reported_at timestamptz,
    backend         text,
    service_id      text,
    deployment_id   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX igla_race_trials_race ON igla_race_trials (race);
CREATE INDEX igla_race_trials_account ON igla_race_trials (account);

-- Samples carry no foreign key: ingest checks the trial once per batch, not per row.
CREATE TABLE bpb_samples (
    id           bigserial PRIMARY KEY,
    canon_name   text NOT NULL,
    seed         bigint NOT NULL,
    step         integer NOT NULL CHECK (step >= 0),
    bpb          double precision NOT NULL CHECK (bpb >= 0 AND bpb < 'Infinity'::float8),
    ts           timestamptz NOT NULL DEFAULT now(),
    source       text NOT NULL DEFAULT 'unknown',
    ingested_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (canon_name, seed, step)
);

-- EXP_IDs: a sequence hands them out; exp_ids records who holds each one.
CREATE SEQUENCE exp_id_seq START WITH 5 MINVALUE 1 MAXVALUE 9999 NO CYCLE;

CREATE TABLE exp_ids (
    exp_id      integer PRIMARY KEY CHECK (exp_id BETWEEN 1 AND 9999),
    account     text NOT NULL,
    canon_name  text,
    claimed_by  text,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);

-- Champion slots E0001..E0004 are locked; E0004 holds the current champion.
CREATE TABLE champion_slots (
    exp_id      integer PRIMARY KEY REFERENCES exp_ids (exp_id),
    canon_name  text,
    bpb         double precision,
    seed        bigint,
    locked      boolean NOT NULL DEFAULT true,
    note        text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO exp_ids (exp_id, account, canon_name, claimed_by) VALUES
    (1, 'acc1', NULL, 'champion-slot'),
    (2, 'acc1', NULL, 'champion-slot'),
    (3, 'acc1', NULL, 'champion-slot'),
    (4, 'acc1', 'IGLA-TRAIN_V2-FP32-CHAMP-seed42', 'champion-slot');
INSERT INTO champion_slots (exp_id, canon_name, bpb, seed, note) VALUES
    (1, NULL, NULL, NULL, 'reserved'),
    (2, NULL, NULL, NULL, 'reserved'),
    (3, NULL, NULL, NULL, 'reserved'),
    (4, 'IGLA-TRAIN_V2-FP32-CHAMP-seed42', 1.8921, 42, 'current champion IGLA-TRAIN_V2-FP32');

-- NEVER REUSE: a seed once used for a variant is never used for it again.
CREATE TABLE used_seeds (
    variant     text NOT NULL,
    seed        bigint NOT NULL,
    canon_name  text NOT NULL,
    used_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (variant, seed)
);

-- The audit trail: append-only, every decision with the numbers behind it.
CREATE TABLE gardener_decisions (
    id           bigserial PRIMARY KEY,
    race         text NOT NULL,
    rung         integer NOT NULL,
    canon_name   text NOT NULL,
    action       text NOT NULL,
    seed_state   text,
    numbers      jsonb NOT NULL DEFAULT '{}'::jsonb,
    reason       text NOT NULL,
    applied      boolean NOT NULL,
    applied_at   timestamptz,
    held_reason  text,
    decided_by   text,
    decided_at   timestamptz NOT NULL DEFAULT now()
);
-- Exactly once: an applied decision's natural key can be written a single time.
CREATE UNIQUE INDEX gardener_decisions_natural_key
    ON gardener_decisions (canon_name, rung, action) WHERE applied;
CREATE INDEX gardener_decisions_race ON gardener_decisions (race, decided_at);

CREATE FUNCTION gardener_decisions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'gardener_decisions is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER gardener_decisions_no_update BEFORE UPDATE OR DELETE ON gardener_decisions
    FOR EACH ROW EXECUTE FUNCTION gardener_decisions_append_only();
CREATE TRIGGER gardener_decisions_no_truncate BEFORE TRUNCATE ON gardener_decisions
    FOR EACH STATEMENT EXECUTE FUNCTION gardener_decisions_append_only();

-- The pause flag: one row; any change is announced on the gardener_control channel.
CREATE TABLE gardener_control (
    id          integer PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    paused      boolean NOT NULL DEFAULT false,
    reason      text,
    changed_by  text,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO gardener_control (id, paused, reason, changed_by) VALUES (1, false, 'initial', 'migrate');

CREATE FUNCTION gardener_control_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gardener_control', json_build_object(
        'paused', NEW.paused, 'reason', NEW.reason, 'changed_by', NEW.changed_by)::text);
    RETURN NEW;
END $$;
CREATE TRIGGER gardener_control_changed AFTER UPDATE ON gardener_control
    FOR EACH ROW EXECUTE FUNCTION gardener_control_notify();

-- Every rejected input, verbatim, with why.
CREATE TABLE sample_quarantine (
    id           bigserial PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT now(),
    source       text NOT NULL,
    account      text,
    canon_name   text,
    raw          text NOT NULL,
    reason       text NOT NULL
);
CREATE INDEX sample_quarantine_canon ON sample_quarantine (canon_name);

CREATE TABLE tripwire_events (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL,
    race             text,
    canon_name       text,
    dedupe_key       text NOT NULL,
    evidence         jsonb NOT NULL DEFAULT '{}'::jsonb,
    blocks_promotions boolean NOT NULL DEFAULT false,
    fired_at         timestamptz NOT NULL DEFAULT now(),
    acknowledged_by  text,
    acknowledged_at  timestamptz
);
-- One event per condition: the dedupe key names the condition (kind, trial, evidence).
CREATE UNIQUE INDEX tripwire_events_once ON tripwire_events (dedupe_key);
