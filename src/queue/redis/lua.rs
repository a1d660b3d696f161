//! The Lua scripts of the Redis store, one per state transition.
//!
//! Every transition of an event (enqueue, claim, complete, release, replay, purge) is one
//! script, so Redis runs it atomically: no other client sees an event half-moved between the
//! delayed set, the ready stream and the lease set, and the per-queue depth counter changes in
//! the same step as the event it counts.
//!
//! `ARGV[1]` is always the key prefix (with its hash tag); per-event and per-queue keys are
//! derived from it inside the script. All keys share the hash tag, so on a cluster they live
//! in one slot and the scripts never cross slots. Each script also declares in `KEYS` every
//! key it can name before it runs (built by `keys.rs`; its doc line `KEYS:` below); keys it
//! can only find at run time (the events a claim finds, the queue of an event a completion
//! names) are listed as "found" and carry the same tag, since the scripts build them from the
//! same prefix. The store suite's `redis_keys` test checks both against a real server. Timestamps are handed to Redis as the
//! decimal strings the caller sent, never as Lua numbers, because Lua formats numbers with
//! `%.14g` and would round large values.

/// Helpers prepended to every script.
const PRELUDE: &str = r#"
local P = ARGV[1]
local G = 'hookyard'
local function ev(id) return P .. ':ev:' .. id end
local function qk(q, s) return P .. ':q:' .. q .. ':' .. s end
local function to_ready(id, q)
  local sid = redis.call('XADD', qk(q, 'ready'), '*', 'id', id)
  redis.call('HSET', ev(id), 'state', 'r', 'sid', sid)
end
local function drop_entry(stream, sid)
  redis.pcall('XACK', stream, G, sid)
  redis.call('XDEL', stream, sid)
end
-- The fields a claim entry carries, in order; `at` in claim_entry says where a caller that
-- already read them (after fields of its own) has them.
local CLAIM_READ = {'m', 'queue', 'made', 'body', 'okey', 'oseq'}
-- An event leased under token tok as the claim entry the store decodes (`claimed_from` in
-- decode.rs): id, token, due, then its fields, read here unless the caller passes its own
-- HMGET reply `f` holding them from index `at + 1`. An event stored before the metadata was
-- packed into `m` has its per-field metadata appended.
local function claim_entry(id, tok, due, f, at)
  local key = ev(id)
  if not f then
    f, at = redis.call('HMGET', key, unpack(CLAIM_READ)), 0
  end
  local entry = {id, tok, due, f[at + 1], f[at + 2], f[at + 3], f[at + 4], f[at + 5], f[at + 6]}
  if not f[at + 1] then
    local old = redis.call('HMGET', key, 'type', 'target', 'ct', 'trace', 'ikey', 'sig',
      'timeout', 'delays', 'jitter', 'recv', 'fb')
    for i = 1, 11 do entry[9 + i] = old[i] end
  end
  return entry
