-- The active lease: one fleet-server at a time serves a database (the
-- others wait as standbys). The holder also holds a session advisory lock;
-- this row numbers the holders, and every write batch checks it (FOR
-- SHARE), so a server that lost the lease can no longer write (fencing).
CREATE TABLE edgefleet_lease (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch       bigint NOT NULL,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now()
);
