-- Sigil datastore schema, version 6: the change feed keeps a bounded
-- window.
--
-- Servers delete old events (the newest ones and those of the last minutes
-- are always kept); `pruned_through` records the highest sequence number
-- deleted. A server whose last applied event is below it has missed events
-- that are gone and reloads every record instead of reading the feed.

CREATE TABLE events_horizon (
    id integer PRIMARY KEY CHECK (id = 1),
    pruned_through bigint NOT NULL
);
INSERT INTO events_horizon (id, pruned_through) VALUES (1, 0);
