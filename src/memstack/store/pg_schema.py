"""The PostgreSQL schema and its migrations; `memstack_schema` holds the version.

Every table of memory data carries its cube in the primary key (ready for partitioning or
distributing by cube); rowids come from one sequence per table, so they stay unique across
cubes as SQLite's do. Vectors are pgvector columns indexed by HNSW, one partial index per
dimension (a cube's model fixes it). Full text: a `tsvector` of each key under the `memstack`
configuration (English Snowball stemming, no stopword list, like FTS5's porter tokenizer) with
the key's length in tokens, for BM25 (postgres.py). The audit log refuses UPDATE and DELETE.
"""

from __future__ import annotations

SCHEMA_VERSION = 8

_V1 = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TEXT SEARCH DICTIONARY memstack_stem (TEMPLATE = snowball, Language = english);
CREATE TEXT SEARCH CONFIGURATION memstack (COPY = simple);
ALTER TEXT SEARCH CONFIGURATION memstack ALTER MAPPING FOR asciiword, word, asciihword,
  hword, hword_part, hword_asciipart, numword, numhword WITH memstack_stem;
CREATE TABLE cubes (
  id BIGSERIAL PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  owner TEXT,
  created_at DOUBLE PRECISION NOT NULL,
  embed_model TEXT NOT NULL,
  embed_dim INTEGER NOT NULL,
  generation BIGINT NOT NULL DEFAULT 0,
  metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE items (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  rowid BIGSERIAL,
  id TEXT NOT NULL UNIQUE,
  kind TEXT NOT NULL CHECK (kind IN ('turn','session','fact','insight','procedure','core')),
  content TEXT,
  content_hash TEXT,
  role TEXT, speaker TEXT,
  user_id TEXT, agent_id TEXT, session_id TEXT,
  parent_id TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  tags TEXT NOT NULL DEFAULT '[]',
  observed_at DOUBLE PRECISION, valid_from DOUBLE PRECISION, valid_to DOUBLE PRECISION,
  recorded_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active','archived','superseded','deleted')),
  version INTEGER NOT NULL DEFAULT 1,
  superseded_by TEXT,
  source_ids TEXT NOT NULL DEFAULT '[]',
  producer TEXT NOT NULL,
  access_count BIGINT NOT NULL DEFAULT 0,
  last_accessed DOUBLE PRECISION,
  importance DOUBLE PRECISION NOT NULL DEFAULT 0.5,
  kv_blocks TEXT NOT NULL DEFAULT '[]',
  shards TEXT NOT NULL DEFAULT '[]',
  PRIMARY KEY (cube_id, rowid),
  UNIQUE (rowid)
);
CREATE INDEX items_scope ON items (cube_id, status, user_id, agent_id, session_id);
CREATE INDEX items_session ON items (cube_id, session_id, kind, user_id, agent_id);
CREATE INDEX items_time ON items (cube_id, observed_at);
CREATE INDEX items_parent ON items (parent_id);
CREATE INDEX items_derived ON items (cube_id) WHERE source_ids != '[]';
CREATE TABLE keys (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  rowid BIGSERIAL,
  item_rowid BIGINT NOT NULL REFERENCES items(rowid),
  role TEXT NOT NULL,
  tsv TSVECTOR NOT NULL,
  length INTEGER NOT NULL,
  vec VECTOR,  -- NULL: a text-only key (full text), not in the vector index
  PRIMARY KEY (cube_id, rowid),
  UNIQUE (rowid)
);
CREATE INDEX keys_item ON keys (item_rowid);
CREATE INDEX keys_tsv ON keys USING gin (tsv);
CREATE TABLE versions (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  item_rowid BIGINT NOT NULL REFERENCES items(rowid),
  version INTEGER NOT NULL,
  content TEXT,
  metadata TEXT NOT NULL DEFAULT '{}',
  status TEXT NOT NULL,
  valid_from DOUBLE PRECISION, valid_to DOUBLE PRECISION,
  changed_at DOUBLE PRECISION NOT NULL,
  reason TEXT NOT NULL,
  actor TEXT NOT NULL,
  superseded_by TEXT,
  source_ids TEXT NOT NULL DEFAULT '[]',
  PRIMARY KEY (cube_id, item_rowid, version)
);
-- the shared rows insert versions by item; the cube comes from the item
CREATE FUNCTION memstack_version_cube() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.cube_id IS NULL THEN
    SELECT cube_id INTO NEW.cube_id FROM items WHERE rowid = NEW.item_rowid;
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER versions_cube BEFORE INSERT ON versions
  FOR EACH ROW EXECUTE FUNCTION memstack_version_cube();
CREATE TABLE audit (
  seq BIGSERIAL PRIMARY KEY,
  at DOUBLE PRECISION NOT NULL,
  actor TEXT NOT NULL,
  action TEXT NOT NULL,
  cube TEXT,
  item_ids TEXT NOT NULL DEFAULT '[]',
  detail TEXT NOT NULL DEFAULT '{}'
);
CREATE FUNCTION memstack_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit
  FOR EACH STATEMENT EXECUTE FUNCTION memstack_append_only();
CREATE TABLE users (
  id TEXT PRIMARY KEY,
  role TEXT NOT NULL CHECK (role IN ('admin','user')),
  created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE api_keys (
  id TEXT PRIMARY KEY,
  user_id TEXT NOT NULL REFERENCES users(id),
  hash TEXT NOT NULL,
  cubes TEXT,
  label TEXT,
  created_at DOUBLE PRECISION NOT NULL,
  last_used DOUBLE PRECISION,
  revoked_at DOUBLE PRECISION
);
CREATE INDEX api_keys_user ON api_keys (user_id);
CREATE TABLE grants (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  user_id TEXT NOT NULL REFERENCES users(id),
  access TEXT NOT NULL CHECK (access IN ('read','write')),
  granted_by TEXT NOT NULL,
  granted_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (cube_id, user_id)
);
CREATE TABLE kv_blocks (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  id TEXT NOT NULL UNIQUE,
  model_key TEXT NOT NULL,
  user_id TEXT, agent_id TEXT,
  file TEXT NOT NULL,
  item_ids TEXT NOT NULL,
  tokens INTEGER NOT NULL,
  bytes BIGINT NOT NULL,
  created_at DOUBLE PRECISION NOT NULL,
  last_used DOUBLE PRECISION,
  uses BIGINT NOT NULL DEFAULT 0,
  PRIMARY KEY (cube_id, id)
);
CREATE TABLE shards (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  id TEXT NOT NULL UNIQUE,
  model_key TEXT NOT NULL,
  folder TEXT NOT NULL,
  item_ids TEXT NOT NULL,
  parent TEXT,
  status TEXT NOT NULL CHECK (status IN ('active','stale')),
  changed_items TEXT NOT NULL DEFAULT '[]',
  created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (cube_id, id)
);
-- the server's rate limits, shared by every process (a token bucket per key)
CREATE TABLE rate_buckets (
  key TEXT PRIMARY KEY,
  tokens DOUBLE PRECISION NOT NULL,
  updated DOUBLE PRECISION NOT NULL,
  allowed BOOLEAN NOT NULL
);
CREATE TABLE repairs (
  name TEXT PRIMARY KEY,
  state TEXT NOT NULL CHECK (state IN ('pending','done')),
  done_at DOUBLE PRECISION,
  detail TEXT NOT NULL DEFAULT '{}'
);
"""

# Tenant isolation, the second wall: row-level security by cube on every table of memory data.
# A session sees the cubes listed in its setting memstack.cubes ("1,4"; "*" for all; unset: none).
# The store sets it per connection from what the caller may see (store.restricted()); a query that
# does not set it sees nothing. Owners are held to it too (FORCE); a superuser bypasses any RLS,
# so the store runs its statements as the role memstack_app when it connects as one.
_RLS_TABLES = ("items", "keys", "versions", "kv_blocks", "shards", "grants")
_V1_RLS = """
CREATE FUNCTION memstack_visible(cube BIGINT) RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT CASE coalesce(current_setting('memstack.cubes', true), '')
    WHEN '' THEN false
    WHEN '*' THEN true
    ELSE cube = ANY (string_to_array(current_setting('memstack.cubes', true), ',')::bigint[])
  END
$$;
""" + "".join(f"""
ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {t} FORCE ROW LEVEL SECURITY;
CREATE POLICY cube_wall ON {t} USING (memstack_visible(cube_id))
  WITH CHECK (memstack_visible(cube_id));""" for t in _RLS_TABLES) + """
-- indexes need the table's owner: the store's role creates them through this function
CREATE FUNCTION memstack_vector_index(dim INTEGER) RETURNS void LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
  EXECUTE format('CREATE INDEX IF NOT EXISTS keys_vec_%s ON keys USING hnsw '
                 '((vec::vector(%s)) vector_cosine_ops) WHERE vector_dims(vec) = %s',
                 dim, dim, dim);
END $$;
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'memstack_app') THEN
    CREATE ROLE memstack_app NOLOGIN;
  END IF;
  EXECUTE format('GRANT USAGE ON SCHEMA %I TO memstack_app', current_schema());
  EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I '
                 'TO memstack_app', current_schema());
  EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO memstack_app',
                 current_schema());
  EXECUTE format('GRANT memstack_app TO %I', current_user);
