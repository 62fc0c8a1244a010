-- Sigil datastore schema, version 3: governance (issue 11).
--
-- usage_marks: last activity of an entry or agent (key `kind/id`), written
-- in batches at most once a minute; JSON text bodies as in redb.
-- approvals: approval requests of `require_approval` entries, by ID (in the
-- change feed as kind `approval`); JSON
-- text bodies as in redb.

CREATE TABLE usage_marks (
    key text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE approvals (
    id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

-- Approval requests are in the change feed too.
ALTER TABLE events DROP CONSTRAINT events_kind_check;
ALTER TABLE events ADD CONSTRAINT events_kind_check
    CHECK (kind IN ('entry', 'agent', 'join_token', 'federated_bundle', 'kill', 'approval'));
