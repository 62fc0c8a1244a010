-- Sigil datastore schema, version 4: each server's published public keys.
--
-- One row per server (its ID): the X.509 CA certificates and JWT public
-- keys it publishes, current and next, with their expiries, as JSON. Never
-- a private key. Every server serves the union in its bundle; changes are
-- announced on the change feed as kind 'server_keys'.

CREATE TABLE server_keys (
    server_id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check
    CHECK (kind IN ('entry', 'agent', 'join_token', 'federated_bundle', 'kill', 'approval', 'server_keys'));
