-- Sigil datastore schema, version 1.
--
-- Keys are compared bytewise (COLLATE "C"), as in the redb backend. Record
-- bodies use the same encodings as redb: JSON text for agents, join tokens,
-- kills and audit records (the audit line exactly as hashed and exported),
-- protobuf bytes for entries and federated bundles. Every body is parsed
-- and validated again when read.

CREATE TABLE agents (
    spiffe_id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE entries (
    id text COLLATE "C" PRIMARY KEY,
    body bytea NOT NULL
);

-- The key is the SHA-256 of the token; the token itself is never stored.
CREATE TABLE join_tokens (
    hash text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE federated_bundles (
    trust_domain text COLLATE "C" PRIMARY KEY,
    body bytea NOT NULL
);

CREATE TABLE kills (
    id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);

CREATE TABLE audit (
    seq bigint PRIMARY KEY CHECK (seq > 0),
    line text NOT NULL
);

-- One row, locked FOR UPDATE by every write transaction: writers (on every
-- server) take turns, as with redb's single writer, so read-modify-write
-- never interleaves and audit appends are serialized on the chain head.
CREATE TABLE write_lock (
    id integer PRIMARY KEY CHECK (id = 1)
);
INSERT INTO write_lock (id) VALUES (1);