EXCEPTION WHEN insufficient_privilege THEN
  RAISE NOTICE 'memstack_app not created: row-level security holds through FORCE for the owner';
END $$;
"""

# 2: two processes creating their first cube at once both ran CREATE INDEX IF NOT EXISTS, and
# one failed on the catalog's unique index (IF NOT EXISTS does not serialise); now the second
# waits for the first and finds the index
_V2 = """
CREATE OR REPLACE FUNCTION memstack_vector_index(dim INTEGER) RETURNS void LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
  PERFORM pg_advisory_xact_lock(7446, dim);
  EXECUTE format('CREATE INDEX IF NOT EXISTS keys_vec_%s ON keys USING hnsw '
                 '((vec::vector(%s)) vector_cosine_ops) WHERE vector_dims(vec) = %s',
                 dim, dim, dim);
END $$;
"""

# 3: BM25's statistics kept by the database as keys come and go (they were counted per search,
# and under row-level security a count cannot use the GIN index: 130 ms a term at 200k keys).
# Per cube, so a write locks only its own cube's rows; BM25 sums them over all cubes (global
# statistics, as FTS5 keeps). A key insert or delete first locks its cube's row, so writers of
# one cube queue there and never deadlock on the terms; terms left with no key are removed
# (a deleted memory's words do not stay behind).
_V3 = """
CREATE TABLE term_stats (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  lexeme TEXT NOT NULL,
  keys BIGINT NOT NULL,  -- keys of the cube whose text has the lexeme
  PRIMARY KEY (lexeme, cube_id)
);
CREATE TABLE key_stats (
  cube_id BIGINT PRIMARY KEY REFERENCES cubes(id),
  keys BIGINT NOT NULL,
  length BIGINT NOT NULL  -- the keys' lengths in tokens, summed
);
CREATE FUNCTION memstack_key_stats() RETURNS trigger LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
  rows TEXT := CASE TG_OP WHEN 'INSERT' THEN 'added' ELSE 'removed' END;
  sign INTEGER := CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END;
