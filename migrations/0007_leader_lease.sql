-- Leadership with a deadline and a fencing token. The leader holds the advisory lock and
-- renews this one row every few seconds; a standby that sees the deadline pass (the leader
-- is dead or cut off from the server, whose session may otherwise keep the lock for hours
-- until TCP gives up) ends the stale lock session and takes over. Each new leader raises
-- `epoch`; every mutating transaction of the loop first reads the row FOR SHARE with its own
-- epoch, so a deposed leader commits nothing once the new one holds the row.
CREATE TABLE gardener_leader (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch       bigint NOT NULL DEFAULT 0,
    holder      text,
    backend_pid integer,
    renewed_at  timestamptz,
    deadline    timestamptz
);
INSERT INTO gardener_leader DEFAULT VALUES;

-- Where each service's log was read up to, so a restarted daemon resumes its tails rather
-- than reading every Railway log again out of the hourly request budget.
CREATE TABLE log_cursors (
    canon_name text PRIMARY KEY,
    backend    text NOT NULL,
    cursor     text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
