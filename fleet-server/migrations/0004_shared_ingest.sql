-- Shared ingest across replicas (docs/brokers.md, "Replicas"). Standbys
-- take their share of the devices' messages from the broker's shared
-- subscription through broker sessions of their own (slots) and keep
-- each message here until the active server has applied it.
CREATE TABLE edgefleet_inbox (
    id bigserial PRIMARY KEY,
    topic text NOT NULL,
    payload bytea NOT NULL,
    slot integer NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- A slot is in use from a standby's first login with it until the
-- active server adopted its broker session (took what the broker had
-- queued there and unsubscribed it): a session left behind by a dead
-- standby would otherwise keep getting its share of the messages.
CREATE TABLE edgefleet_ingest_slots (
    slot integer PRIMARY KEY,
    holder text NOT NULL,
    in_use boolean NOT NULL,
    since timestamptz NOT NULL DEFAULT now()
);