BEGIN
  -- NO KEY UPDATE, as the cube's generation bump takes: the foreign keys of the rows this
  -- transaction inserted hold KEY SHARE on the cube, which FOR UPDATE would wait for
  EXECUTE format('SELECT 1 FROM cubes WHERE id IN (SELECT cube_id FROM %I) ORDER BY id '
                 'FOR NO KEY UPDATE', rows);
  EXECUTE format('INSERT INTO key_stats AS s (cube_id, keys, length) '
                 'SELECT cube_id, %s * count(*), %s * coalesce(sum(length), 0) FROM %I '
                 'GROUP BY cube_id ORDER BY cube_id ON CONFLICT (cube_id) DO UPDATE '
                 'SET keys = s.keys + excluded.keys, length = s.length + excluded.length',
                 sign, sign, rows);
  EXECUTE format('INSERT INTO term_stats AS s (cube_id, lexeme, keys) '
                 'SELECT c.cube_id, t.lexeme, %s * count(*) FROM %I c, unnest(c.tsv) t '
                 'GROUP BY c.cube_id, t.lexeme ORDER BY t.lexeme, c.cube_id '
                 'ON CONFLICT (lexeme, cube_id) DO UPDATE SET keys = s.keys + excluded.keys',
                 sign, rows);
  IF TG_OP = 'DELETE' THEN
    DELETE FROM term_stats s USING (SELECT DISTINCT c.cube_id, t.lexeme FROM removed c,
      unnest(c.tsv) t) d WHERE s.cube_id = d.cube_id AND s.lexeme = d.lexeme AND s.keys <= 0;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER keys_added AFTER INSERT ON keys REFERENCING NEW TABLE AS added
  FOR EACH STATEMENT EXECUTE FUNCTION memstack_key_stats();