end
-- ZADD of many (score, member) pairs, in chunks that stay within Lua's unpack limit.
local function zadd_all(key, pairs_)
  for i = 1, #pairs_, 1000 do
    redis.call('ZADD', key, unpack(pairs_, i, math.min(i + 999, #pairs_)))
  end
end
-- Ordering keys of queue q: 'okseq' (key -> last sequence) and 'okact' (key -> the event
-- pending or leased now) are hashes; each busy key's held events wait in a sorted set by
-- sequence. The queue name is length-prefixed so no queue and key pair names another's set.
local function held_set(q, okey) return P .. ':okh:' .. #q .. ':' .. q .. ':' .. okey end
local function hold(id, q, okey, seq)
  redis.call('HSET', ev(id), 'state', 'h')
  redis.call('ZADD', held_set(q, okey), seq, id)
  redis.call('INCR', qk(q, 'held'))
end
-- The key's current event is delivered or dead-lettered: the next held one (lowest sequence)
-- becomes pending, due at once (or at its own due time if that is past: it waited that long),
-- and the key's current event; with none held the key is free.
-- With a lease token, the next event is leased until `lease_until` instead (outside the
-- stream: a lease that runs out is found through the leased set, as any other) and returned
-- as a claim entry, for the worker that finished the key to deliver it without a claim.
local function release_next(q, okey, now, tok, lease_until)
  local set = held_set(q, okey)
  local nxt = redis.call('ZRANGE', set, 0, 0)[1]
  if not nxt then
    redis.call('HDEL', qk(q, 'okact'), okey)
    return nil
  end
  redis.call('ZREM', set, nxt)
  redis.call('DECR', qk(q, 'held'))
  redis.call('HSET', qk(q, 'okact'), okey, nxt)
  if tok and tok ~= '' then
    local key = ev(nxt)
    redis.call('HSET', key, 'state', 'f', 'tok', tok, 'until', lease_until)
    redis.call('ZADD', qk(q, 'leased'), lease_until, nxt)
    return claim_entry(nxt, tok, redis.call('HGET', key, 'due') or now)
  end
  local due = redis.call('HGET', ev(nxt), 'due')
  if not due or tonumber(due) > tonumber(now) then due = now end
  redis.call('HSET', ev(nxt), 'state', 'p', 'due', due)
  redis.call('ZADD', qk(q, 'delayed'), due, nxt)
  return nil
end
"#;

/// `ARGV`: prefix, then 12 per event: id, queue, max_depth, received_at, due_at, idempotency
/// key ('' for none), idempotency expiry, idempotency ttl ms, fallback flag ('' or '1'),
/// ordering key ('' for none; a key is never empty), its metadata `m` (JSON, never read here)
/// and its body. Returns one reply per event, in order: `{'ok'}`, `{'dup', event_id}`,
/// `{'full'}`, `{'exists'}`, or `{'err', message}` when a Redis command failed for that event
/// (the others keep theirs).
///
/// `KEYS`: per event its `ev:<id>`, its queue's `depth`, `ready`, `delayed`, `okseq`,
/// `okact`, `held`, its ordering key's held set, its idempotency key, `fallbacks`. Found: none.
///
/// One call stores a whole batch of concurrent enqueues, so Redis runs (and, with
/// `appendfsync always`, fsyncs) them as one command. The events run in order, so a later
/// event of the batch sees an earlier one's depth, idempotency claim and ordering sequence.
const ENQUEUE: &str = r#"
-- Depth per queue as this batch leaves it: read once, written once at the end (INCRBY), so an
-- event costs no depth round of its own and a later event of the batch sees the earlier ones.
local depths, added = {}, {}
-- The event whose arguments start at ARGV[i].
local function enqueue_one(i)
  local id, q = ARGV[i], ARGV[i + 1]
  local recv = tonumber(ARGV[i + 3])
  local ik = ARGV[i + 5]
  -- Dedupe before the depth check: a retried request whose first copy was accepted should learn
  -- its event id, not be told to back off. The expiry inside the value is authoritative; the
  -- key's TTL only garbage-collects it.
  if ik ~= '' then
    local cur = redis.call('GET', ik)
    if cur then
      local bar = string.find(cur, '|', 1, true)
      if bar and tonumber(string.sub(cur, 1, bar - 1)) > recv then
        return {'dup', string.sub(cur, bar + 1)}
      end
    end
  end
  if depths[q] == nil then depths[q] = tonumber(redis.call('GET', qk(q, 'depth')) or '0') end
  if depths[q] >= tonumber(ARGV[i + 2]) then return {'full'} end
  local key = ev(id)
  if redis.call('EXISTS', key) == 1 then return {'exists'} end
  -- Every check that can refuse the event is above; below, its fields, state and place are
  -- written with one HSET.
  local due = ARGV[i + 4]
  local fields = {'m', ARGV[i + 10], 'body', ARGV[i + 11], 'queue', q, 'due', due}
  local okey = ARGV[i + 9]
  local state
  if okey ~= '' then
    -- An ordering key takes the key's next sequence; a key with an event pending or leased
    -- holds this one back.
    local seq = redis.call('HINCRBY', qk(q, 'okseq'), okey, 1)
    fields[9], fields[10], fields[11], fields[12] = 'okey', okey, 'oseq', seq
    if redis.call('HSETNX', qk(q, 'okact'), okey, id) == 0 then
      state = 'h'
      redis.call('ZADD', held_set(q, okey), seq, id)
      redis.call('INCR', qk(q, 'held'))
    end
  end
  if state then
  elseif tonumber(due) <= recv then
    state = 'r'
    fields[#fields + 1] = 'sid'
    fields[#fields + 1] = redis.call('XADD', qk(q, 'ready'), '*', 'id', id)
  else
    state = 'p'
    redis.call('ZADD', qk(q, 'delayed'), due, id)
  end
  fields[#fields + 1] = 'state'
  fields[#fields + 1] = state
  redis.call('HSET', key, unpack(fields))
  depths[q] = depths[q] + 1
  added[q] = (added[q] or 0) + 1
  if ik ~= '' then
    redis.call('SET', ik, ARGV[i + 6] .. '|' .. id, 'PX', ARGV[i + 7])
  end
  if ARGV[i + 8] ~= '' then
    redis.call('ZADD', P .. ':fallbacks', ARGV[i + 3], id)
  end
  return {'ok'}
end
local out = {}
for i = 2, #ARGV, 12 do
  local ok, r = pcall(enqueue_one, i)
  if ok then out[#out + 1] = r else out[#out + 1] = {'err', tostring(type(r) == 'table' and r.err or r)} end
end
for q, n in pairs(added) do redis.call('INCRBY', qk(q, 'depth'), n) end
return out
"#;

/// `ARGV`: prefix, queue, now, limit, lease_until, consumer, claim_idle_ms ('' to skip the
/// scan for idle entries), token base,
/// most lease expiries in a row, their dead-letter reason, the DLQ member prefix for `now`
/// (the id is appended). Returns one claim entry (`claim_entry` above) per leased event, its
/// due time the expired lease's end for a lease that ran out.
///
/// `KEYS`: the queue's `ready`, `delayed`, `leased`, `depth`, `dead`, `okact`, `held`, and
/// `dlq`. Found: the `ev:` keys of the events it finds, the held sets (`okh:`) of
/// their ordering keys.
const CLAIM: &str = r#"
local q, now, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local until_s, consumer, idle, base = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local max_expiries, expired_reason, dlm_prefix = tonumber(ARGV[9]), ARGV[10], ARGV[11]
local stream, delayed, leased = qk(q, 'ready'), qk(q, 'delayed'), qk(q, 'leased')
local out = {}
local n = 0
-- A lease that ran out without a result. Counted; at max_expiries in a row the event's
-- delivery keeps killing its worker, so it is dead-lettered (with the expiry recorded as its
-- last attempt) instead of being leased again. Returns true when it was.
local function expired(id, sid)
  local key = ev(id)
  if redis.call('HINCRBY', key, 'lx', 1) < max_expiries then return false end
  if sid then drop_entry(stream, sid) end
  redis.call('ZREM', leased, id)
  redis.call('HDEL', key, 'tok', 'until', 'sid', 'due', 'lx')
  local f = redis.call('HMGET', key, 'made', 'an')
  local made, k = tonumber(f[1] or '0') + 1, tonumber(f[2] or '0') + 1
  local attempt = '{"started_at_ms":' .. ARGV[3] .. ',"latency_ms":0,"error":"' .. expired_reason .. '"}'
  local member = dlm_prefix .. id
  redis.call('HSET', key, 'an', k, 'a' .. k, made .. '|' .. attempt, 'last', attempt,
    'state', 'x', 'dla', ARGV[3], 'dlr', expired_reason, 'dlm', member)
  redis.call('DECR', qk(q, 'depth'))
  redis.call('INCR', qk(q, 'dead'))
  redis.call('ZADD', P .. ':dlq', 0, member)
  local okey = redis.call('HGET', key, 'okey')
  if okey then release_next(q, okey, ARGV[3]) end
  return true
end
-- Leased events enter the leased set with one ZADD at the end.
local leases = {}
-- Leases `id`; `f` and `at` as for claim_entry.
local function lease_it(id, due, f, at)
  n = n + 1
  local tok = base .. ':' .. n
  redis.call('HSET', ev(id), 'state', 'f', 'tok', tok, 'until', until_s)
  leases[#leases + 1] = until_s
  leases[#leases + 1] = id
  out[#out + 1] = claim_entry(id, tok, due, f, at)
end
if limit <= 0 then return out end
-- '0': a group created after entries exist still reads them all. Acknowledged entries are
-- deleted, so what it re-reads is only what is live, and the state checks below skip entries
-- that are no longer ready.
local function create_group() redis.pcall('XGROUP', 'CREATE', stream, G, '0', 'MKSTREAM') end
if redis.call('EXISTS', stream) == 0 then create_group() end

-- The steps run under pcall so the leased set gets its one ZADD whatever happens: an event
-- whose state says leased must be in the set, or no expiry would ever hand it out again.
local function steps()
  -- 1. Leases that ran out by the caller's clock (the lease length the worker asked for).
  local exp = redis.call('ZRANGEBYSCORE', leased, '-inf', ARGV[3], 'WITHSCORES', 'LIMIT', 0, limit)
  for i = 1, #exp, 2 do
    local id = exp[i]
    local st = redis.call('HMGET', ev(id), 'state', 'sid')
    if st[1] == 'f' then
      if not expired(id, st[2]) then
        if st[2] then redis.pcall('XCLAIM', stream, G, consumer, 0, st[2], 'JUSTID') end
        lease_it(id, exp[i + 1])
      end
    else
      redis.call('ZREM', leased, id)
    end
  end

  -- 2. Entries another consumer has held longer than claim_idle_ms on Redis's own clock: its
  -- instance crashed, or its clock is wrong. Immune to clock skew between instances. The scan
  -- walks the whole pending list, so the caller asks for it only now and then (idle = '').
  if n < limit and idle ~= '' then
    local r = redis.pcall('XAUTOCLAIM', stream, G, consumer, idle, '0-0', 'COUNT', limit - n)
    if type(r) == 'table' and not r.err and r[2] then
      for _, e in ipairs(r[2]) do
        local sid, fields = e[1], e[2]
        local id = fields and fields[2]
        local st = {}
        if id then st = redis.call('HMGET', ev(id), 'state', 'sid', 'until') end
        if st[1] == 'f' and st[2] == sid then
          if not expired(id, sid) then lease_it(id, st[3]) end
        elseif sid then
          drop_entry(stream, sid)
        end
      end
    end
  end

  -- 3. Delayed events now due move to the stream, oldest due first, in this same script: a
  -- crash between ZREM and XADD cannot lose or duplicate one.
  if n < limit then
    local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', ARGV[3], 'LIMIT', 0, limit - n)
    for i = 1, #due, 1000 do
      redis.call('ZREM', delayed, unpack(due, i, math.min(i + 999, #due)))
    end
    for _, id in ipairs(due) do to_ready(id, q) end
  end

  -- 4. New entries for this consumer.
  if n < limit then
    local function read()
      return redis.pcall('XREADGROUP', 'GROUP', G, consumer, 'COUNT', limit - n, 'STREAMS', stream, '>')
    end
    local r = read()
    if type(r) == 'table' and r.err then
      -- NOGROUP: Redis lost the consumer group (a restart that lost the stream's metadata, a
      -- failover, manual cleanup). Recreate it and retry; steps 1 and 2 above were no-ops
      -- without it, and the next claim runs them again.
      if not string.find(r.err, 'NOGROUP', 1, true) then return redis.error_reply(r.err) end
      create_group()
      r = read()
      if type(r) == 'table' and r.err then return redis.error_reply(r.err) end
    end
    if r and r[1] then
      for _, e in ipairs(r[1][2]) do
        local sid, fields = e[1], e[2]
        local id = fields and fields[2]
        local st = {}
        -- The claim entry's fields are read with the state, in one HMGET.
        if id then
          st = redis.call('HMGET', ev(id), 'state', 'sid', 'due', unpack(CLAIM_READ))
        end
        if st[1] == 'r' and st[2] == sid then
          if tonumber(st[3]) > now then
            -- Enqueued by an instance whose clock runs ahead: not due yet by ours.
            drop_entry(stream, sid)
            redis.call('HSET', ev(id), 'state', 'p')
            redis.call('HDEL', ev(id), 'sid')
            redis.call('ZADD', delayed, st[3], id)
          else
            lease_it(id, st[3], st, 3)
          end
        elseif st[1] == 'f' and st[2] == sid then
          -- Re-read after the group was recreated: still leased; the lease decides.
        else
          drop_entry(stream, sid)
        end
      end
    end
  end
end
local ok, err = pcall(steps)
zadd_all(leased, leases)
if not ok then
  return redis.error_reply(tostring(type(err) == 'table' and err.err or err))
end
if type(err) == 'table' and err.err then return err end
return out
"#;

/// `ARGV`: prefix, then per completion 11 arguments: id, token, kind (`delivered` | `retry` | `defer` | `dead`), due_at, now,
/// dead-letter reason, dlq member, attempt JSON ('' for none), the host whose breaker deferred
/// it ('' for none), a lease token for the next event of its ordering key ('' for none) and
/// that lease's end. Returns one reply per completion, in order: 1; `{1, entry}` when it leased
/// the key's next event (a claim entry); 0 when the token no longer holds the lease; or
/// `{'err', message}` when a Redis command failed for that completion.
///
/// `KEYS`: per completion its `ev:<id>`, `delivered`, `dlq`, and with a breaker
/// `bd:<host>` and `bdhosts`. Found: the event's queue keys (`q:`; the caller knows only the
/// event id), its ordering key's held set (`okh:`) and the next event of that key (`ev:`).
///
/// Completions of concurrent workers share one call, so Redis runs (and fsyncs) them as one
/// command, and a batch of retries moves into the delayed set with one `ZADD` per queue.
///
/// A breaker deferral is remembered twice: the event's `bd` field names the host, and the
/// host's set `bd:<host>` (listed in `bdhosts`) holds the event, so [`UNDEFER`] finds them
/// without a scan. The field is the truth; a set member whose field no longer matches (the
/// event was claimed and completed since) is skipped.
const COMPLETE: &str = r#"
-- Writes to keys that many completions of the batch share (stream acks and deletions, the
-- leased, delivered and delayed sets, depth counters) are gathered and made once at the end:
-- a batch of retries moves into the delayed set with one ZADD per queue.
local acks, unlease, delivered, depth_drop, retries = {}, {}, {}, {}, {}
local function list(t, k)
  local l = t[k]
  if not l then l = {}; t[k] = l end
  return l
end
-- The completion whose 11 arguments start at ARGV[i]: id, token, kind, due, now, reason, DLQ
-- member, attempt JSON, deferring host, next lease token, next lease end.
local function complete_one(i)
  local id, tok, kind, now = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 4]
  local key = ev(id)
  local st = redis.call('HMGET', key, 'state', 'tok', 'sid', 'queue', 'made', 'okey', 'an')
  if st[1] ~= 'f' or st[2] ~= tok then return 0 end
  local q = st[4]
  if st[3] then local l = list(acks, q); l[#l + 1] = st[3] end
  local l = list(unlease, q); l[#l + 1] = id
  local final = kind == 'delivered' or kind == 'dead'
  if final then
    redis.call('HDEL', key, 'tok', 'until', 'sid', 'lx', 'bd', 'due')
  else
    redis.call('HDEL', key, 'tok', 'until', 'sid', 'lx', 'bd')
  end
  local set = {}
  local host, attempt = ARGV[i + 8], ARGV[i + 7]
  if host ~= '' then
    set[#set + 1] = 'bd'; set[#set + 1] = host
    redis.call('SADD', P .. ':bd:' .. host, id)
    redis.call('SADD', P .. ':bdhosts', host)
  end
  if kind ~= 'defer' then
    local made = tonumber(st[5] or '0') + 1
    set[#set + 1] = 'made'; set[#set + 1] = made
    if attempt ~= '' then
      -- The store's count is authoritative: the token check proved this is the attempt it
      -- handed out. The history entry `a<k>` goes into the same HSET (`an` counts entries
      -- across replay rounds, while `made` restarts).
      local k = tonumber(st[7] or '0') + 1
      set[#set + 1] = 'an'; set[#set + 1] = k
      set[#set + 1] = 'a' .. k; set[#set + 1] = made .. '|' .. attempt
      set[#set + 1] = 'last'; set[#set + 1] = attempt
    end
  end
  if final then
    if kind == 'delivered' then
      set[#set + 1] = 'state'; set[#set + 1] = 'd'
      set[#set + 1] = 'dlv'; set[#set + 1] = now
      delivered[#delivered + 1] = now
      delivered[#delivered + 1] = id
    else
      local member = ARGV[i + 6]
      set[#set + 1] = 'state'; set[#set + 1] = 'x'
      set[#set + 1] = 'dla'; set[#set + 1] = now
      set[#set + 1] = 'dlr'; set[#set + 1] = ARGV[i + 5]
      set[#set + 1] = 'dlm'; set[#set + 1] = member
      redis.call('INCR', qk(q, 'dead'))
      redis.call('ZADD', P .. ':dlq', 0, member)
    end
    redis.call('HSET', key, unpack(set))
    depth_drop[q] = (depth_drop[q] or 0) + 1
    local okey = st[6]
    if okey then
      local taken = release_next(q, okey, now, ARGV[i + 9], ARGV[i + 10])
      if taken then return {1, taken} end
    end
  else
    local due = ARGV[i + 3]
    set[#set + 1] = 'state'; set[#set + 1] = 'p'
    set[#set + 1] = 'due'; set[#set + 1] = due
    redis.call('HSET', key, unpack(set))
    local r = list(retries, q)
    r[#r + 1] = due
    r[#r + 1] = id
  end
  return 1
end
local out = {}
for i = 2, #ARGV, 11 do
  local ok, r = pcall(complete_one, i)
  if ok then out[#out + 1] = r else out[#out + 1] = {'err', tostring(type(r) == 'table' and r.err or r)} end
end
for q, sids in pairs(acks) do
  local stream = qk(q, 'ready')
  redis.pcall('XACK', stream, G, unpack(sids))
  redis.call('XDEL', stream, unpack(sids))
end
for q, ids in pairs(unlease) do redis.call('ZREM', qk(q, 'leased'), unpack(ids)) end
for q, pairs_ in pairs(retries) do zadd_all(qk(q, 'delayed'), pairs_) end
if delivered[1] then zadd_all(P .. ':delivered', delivered) end
for q, n in pairs(depth_drop) do redis.call('DECRBY', qk(q, 'depth'), n) end
return out
"#;

/// `ARGV`: prefix, host, now, chunk. Takes up to `chunk` events from the host's deferral set
/// and makes each that is still pending and still deferred by that host due at `now` (unless
/// it is due sooner). Returns `{made_due, taken}`; the caller repeats while `taken == chunk`.
///
/// `KEYS`: `bd:<host>`, `bdhosts`. Found: the events in the set (`ev:`) and their queues'
/// delayed sets (`q:`).
const UNDEFER: &str = r#"
local host, now, chunk = ARGV[2], ARGV[3], tonumber(ARGV[4])
local set = P .. ':bd:' .. host
local ids = redis.call('SPOP', set, chunk)
local n = 0
for _, id in ipairs(ids) do
  local key = ev(id)
  local st = redis.call('HMGET', key, 'state', 'bd', 'queue', 'due')
  if st[1] == 'p' and st[2] == host then
    redis.call('HDEL', key, 'bd')
    if tonumber(st[4]) > tonumber(now) then
      redis.call('HSET', key, 'due', now)
      redis.call('ZADD', qk(st[3], 'delayed'), now, id)
    end
    n = n + 1
  end
end
if redis.call('SCARD', set) == 0 then redis.call('SREM', P .. ':bdhosts', host) end
return {n, #ids}
"#;

/// `ARGV`: prefix, now, then (id, token) pairs. Returns how many leases were handed back.
///
/// `KEYS`: each event's `ev:<id>`. Found: their queues' keys (`q:`).
const RELEASE: &str = r#"
local n = 0
for i = 3, #ARGV, 2 do
  local id, tok = ARGV[i], ARGV[i + 1]
  local key = ev(id)
  local st = redis.call('HMGET', key, 'state', 'tok', 'sid', 'queue')
  if st[1] == 'f' and st[2] == tok then
    local q = st[4]
    if st[3] then drop_entry(qk(q, 'ready'), st[3]) end
    redis.call('ZREM', qk(q, 'leased'), id)
    redis.call('HDEL', key, 'tok', 'until', 'sid')
    redis.call('HSET', key, 'state', 'p', 'due', ARGV[2])
    redis.call('ZADD', qk(q, 'delayed'), ARGV[2], id)
    n = n + 1
  end
end
return n
"#;

/// `ARGV`: prefix, now, then event ids. Returns the ids replayed.
///
/// `KEYS`: each event's `ev:<id>`, `dlq`. Found: their queues' keys (`q:`) and held sets
/// (`okh:`).
///
/// A replayed event is due now, so it goes straight into its queue's stream, as an enqueue of
/// a due event does, rather than through the delayed set for the next claim to move. Writes
/// the whole batch shares (the DLQ index, the depth and dead-letter counters) are made once at
/// the end.
const REPLAY: &str = r#"
local now = ARGV[2]
local out, members, revived = {}, {}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local key = ev(id)
  local st = redis.call('HMGET', key, 'state', 'queue', 'dlm', 'okey', 'oseq')
  if st[1] == 'x' then
    local q = st[2]
    if st[3] then members[#members + 1] = st[3] end
    redis.call('HDEL', key, 'dla', 'dlr', 'dlm', 'lx')
    -- A new round: the attempt count restarts; the old attempts stay as history.
    -- A keyed dead letter keeps its sequence: it goes at once if its key is free, else waits
    -- its turn behind the key's current event, ahead of the key's later held events.
    if st[4] and redis.call('HSETNX', qk(q, 'okact'), st[4], id) == 0 then
      redis.call('HSET', key, 'due', now, 'made', 0)
      hold(id, q, st[4], st[5])
    else
      local sid = redis.call('XADD', qk(q, 'ready'), '*', 'id', id)
      redis.call('HSET', key, 'state', 'r', 'sid', sid, 'due', now, 'made', 0)
    end
    revived[q] = (revived[q] or 0) + 1
    out[#out + 1] = id
  end
end
for i = 1, #members, 1000 do
  redis.call('ZREM', P .. ':dlq', unpack(members, i, math.min(i + 999, #members)))
end
-- Replay is an operator's decision and is not refused at max_depth.
for q, n in pairs(revived) do
  redis.call('INCRBY', qk(q, 'depth'), n)
  redis.call('DECRBY', qk(q, 'dead'), n)
end
return out
"#;

/// `ARGV`: prefix, before (delivered), chunk, dlq upper bound (exclusive lex). Deletes up to
/// `chunk` old dead letters and `chunk` old delivered events with their history and fallback
/// records. Returns `{dead_letters_removed, delivered_removed}`.
///
/// `KEYS`: `dlq`, `delivered`, `fallbacks`. Found: the purged events' `ev:` keys, their
/// attempt lists from before attempts moved into the event hash (`att:`), and their queues'
/// dead-letter counters (`q:`).
const PURGE: &str = r#"
local chunk = tonumber(ARGV[3])
local function drop(id)
  local q = redis.call('HGET', ev(id), 'queue')
  redis.call('DEL', ev(id), P .. ':att:' .. id)
  redis.call('ZREM', P .. ':fallbacks', id)
  return q
end
local dl = redis.call('ZRANGEBYLEX', P .. ':dlq', '-', ARGV[4], 'LIMIT', 0, chunk)
for _, m in ipairs(dl) do
  local colon = string.find(m, ':', 1, true)
  local q = drop(string.sub(m, colon + 1))
  if q then redis.call('DECR', qk(q, 'dead')) end
  redis.call('ZREM', P .. ':dlq', m)
end
local dv = redis.call('ZRANGEBYSCORE', P .. ':delivered', '-inf', '(' .. ARGV[2], 'LIMIT', 0, chunk)
for _, id in ipairs(dv) do
  drop(id)
  redis.call('ZREM', P .. ':delivered', id)
end
return {#dl, #dv}
"#;

/// Helper for the gauge scripts: how many stream entries no consumer has read yet, and the
/// due time of the oldest of them.
const UNREAD: &str = r#"
local function unread(stream)
  local len = redis.call('XLEN', stream)
  if len == 0 then return 0, nil end
  local last, pending = nil, 0
  local g = redis.pcall('XINFO', 'GROUPS', stream)
  if type(g) == 'table' and not g.err then
    for _, grp in ipairs(g) do
      local name, ld, pe
      for i = 1, #grp, 2 do
        if grp[i] == 'name' then name = grp[i + 1]
        elseif grp[i] == 'last-delivered-id' then ld = grp[i + 1]
        elseif grp[i] == 'pending' then pe = grp[i + 1] end
      end
      if name == G then last, pending = ld, pe end
    end
  end
  local count = len - pending
  if count <= 0 then return 0, nil end
  local e
  if last then
    e = redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)
  else
    e = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  end
  local due = nil
  if e[1] and e[1][2] then due = tonumber(redis.call('HGET', ev(e[1][2][2]), 'due')) end
  return count, due
end
"#;

/// `ARGV`: prefix, queue, now. Returns `{ready, delayed, in_flight, dead, oldest_ready_due,
/// held}` with -1 for "no ready event".
///
/// `KEYS`: the queue's `ready`, `delayed`, `leased`, `dead`, `held`. Found: the oldest unread
/// event (`ev:`).
const STATS: &str = r#"
local q, now = ARGV[2], ARGV[3]
local delayed = qk(q, 'delayed')
local count, oldest = unread(qk(q, 'ready'))
local due_ready = redis.call('ZCOUNT', delayed, '-inf', now)
local waiting = redis.call('ZCOUNT', delayed, '(' .. now, '+inf')
if due_ready > 0 then
  local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  local s = tonumber(first[2])
  if not oldest or s < oldest then oldest = s end
end
local inflight = redis.call('ZCARD', qk(q, 'leased'))
local dead = tonumber(redis.call('GET', qk(q, 'dead')) or '0')
local held = tonumber(redis.call('GET', qk(q, 'held')) or '0')
return {count + due_ready, waiting, inflight, dead, oldest or -1, held}
"#;

/// `ARGV`: prefix, queue. Returns the earliest due time (ready, delayed or lease expiry), or
/// nil when the queue is empty.
///
/// `KEYS`: the queue's `ready`, `delayed`, `leased`. Found: the oldest unread event (`ev:`).
const NEXT_DUE: &str = r#"
local q = ARGV[2]
local best = nil
local function consider(v) if v and (not best or v < best) then best = v end end
local _, oldest = unread(qk(q, 'ready'))
consider(oldest)
local d = redis.call('ZRANGE', qk(q, 'delayed'), 0, 0, 'WITHSCORES')
if d[2] then consider(tonumber(d[2])) end
local l = redis.call('ZRANGE', qk(q, 'leased'), 0, 0, 'WITHSCORES')
if l[2] then consider(tonumber(l[2])) end
return best
"#;

/// The compiled scripts (SHA computed once; `EVALSHA`, falling back to loading them after a
/// Redis restart emptied its script cache).
pub(super) struct Scripts {
    pub enqueue: redis::Script,
    pub claim: redis::Script,
    pub complete: redis::Script,
    pub release: redis::Script,
    pub undefer: redis::Script,
    pub replay: redis::Script,
    pub purge: redis::Script,
    pub stats: redis::Script,
    pub next_due: redis::Script,
}

impl Scripts {
    pub fn new() -> Self {
        let with = |body: &str| redis::Script::new(&format!("{PRELUDE}{body}"));
        let gauge = |body: &str| redis::Script::new(&format!("{PRELUDE}{UNREAD}{body}"));
        Self {
            enqueue: with(ENQUEUE),
            claim: with(CLAIM),
            complete: with(COMPLETE),
            release: with(RELEASE),
            undefer: with(UNDEFER),
            replay: with(REPLAY),
            purge: with(PURGE),
            stats: gauge(STATS),
            next_due: gauge(NEXT_DUE),
        }
    }
}
