//! The Lua scripts of the Redis idempotency store: each step on a
//! commandId is one script, so two replicas never both own it.
//!
//! Every script gets the same keys and leading arguments
//! ([`super::layout::CommandKeys`]), all in the commandId's hash slot:
//!
//! - KEYS: 1 claim, 2 boot marker, 3 restart guard, then `ARGV[5]` buckets
//!   (the one a new record goes to first), then, only while records and
//!   claims of earlier versions may exist, their record and claim keys
//!   (which are not in that slot: a server, not a Cluster, holds them).
//! - ARGV: 1 owner, 2 lease ms, 3 the boot marker this replica last saw in
//!   the slot (`''` before its first look), 4 a fresh marker (both `''`
//!   for the scripts that do not call `boot`), 5 the number of buckets,
//!   6 the record's field; then what the script needs.

use std::sync::LazyLock;

use redis::Script;

/// Shared by every script: the keys' places, the claim, boot marker and
/// guard read in one call (each `redis.call` costs the server a few
/// microseconds beyond the command itself), finding the record, who holds
/// the claim, and Redis' boot marker.
///
/// Redis without persistence forgets every claim when it restarts, and a
/// replica whose GeWe call is in flight would then find its claim gone
/// while another takes it and calls too. The marker (a key without expiry)
/// tells a replica that Redis lost the slot's data since it last looked;
/// it then sets the guard for one lease, during which no free commandId in
/// the slot is claimed, while the holders of earlier claims re-assert
/// theirs at their next renewal.
///
/// A record's first byte is its tag, with 128 added once it is published;
/// `find` returns its key, the record, its published flag (`'1'`) and 1
/// when it is compact (0: an earlier version's JSON hash).
const COMMON: &str = r#"
local n = tonumber(ARGV[5])
local compat = #KEYS > 3 + n
local old_rec, old_claim = KEYS[4 + n], KEYS[5 + n]

-- The claim, the boot marker and the guard, read in one call.
local got = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3])

-- Returns the slot's marker and whether the guard is up.
local function boot()
  local marker = got[2]
  if not marker then
    redis.call('SET', KEYS[2], ARGV[4])
    if ARGV[3] ~= '' then
      redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
      return ARGV[4], true
    end
    return ARGV[4], got[3] ~= false
  end
  if ARGV[3] ~= '' and marker ~= ARGV[3] then
    redis.call('SET', KEYS[3], '1', 'PX', ARGV[2], 'NX')
    return marker, true
  end
  return marker, got[3] ~= false
end

local function find()
  for i = 4, 3 + n do
    local v = redis.call('HGET', KEYS[i], ARGV[6])
    if v then
      local tag = string.byte(v, 1)
      if tag >= 128 then return KEYS[i], string.char(tag - 128) .. string.sub(v, 2), '1', 1 end
      return KEYS[i], v, '0', 1
    end
  end
  if compat then
    local old = redis.call('HMGET', old_rec, 'r', 'p')
    if old[1] then return old_rec, old[1], old[2], 0 end
  end
  return nil, nil, nil, 0
end

local function holder()
  local h = got[1]
  if compat then
    local o = redis.call('GET', old_claim)
    if o and o ~= ARGV[1] then return o end
    h = h or o
  end
  return h
end

local function take()
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if compat then redis.call('SET', old_claim, ARGV[1], 'PX', ARGV[2]) end
end

local function drop_if_ours()
  if got[1] == ARGV[1] then redis.call('DEL', KEYS[1]) end
  if compat and redis.call('GET', old_claim) == ARGV[1] then redis.call('DEL', old_claim) end
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{COMMON}{body}"))
}

/// Returns {state, record or '', compact, marker}; state is `published`
/// (no claim needed), `claimed`, `held` (another replica) or `guarded`.
pub static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local marker, guarded = boot()
local _, rec, p, compact = find()
if rec and p == '1' then return {'published', rec, compact, marker} end
local h = holder()
if h and h ~= ARGV[1] then return {'held', '', 0, marker} end
if (not h) and guarded then return {'guarded', '', 0, marker} end
take()
return {'claimed', rec or '', compact, marker}
"#,
    )
});

/// No buckets. Returns {1 renewed | 2 re-asserted (it was gone) | 0 taken
/// over, marker}.
pub static RENEW: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local marker = boot()
local h = holder()
if h == ARGV[1] then
  take()
  return {1, marker}
end
if not h then
  take()
  return {2, marker}
end
return {0, marker}
"#,
    )
});

/// ARGV 7: the record, 8: the first bucket's expiry (ms since the epoch).
/// Stores the record in the first bucket unless one is there (the first
/// answer wins). Returns {stored, claim ours}.
pub static STORE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local _, rec, p, compact = find()
local stored = 0
if not rec then
  redis.call('HSET', KEYS[4], ARGV[6], ARGV[7])
  redis.call('PEXPIREAT', KEYS[4], ARGV[8])
  stored = 1
elseif compact == 1 and p == '0' and rec == ARGV[7] then
  -- This very record, stored by a try whose WAIT failed: stored.
  stored = 1
end
local ours = 0
if got[1] == ARGV[1] then ours = 1 end
return {stored, ours}
"#,
    )
});

/// Marks the record published and releases the claim if it is ours.
pub static PUBLISHED: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local key, rec, _, compact = find()
if rec and compact == 1 then
  redis.call('HSET', key, ARGV[6], string.char(string.byte(rec, 1) + 128) .. string.sub(rec, 2))
elseif rec then redis.call('HSET', key, 'p', '1') end
drop_if_ours()
return 1
"#,
    )
});

/// No buckets. Releases the claim if it is ours.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
drop_if_ours()
return 1
"#,
    )
});
