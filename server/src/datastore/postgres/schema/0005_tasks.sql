-- Sigil datastore schema, version 5: task-scoped identities (issue 11).
--
-- tasks: one row per task, running or ended, by ID; JSON text bodies as in
-- redb. Not in the change feed: servers read a task from here whenever
-- they use it, and a task's end reaches them as the kill it creates.

CREATE TABLE tasks (
    id text COLLATE "C" PRIMARY KEY,
    body text NOT NULL
);
