-- Where the active server takes requests that a standby forwards
-- (`[http] advertise_url`); NULL when it has none.
ALTER TABLE edgefleet_lease ADD COLUMN url text;
