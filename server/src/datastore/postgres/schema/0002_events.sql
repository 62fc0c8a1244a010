-- Sigil datastore schema, version 2: the change feed other servers follow.
--
-- Every write transaction appends one row per record it changed (kind and
-- key, never the record) and notifies channel `sigil_events` at commit.
-- Rows are appended while the transaction holds the write_lock row, so
-- sequence numbers are assigned in commit order: a server that has read up
-- to N never later finds a smaller one committed (catch-up after a
-- reconnect reads seq > N).

CREATE TABLE events (
    seq bigserial PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('entry', 'agent', 'join_token', 'federated_bundle', 'kill')),
    id text COLLATE "C" NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