CREATE TRIGGER keys_removed AFTER DELETE ON keys REFERENCING OLD TABLE AS removed
  FOR EACH STATEMENT EXECUTE FUNCTION memstack_key_stats();
SELECT set_config('memstack.cubes', '*', true);  -- the owner is held to row-level security too
INSERT INTO key_stats SELECT cube_id, count(*), coalesce(sum(length), 0) FROM keys
  GROUP BY cube_id;
INSERT INTO term_stats SELECT k.cube_id, t.lexeme, count(*) FROM keys k, unnest(k.tsv) t
  GROUP BY k.cube_id, t.lexeme;
DO $$
BEGIN
  EXECUTE format('GRANT SELECT ON term_stats, key_stats TO memstack_app');
EXCEPTION WHEN undefined_object THEN
  NULL;  -- no memstack_app role (created by version 1 only when it could be)
END $$;
"""

# 4: the wall's cubes read once per statement, not once per row: the policy calls a function
# in a subquery (an InitPlan) where it called one per row that parsed the setting again each
# time (a search's BM25 statement paid ~1 ms for it with 16 cubes visible). The same rows
# pass. And the cubes a user may read, found by owner and by grantee in one indexed statement
# (the server asks it for every request's wall).
_WALL = ("(SELECT memstack_cubes()) IS NULL OR "
         "cube_id = ANY ((SELECT memstack_cubes())::bigint[])")
_V4 = """
CREATE FUNCTION memstack_cubes() RETURNS bigint[] LANGUAGE sql STABLE AS $$
  SELECT CASE coalesce(current_setting('memstack.cubes', true), '')
    WHEN '' THEN '{}'::bigint[]  -- no setting: no cube
    WHEN '*' THEN NULL           -- every cube
    ELSE string_to_array(current_setting('memstack.cubes', true), ',')::bigint[]
  END
$$;
""" + "".join(f"""
ALTER POLICY cube_wall ON {t} USING ({_WALL}) WITH CHECK ({_WALL});""" for t in _RLS_TABLES) + """
DROP FUNCTION memstack_visible(BIGINT);
-- the planner's statistics of a store filling fast (autovacuum looks once a minute): with a
-- cube's rows estimated at 1, BM25 joined each item to a scan of the cube's whole key index
-- (60 ms where 5 would do); ANALYZE needs the owner, the store's role calls this
CREATE FUNCTION memstack_analyze() RETURNS bigint LANGUAGE plpgsql
  SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
  ANALYZE items;
  ANALYZE keys;
  RETURN (SELECT reltuples FROM pg_class WHERE oid = 'keys'::regclass)::bigint;
END $$;
CREATE INDEX IF NOT EXISTS cubes_owner ON cubes (owner);
CREATE INDEX IF NOT EXISTS grants_user ON grants (user_id);
"""

# 5: leases (store/locks.py): work that runs in one process at a time, such as background
# maintenance, holds one until it releases it or the lease runs out. IF NOT EXISTS: a store
# whose version was set back runs this again. Not by cube: no row-level security.
_V5 = """
CREATE TABLE IF NOT EXISTS locks (
  name TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  expires_at DOUBLE PRECISION NOT NULL  -- seconds since the epoch, the database's clock
);
DO $$
BEGIN
  EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON locks TO memstack_app');
