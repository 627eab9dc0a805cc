-- A tripwire acknowledgement releases what it held at once: the loop listens on
-- gardener_control, and a change of tripwire_events.acknowledged_at is announced there (from
-- `tri tripwire ack` or by hand in SQL), so the tick re-decides the race without waiting for
-- its 30 s rescan. The payload is only a hint; the tick reads the table.
CREATE FUNCTION tripwire_events_ack_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gardener_control', json_build_object(
        'tripwire_ack', NEW.id, 'race', NEW.race, 'canon_name', NEW.canon_name)::text);
    RETURN NEW;
END $$;
CREATE TRIGGER tripwire_events_acknowledged
    AFTER UPDATE OF acknowledged_at ON tripwire_events
    FOR EACH ROW WHEN (NEW.acknowledged_at IS DISTINCT FROM OLD.acknowledged_at)
    EXECUTE FUNCTION tripwire_events_ack_notify();

-- The tick asks for the acknowledgements of the last minutes after each such notification.
CREATE INDEX tripwire_events_acknowledged_at ON tripwire_events (acknowledged_at)
    WHERE acknowledged_at IS NOT NULL;
