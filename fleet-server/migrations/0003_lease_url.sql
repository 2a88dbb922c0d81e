-- What the standbys learn about the active server: where it takes the
-- requests they forward (`[http] advertise_url`, NULL without one), and
-- the secret, fresh at each takeover, that vouches for the client address
-- and certificate those requests carry.
ALTER TABLE edgefleet_lease ADD COLUMN url text, ADD COLUMN secret text;