EXCEPTION WHEN undefined_object THEN
  NULL;  -- no memstack_app role (created by version 1 only when it could be)
END $$;
"""

# 6: the audit log's hash chain (store/chain.py): each entry's hash and the previous entry's.
# Entries written before have neither; the first chained entry's `prev` covers them.
_V6 = """
ALTER TABLE audit ADD COLUMN IF NOT EXISTS prev TEXT;
ALTER TABLE audit ADD COLUMN IF NOT EXISTS hash TEXT;
"""

# 7: retention (govern/retention.py): an item's expiry, and each cube's policies by kind
# ('*': the kinds without their own); by cube, so behind the cube wall as items are.
_V7 = f"""
ALTER TABLE items ADD COLUMN IF NOT EXISTS expires_at DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS retention (
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  kind TEXT NOT NULL,
  expire_after DOUBLE PRECISION,
  archive_unused DOUBLE PRECISION,
  purge_after DOUBLE PRECISION,
  set_by TEXT NOT NULL,
  set_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (cube_id, kind)
);
ALTER TABLE retention ENABLE ROW LEVEL SECURITY;
ALTER TABLE retention FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
  CREATE POLICY cube_wall ON retention USING ({_WALL}) WITH CHECK ({_WALL});
EXCEPTION WHEN duplicate_object THEN
  NULL;
END $$;
DO $$
BEGIN
  EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON retention TO memstack_app');
EXCEPTION WHEN undefined_object THEN
  NULL;
END $$;
"""

# 8: feedback (learn/feedback.py): the kind `feedback`, and the answers and generations feedback
# can name (which memories of each cube they used), behind the cube wall.
_V8 = f"""
ALTER TABLE items DROP CONSTRAINT IF EXISTS items_kind_check;
ALTER TABLE items ADD CONSTRAINT items_kind_check CHECK
  (kind IN ('turn','session','fact','insight','procedure','core','feedback'));
CREATE TABLE IF NOT EXISTS answers (
  id TEXT NOT NULL,
  cube_id BIGINT NOT NULL REFERENCES cubes(id),
  kind TEXT NOT NULL CHECK (kind IN ('answer','generation')),
  user_id TEXT, agent_id TEXT,
  query TEXT NOT NULL,
  item_ids TEXT NOT NULL DEFAULT '[]',
  created_at DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (id, cube_id)
);
CREATE INDEX IF NOT EXISTS answers_time ON answers (created_at);
ALTER TABLE answers ENABLE ROW LEVEL SECURITY;
ALTER TABLE answers FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
  CREATE POLICY cube_wall ON answers USING ({_WALL}) WITH CHECK ({_WALL});
EXCEPTION WHEN duplicate_object THEN
  NULL;
END $$;
DO $$
BEGIN
  EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON answers TO memstack_app');
EXCEPTION WHEN undefined_object THEN
  NULL;
END $$;
"""

# A feedback item's key is an anchor: a vector only (its query), no words, so that it changes
# nobody's BM25 (tsv is empty, and the statistics count no anchor as a key).
_V8 += (_V3[_V3.index("CREATE FUNCTION memstack_key_stats()"):_V3.index("END $$;") + 7]
        .replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION")
        .replace("'GROUP BY cube_id ORDER BY cube_id ON CONFLICT (cube_id) DO UPDATE '",
                 "'WHERE role <> ''anchor'' GROUP BY cube_id ORDER BY cube_id '\n"
                 "                 'ON CONFLICT (cube_id) DO UPDATE '") + "\n")

# MIGRATIONS[n] takes a database at version n to version n + 1.
MIGRATIONS: dict[int, str] = {0: _V1 + _V1_RLS, 1: _V2, 2: _V3, 3: _V4, 4: _V5, 5: _V6,
                              6: _V7, 7: _V8}


def vector_index(dim: int) -> str:
    """The HNSW index of the keys of one dimension (a partial index: pgvector indexes a fixed
    dimension, and cubes of different models live in one table)."""
    return f"SELECT memstack_vector_index({int(dim)})"
