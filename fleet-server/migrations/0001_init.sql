-- edgefleet fleet server, PostgreSQL store: the first schema.
--
-- Records are the JSON the API and the sled store use (jsonb: readable
-- with psql, able to gain fields). Columns outside the JSON exist only
-- where the database enforces a rule (a bundle's name@version claim) or
-- orders rows (audit positions, trust versions).

CREATE TABLE bundles (
    id      text PRIMARY KEY,
    name    text NOT NULL,
    version text NOT NULL,
    record  jsonb NOT NULL,
    -- A name@version names one bundle forever (immutable versions).
    CONSTRAINT bundles_name_version UNIQUE (name, version)
);

-- A device in parts: writers of different parts (the controller's desired
-- state, a device's report, MQTT live state) never overwrite each other.
CREATE TABLE devices (
    id       text PRIMARY KEY,
    identity jsonb NOT NULL,
    desired  jsonb NOT NULL,
    reported jsonb,
    live     jsonb NOT NULL,
    -- The last lifecycle events, oldest first (a bounded ring).
    events   jsonb NOT NULL DEFAULT '[]'
);

CREATE TABLE rollouts (
    id     text PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE experiments (
    id     text PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE enrollment_tokens (
    name   text PRIMARY KEY,
    record jsonb NOT NULL
);

-- Trust documents 2.. of the key chain, by version.
CREATE TABLE trust (
    version bigint PRIMARY KEY,
    record  jsonb NOT NULL
);

-- Maintenance windows by scope (`device:<id>`, `tag:<key>=<value>`).
CREATE TABLE windows (
    scope  text PRIMARY KEY,
    record jsonb NOT NULL
);

-- The audit log; `seq` is an entry's position (`fleetctl audit --after`).
CREATE TABLE audit (
    seq    bigserial PRIMARY KEY,
    record jsonb NOT NULL
);
