"""The SQLite schema and its migrations. `PRAGMA user_version` holds the schema version."""

from __future__ import annotations

SCHEMA_VERSION = 11

_V1 = """
CREATE TABLE cubes (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  owner TEXT,
  created_at REAL NOT NULL,
  embed_model TEXT NOT NULL,
  embed_dim INTEGER NOT NULL,
  generation INTEGER NOT NULL DEFAULT 0,
  metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE items (
  rowid INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL UNIQUE,
  cube_id INTEGER NOT NULL REFERENCES cubes(id),
  kind TEXT NOT NULL CHECK (kind IN ('turn','session','fact','insight','procedure','core')),
  content TEXT,
  content_hash TEXT,
  role TEXT, speaker TEXT,
  user_id TEXT, agent_id TEXT, session_id TEXT,
  parent_id TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  tags TEXT NOT NULL DEFAULT '[]',
  observed_at REAL, valid_from REAL, valid_to REAL,
  recorded_at REAL NOT NULL, updated_at REAL NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active','archived','superseded','deleted')),
  version INTEGER NOT NULL DEFAULT 1,
  superseded_by TEXT,
  source_ids TEXT NOT NULL DEFAULT '[]',
  producer TEXT NOT NULL,
  access_count INTEGER NOT NULL DEFAULT 0,
  last_accessed REAL,
  importance REAL NOT NULL DEFAULT 0.5,
  kv_blocks TEXT NOT NULL DEFAULT '[]',
  shards TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX items_scope ON items (cube_id, status, user_id, agent_id, session_id);
CREATE INDEX items_session ON items (cube_id, session_id, kind);
CREATE INDEX items_time ON items (cube_id, observed_at);
CREATE INDEX items_parent ON items (parent_id);
-- search keys: each item has one or more (a long turn has one per chunk); FTS and vectors index keys
CREATE TABLE keys (
  rowid INTEGER PRIMARY KEY AUTOINCREMENT,
  item_rowid INTEGER NOT NULL REFERENCES items(rowid),
  role TEXT NOT NULL,
  vec BLOB  -- NULL: a text-only key (FTS), not in the vector index
);
CREATE INDEX keys_item ON keys (item_rowid);
-- scope holds tokens for the key's cube, user, agent and session, so a scoped search intersects
-- posting lists inside FTS5 instead of filtering every match of the whole store afterwards
CREATE VIRTUAL TABLE keys_fts USING fts5 (
  text, scope, content='', contentless_delete=1,
  tokenize='porter unicode61 remove_diacritics 2'
);
INSERT INTO keys_fts (keys_fts, rank) VALUES ('secure-delete', 1);
CREATE TABLE versions (
  item_rowid INTEGER NOT NULL REFERENCES items(rowid),
  version INTEGER NOT NULL,
  content TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  status TEXT NOT NULL,
  valid_from REAL, valid_to REAL,
  changed_at REAL NOT NULL,
  reason TEXT NOT NULL,
  actor TEXT NOT NULL,
  PRIMARY KEY (item_rowid, version)
);
CREATE TABLE audit (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  at REAL NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  cube TEXT,
  item_ids TEXT NOT NULL DEFAULT '[]',
  detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER audit_append_only_update BEFORE UPDATE ON audit
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_append_only_delete BEFORE DELETE ON audit
  BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

# v2: a version records what superseded the item and which source items (turns) caused the
# change; an index finds derived items
_V2 = """
ALTER TABLE versions ADD COLUMN superseded_by TEXT;
ALTER TABLE versions ADD COLUMN source_ids TEXT NOT NULL DEFAULT '[]';
-- derived items (facts with provenance), for deleting what was derived from a deleted item
CREATE INDEX items_derived ON items (cube_id) WHERE source_ids != '[]';
"""

# v3: users, API keys (hashed) and cube grants, for the server
_V3 = """
CREATE TABLE users (
  id TEXT PRIMARY KEY,
  role TEXT NOT NULL CHECK (role IN ('admin','user')),
  created_at REAL NOT NULL
);
CREATE TABLE api_keys (
  id TEXT PRIMARY KEY,           -- the public part of the key, shown in lists
  user_id TEXT NOT NULL REFERENCES users(id),
  hash TEXT NOT NULL,            -- sha256 of the secret part; the secret itself is never stored
  cubes TEXT,                    -- JSON list restricting the key to these cubes, or NULL
  label TEXT,
  created_at REAL NOT NULL,
  last_used REAL,
  revoked_at REAL
);
CREATE INDEX api_keys_user ON api_keys (user_id);
CREATE TABLE grants (
  cube_id INTEGER NOT NULL REFERENCES cubes(id),
  user_id TEXT NOT NULL REFERENCES users(id),
  access TEXT NOT NULL CHECK (access IN ('read','write')),
  granted_by TEXT NOT NULL,
  granted_at REAL NOT NULL,
  PRIMARY KEY (cube_id, user_id)
);
"""

# v4: KV blocks of the activation tier (the tensors are files beside the database; a row says
# which items a block holds, for which model, and how it is used)
_V4 = """
CREATE TABLE kv_blocks (
  id TEXT PRIMARY KEY,
  cube_id INTEGER NOT NULL REFERENCES cubes(id),
  model_key TEXT NOT NULL,       -- hash of the model identity (weights, dtype, library, template)
  user_id TEXT, agent_id TEXT,
  file TEXT NOT NULL,            -- relative to the database's .kv folder
  item_ids TEXT NOT NULL,        -- JSON list, in block order
  tokens INTEGER NOT NULL,
  bytes INTEGER NOT NULL,
  created_at REAL NOT NULL,
  last_used REAL,
  uses INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX kv_blocks_scope ON kv_blocks (cube_id, model_key);
"""

# v5: LoRA shards of the parametric tier (adapters are folders beside the database); a change
# to an item a shard was trained on marks the shard stale until `maintain` retrains it
_V5 = """
CREATE TABLE shards (
  id TEXT PRIMARY KEY,
  cube_id INTEGER NOT NULL REFERENCES cubes(id),
  model_key TEXT NOT NULL,
  folder TEXT NOT NULL,          -- relative to the database's .shards folder
  item_ids TEXT NOT NULL,        -- JSON list of the items trained on
  parent TEXT,                   -- the shard this one continued from (sequential)
  status TEXT NOT NULL CHECK (status IN ('active','stale')),
  changed_items TEXT NOT NULL DEFAULT '[]',  -- items changed or deleted since training
  created_at REAL NOT NULL
);
"""

# v6: a session is its whole scope (cube, user, agent, session id). Stores written before this
# may hold sessions whose turns mix users or agents that chose the same session id; the
# `split_sessions` repair (it needs the embedder, so Memory runs it when it opens the store)
# splits them and rebuilds their turns' context keys. `repairs` records what ran and what changed.
_V6 = """
DROP INDEX items_session;
CREATE INDEX items_session ON items (cube_id, session_id, kind, user_id, agent_id);
CREATE TABLE repairs (
  name TEXT PRIMARY KEY,
  state TEXT NOT NULL CHECK (state IN ('pending','done')),
  done_at REAL,
  detail TEXT NOT NULL DEFAULT '{}'
);
INSERT INTO repairs (name, state) VALUES ('split_sessions', 'pending');
"""

# v7: the cubes a user may read, found by owner and by grantee in one indexed statement (the
# server asks it for every request's wall)
_V7 = """
CREATE INDEX IF NOT EXISTS cubes_owner ON cubes (owner);
CREATE INDEX IF NOT EXISTS grants_user ON grants (user_id);
"""

# v8: leases (store/locks.py): work that runs in one process at a time, such as background
# maintenance, holds one until it releases it or the lease runs out. IF NOT EXISTS: a store
# whose version was set back runs this again.
_V8 = """
CREATE TABLE IF NOT EXISTS locks (
  name TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  expires_at REAL NOT NULL  -- seconds since the epoch
);
"""

# v9: the audit log's hash chain (store/chain.py): each entry's hash and the previous entry's.
# Entries written before have neither; the first chained entry's `prev` covers them.
_V9 = """
ALTER TABLE audit ADD COLUMN prev TEXT;
ALTER TABLE audit ADD COLUMN hash TEXT;
"""

# v10: retention (govern/retention.py): an item's expiry, and each cube's policies by kind
# ('*': the kinds without their own). Durations in seconds; NULL: that rule is off.
_V10 = """
ALTER TABLE items ADD COLUMN expires_at REAL;
CREATE INDEX IF NOT EXISTS items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS retention (
  cube_id INTEGER NOT NULL REFERENCES cubes(id),
  kind TEXT NOT NULL,
  expire_after REAL,    -- an item expires this long after it was recorded
  archive_unused REAL,  -- an item nobody read (get or search hit) for this long is archived
  purge_after REAL,     -- an archived or expired item is purged this long after
  set_by TEXT NOT NULL,
  set_at REAL NOT NULL,
  PRIMARY KEY (cube_id, kind)
);
"""

# v11: feedback (learn/feedback.py): the kind `feedback`, and the answers and generations that
# feedback can name (which memories each used). SQLite cannot alter a CHECK constraint; the
# documented way to widen one that every existing row passes is to edit the table's SQL in
# sqlite_schema (https://www.sqlite.org/lang_altertable.html, "making other kinds of table
# schema changes"); _migrate then bumps schema_version so the connection reloads it.
_V11 = """
PRAGMA writable_schema = ON;
UPDATE sqlite_schema SET sql = replace(sql, '''procedure'',''core'')', '''procedure'',''core'',''feedback'')') WHERE type = 'table' AND name = 'items' AND sql NOT LIKE '%''feedback''%';
PRAGMA writable_schema = OFF;
CREATE TABLE IF NOT EXISTS answers (
  id TEXT NOT NULL,
  cube_id INTEGER NOT NULL REFERENCES cubes(id),
  kind TEXT NOT NULL CHECK (kind IN ('answer','generation')),
  user_id TEXT, agent_id TEXT,
  query TEXT NOT NULL,
  item_ids TEXT NOT NULL DEFAULT '[]',
  created_at REAL NOT NULL,
  PRIMARY KEY (id, cube_id)
);
CREATE INDEX IF NOT EXISTS answers_time ON answers (created_at);
"""

# MIGRATIONS[n] takes a database at version n to version n + 1.
MIGRATIONS: dict[int, str] = {0: _V1, 1: _V2, 2: _V3, 3: _V4, 4: _V5, 5: _V6, 6: _V7,
                              7: _V8, 8: _V9, 9: _V10, 10: _V11}
