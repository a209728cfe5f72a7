--[[ common.lua — prepended to every quotagate script (scripts.py joins them).

Calendar of an environment, the plan -> packs waterfall, and leased concurrency slots.

Slots (realtime watches, in-flight function invocations) of one environment live in two keys:
  slots  hash   "<instance>|<slot>" -> slots that instance holds; "=<slot>" -> total of live ones
  lease  zset   "<instance>" -> the store-clock ms (since 2020) its slots are held until
A slot is "rt:" (realtime) or "fn:<function>". An instance whose lease ended is reaped by the
next script that touches the environment's slots: its fields go, the totals drop by them.
]]

local EPOCH_2020_MS = 1577836800000
-- The snapshot layout these scripts read (entitlements.SNAPSHOT_VERSION); another one is
-- treated as missing, so the gateway writes it again.
local SNAPSHOT_V = 3

local function store_clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - EPOCH_2020_MS
end

-- The calendar of one environment at one instant: set by calendar_at, read by the helpers.
local ENT, NOW_MS, OFFSET, TODAY

local function offset_at(ms)
  local tz = ENT.tz
  local off = tz[1][2]
  for i = 2, #tz do
    if tz[i][1] <= ms then off = tz[i][2] else break end
  end
  return off
end

-- Local calendar days of the environment (days since 1970-01-01 in its time zone).
local function local_day(ms)
  return math.floor((math.floor(ms / 1000) + offset_at(ms)) / 86400)
end

local function calendar_at(ent, now_ms)
  ENT, NOW_MS = ent, now_ms
  OFFSET = offset_at(now_ms)
  TODAY = math.floor((math.floor(now_ms / 1000) + OFFSET) / 86400)
end

-- Epoch ms where a local day begins: the earliest instant whose local day is that day, tried
-- with the offsets in force a day either side (exact also where DST starts at midnight).
local function midnight_ms(day)
  local guess = (day * 86400 - OFFSET) * 1000
  if #ENT.tz == 1 then return guess end  -- a zone without offset changes (the common case)
  local best
  for _, probe in ipairs({guess - 86400000, guess + 86400000}) do
    local t = (day * 86400 - offset_at(probe)) * 1000
    if local_day(t) >= day and (best == nil or t < best) then best = t end
  end
  return best or guess
end

-- 0 active, 3 isolated (expired), 4 released, 5 not started.
local function lifecycle()
  if TODAY >= ENT.release_day then return 4 end
  if TODAY >= ENT.expire_day then return 3 end
  if TODAY < ENT.cycles[1] then return 5 end
  return 0
end

-- The billing cycle of today: its first day, and its end in epoch ms.
local function cycle_now()
  local cycles = ENT.cycles
  local ci = 1
  for i = #cycles - 1, 1, -1 do
    if cycles[i] <= TODAY then ci = i break end
  end
  return cycles[ci], cycles[ci + 1]
end

-- Plan -> valid packs (earliest expiry first) for `amount` of `meter`. Appends the writes to
-- `takes` ({key, field, n}); writes nothing. Returns what is left over (beyond plan + packs),
-- the plan quota, and what plan + packs held before this amount. `reserved` (optional, see
-- hot_state): what leases of hot environments hold of each field, not free to take.
local function allocate(takes, usage_key, packs_key, cycle_day, meter, amount, reserved)
  local field = cycle_day .. ':' .. meter
  local quota = ENT.quota[meter] or 0
  local plan_left = quota - (tonumber(redis.call('HGET', usage_key, field)) or 0)
  if reserved then plan_left = plan_left - (reserved['u' .. field] or 0) end
  if plan_left < 0 then plan_left = 0 end
  local left = amount
  local take = math.min(left, plan_left)
  if take > 0 then takes[#takes + 1] = {usage_key, field, take}; left = left - take end
  local held = plan_left
  for _, p in ipairs(ENT.packs) do
    if p.meter == meter and p.from <= TODAY and TODAY < p.to then
      local pack_left = p.amount - (tonumber(redis.call('HGET', packs_key, p.id)) or 0)
      if reserved then pack_left = pack_left - (reserved['p' .. p.id] or 0) end
      if pack_left > 0 then
        held = held + pack_left
        take = math.min(left, pack_left)
        if take > 0 then takes[#takes + 1] = {packs_key, p.id, take}; left = left - take end
      end
    end
  end
  return left, quota, held
end

-- Per local day, what each cumulative meter charged (plan, packs and beyond: the day's use),
-- in the environment's days hash as "<local day>:<meter>" (the console's chart; the usage
-- report's "days"). A day's first charge of a meter keeps the hash DAYS_TTL_MS from then (an
-- environment no longer used loses it by itself) and, once the hash holds more than
-- DAYS_MAX fields, forgets the days older than DAY_KEEP (a cycle has at most 31 days: all of
-- the current one is kept). Most first charges of a day cost HLEN and PEXPIRE only.
local DAY_KEEP = 31
local DAYS_MAX = 96
local DAYS_TTL_MS = 40 * 86400000
local function count_day(days_key, meter, n, day)
  if n == 0 then return end
  if redis.call('HINCRBY', days_key, day .. ':' .. meter, n) ~= n or n < 0 then return end
  redis.call('PEXPIRE', days_key, DAYS_TTL_MS)
  if redis.call('HLEN', days_key) <= DAYS_MAX then return end
  local old = {}
  for _, f in ipairs(redis.call('HKEYS', days_key)) do
    local d = tonumber(string.match(f, '^(%d+):'))
    if d and d < day - DAY_KEEP then old[#old + 1] = f end
  end
  if #old > 0 then redis.call('HDEL', days_key, unpack(old)) end
end

-- A gauge meter (capacity_bytes): what plan quota + valid packs leave above the last reported
-- value (negative: over). The value is kept in the usage hash as "gauge:<meter>".
-- A gauge's room on a local day: the plan's quota and the packs valid that day.
local function gauge_room(meter, day)
  local room = ENT.quota[meter] or 0
  for _, p in ipairs(ENT.packs) do
    if p.meter == meter and p.from <= day and day < p.to then room = room + p.amount end
  end
  return room
end

local function gauge_left(usage_key, meter)
  local value = tonumber(redis.call('HGET', usage_key, 'gauge:' .. meter)) or 0
  return gauge_room(meter, TODAY) - value, value
end

-- Where usage beyond plan + packs goes on a local day (today by default): pay-as-you-go
-- (overage on), else recorded unbilled.
local function over_field(meter, mode, day)
  local field = (day or TODAY) .. ':' .. meter
  if ENT.overage == 1 then return field, true end
  if mode == 'shadow' then return field .. ':shadow', false end
  return field .. ':unbilled', false
end

-- Drop every slot of instances whose lease ended before `now` (store clock).
local function reap(slots_key, lease_key, now)
  local dead = redis.call('ZRANGEBYSCORE', lease_key, '-inf', '(' .. now, 'LIMIT', 0, 64)
  if #dead == 0 then return end
  local gone = {}
  for _, inst in ipairs(dead) do gone[inst] = true end
  local all = redis.call('HGETALL', slots_key)
  for i = 1, #all, 2 do
    local f = all[i]
    local bar = string.find(f, '|', 1, true)
    if bar and gone[string.sub(f, 1, bar - 1)] then
      local n = tonumber(all[i + 1])
      if n > 0 then
        local total = '=' .. string.sub(f, bar + 1)
        if redis.call('HINCRBY', slots_key, total, -n) <= 0 then
          redis.call('HDEL', slots_key, total)
        end
      end
      redis.call('HDEL', slots_key, f)
    end
  end
  redis.call('ZREM', lease_key, unpack(dead))
end

-- Decoded snapshots kept between calls. Only the function library (scripts.py) keeps them:
-- its top level runs once per load; a script (EVAL) starts with empty tables every call. An
-- entry is used only while the stored string is the very one it was decoded from (Lua
-- strings are interned: the comparison is one pointer), so a changed snapshot is decoded
-- again at once. Two generations bound them: when the new one holds SNAP_MAX, it becomes the
-- old one and the one before is dropped; an entry found in the old one moves to the new one.
-- About 2 KB of Lua memory per entry (INFO memory: used_memory_vm_functions).
-- Kept small on purpose: the store steps Lua's collector every 50 calls, and each step walks
-- live tables, so a big cache makes every call dearer. With 2 x 2,000 entries a decision cost
-- the store ~25-30 us on one environment and ~45-49 us spread over 10^5; with 2 x 64, ~15 us
-- and ~25 us (loadtests/spread_cost.py, docs/benchmarks.md): the hottest environments keep
-- their decoded snapshot, the rest are decoded each call, which costs less than the walk.
local SNAP_MAX = 64
local snap_new, snap_old, snap_n = {}, {}, 0

-- The decoded snapshot, or nil when there is none of this layout. Never modify it: it is
-- shared with later calls.
local function snapshot(key)
  local raw = redis.call('GET', key)
  if not raw then return nil end
  local hit = snap_new[key]
  if hit and hit[1] == raw then return hit[2] end
  hit = snap_old[key]
  local ent
  if hit and hit[1] == raw then
    ent = hit[2]
  else
    ent = cjson.decode(raw)
    if ent.v ~= SNAPSHOT_V then return nil end
  end
  if snap_new[key] == nil then
    if snap_n >= SNAP_MAX then snap_old, snap_new, snap_n = snap_new, {}, 0 end
    snap_n = snap_n + 1
  end
  snap_new[key] = {raw, ent}
  return ent
end

-- Set what `inst` holds of `slot` to n (>= 0), keeping the total in step.
local function set_held(slots_key, inst, slot, n)
  local field = inst .. '|' .. slot
  local old = tonumber(redis.call('HGET', slots_key, field)) or 0
  if n == old then return end
  if n > 0 then redis.call('HSET', slots_key, field, n) else redis.call('HDEL', slots_key, field) end
  if redis.call('HINCRBY', slots_key, '=' .. slot, n - old) <= 0 then
    redis.call('HDEL', slots_key, '=' .. slot)
  end
end

-- Give back up to n slots `inst` holds (never below zero: a reaped instance gives back none).
local function release_held(slots_key, inst, slot, n)
  local old = tonumber(redis.call('HGET', slots_key, inst .. '|' .. slot)) or 0
  if old > 0 then set_held(slots_key, inst, slot, math.max(0, old - n)) end
end

-- Hold `inst`'s lease until now + lease_ms (never shortened). Both keys outlive the longest
-- lease by one period, so an environment whose instances all died forgets its slots by itself:
-- their expiry is set when an instance joins and pushed on by every renewal (`always`).
local function hold_lease(slots_key, lease_key, inst, now, lease_ms, always)
  local joined = redis.call('ZADD', lease_key, 'GT', now + lease_ms, inst)
  -- (a slots hash emptied and created again has no expiry yet)
  if joined == 0 and not always and redis.call('PTTL', slots_key) >= 0 then return end
  local keep = 2 * lease_ms
  for _, k in ipairs({slots_key, lease_key}) do
    if redis.call('PTTL', k) < keep then redis.call('PEXPIRE', k, keep) end
  end
end

-- Alerts (SPEC §12): 80 %, 90 % of a meter's plan quota, and 100 % (the plan quota used up),
-- each at most once per environment, meter, level and cycle: HSETNX in the environment's
-- alerts hash decides, whichever instance sees it first, and the event goes to the
-- environment's stream (moved to the global stream by the gateway).
local ALERT_METERS = {calls = true, gbs = true, outbound_bytes = true,
                      storage_traffic_bytes = true, cdn_origin_bytes = true}
local ALERT_LEVELS = {80, 90, 100}

-- `takes` as allocate() builds them: returns how many events were written. A take from a
-- pack that spends it writes `pack-used-up`, once per pack (its mark in the alerts hash).
local function alert_on(takes, usage_key, alerts_key, events_key, cycle_day, now_ms)
  local written = 0
  for _, tk in ipairs(takes) do
    if tk[1] ~= usage_key then
      local after = tonumber(redis.call('HGET', tk[1], tk[2])) or 0
      for _, p in ipairs(ENT.packs) do
        if p.id == tk[2] and after - tk[3] < p.amount and after >= p.amount
            and redis.call('HSETNX', alerts_key, 'pack:' .. p.id, now_ms) == 1 then
          redis.call('XADD', events_key, 'MAXLEN', '~', 10000, '*',
                     'type', 'pack-used-up', 'pack_id', p.id, 'at_ms', now_ms)
          written = written + 1
        end
      end
    else
      local cycle, meter = string.match(tk[2], '^(%d+):(.+)$')
      local quota = ENT.quota[meter] or 0
      if ALERT_METERS[meter] and quota > 0 then
        local after = tonumber(redis.call('HGET', usage_key, tk[2])) or 0
        local before = after - tk[3]
        for _, level in ipairs(ALERT_LEVELS) do
          local mark = quota * level / 100
          if before < mark and after >= mark then
            local field = cycle .. ':' .. meter .. ':' .. level
            if redis.call('HSETNX', alerts_key, field, now_ms) == 1 then
              redis.call('XADD', events_key, 'MAXLEN', '~', 10000, '*',
                         'type', 'quota-alert', 'meter', meter, 'level', level,
                         'cycle_day', cycle, 'used', after, 'quota', quota, 'at_ms', now_ms)
              written = written + 1
            end
          end
        end
      end
    end
  end
  if written > 0 then
    redis.call('PEXPIRE', alerts_key, 400 * 86400000)  -- outlives any cycle
  end
  return written
end

--[[ Leases of hot environments (lease.lua). An instance deciding an environment in memory holds
one lease record in the environment's `hot` hash, field "<instance>" -> JSON:
  i  the lease's id (the instance's, kept while it leases the environment)
  s  its share of the environment's QPS (requests/s); w what it wants (its demand)
  c  calls it has committed (charged), cumulative; b calls granted, cumulative: it may admit
     until its own count reaches b, and b - c is held for it
  t  what of b - c is reserved, in waterfall order: {{"u"|"p", field or pack id, n}…} ("u":
     the usage hash, "p": the packs hash); the rest of b - c (overage on) is pay-as-you-go
  e  store-clock ms (since 2020) the lease ends at; d the local day it was granted on
A lease past its end is reaped by the next script that reads the hash: what it held is charged
as used (the instance may have admitted all of it, so nothing is over-admitted) and kept as
"x:<instance>|<id>" -> {c, t, d, cy}, until the instance (or its journal, after a crash) tells what it did use:
the rest is then given back (commit_lease). ]]

local function reserve_of(tk)  -- a reserved take's {key, field, n} in the usage or packs hash
  return tk[1] == 'u' and 1 or 2
end

-- Charge `n` of a lease's reserved takes (front first), appending the writes to `charged`
-- ({key, field, n}, as allocate's) and shrinking `t`; returns what was beyond them.
local function take_reserved(t, n, keys2, charged)
  while n > 0 and #t > 0 do
    local tk = t[1]
    local m = math.min(n, tk[3])
    charged[#charged + 1] = {keys2[reserve_of(tk)], tk[2], m}
    tk[3] = tk[3] - m
    n = n - m
    if tk[3] <= 0 then table.remove(t, 1) end
  end
  return n
end

-- Write `charged` takes, and alerts for them; returns events written.
local function charge_takes(charged, usage_key, alerts_key, events_key, cycle_day, now_ms)
  for _, tk in ipairs(charged) do redis.call('HINCRBY', tk[1], tk[2], tk[3]) end
  return alert_on(charged, usage_key, alerts_key, events_key, cycle_day, now_ms)
end

-- Calls of a lease beyond what it reserved (overage on: pay-as-you-go of the day it was
-- granted on; else recorded unbilled).
local function charge_beyond(payg_key, n, day)
  if n <= 0 then return 0 end
  local field, billed = over_field('calls', 'enforce', day)
  redis.call('HINCRBY', payg_key, field, n)
  return billed and 2 or 0
end

-- Keep the hash as long as a note of a lease may wait for its journal (a gateway killed and
-- started again days later): a live lease's record must never go with the hash's expiry.
local function keep_hot(K)
  if redis.call('PTTL', K[10]) < 20 * 86400000 then
    redis.call('PEXPIRE', K[10], 40 * 86400000)
  end
end

-- A lease its instance no longer speaks for (past its end, or replaced by a newer one of the
-- same instance): what it held is charged as used — it may have admitted all of it — and kept
-- as "x:<instance>|<id>" until the instance or its journal tells. Returns events written.
local function orphan_lease(K, f, rec, now_ms)
  local charged = {}
  local held = 0
  for _, tk in ipairs(rec.t) do held = held + tk[3] end
  take_reserved(rec.t, held, {K[3], K[4]}, charged)
  local events = charge_takes(charged, K[3], K[8], K[9], rec.cy, now_ms)
  count_day(K[11], 'calls', held, rec.d)
  local kept = {}
  for _, tk in ipairs(charged) do
    kept[#kept + 1] = {tk[1] == K[3] and 'u' or 'p', tk[2], tk[3]}
  end
  redis.call('HSET', K[10], 'x:' .. f .. '|' .. rec.i, cjson.encode({c = rec.c, t = kept,
             b = rec.b, d = rec.d, cy = rec.cy}))
  redis.call('HDEL', K[10], f)
  keep_hot(K)
  return events
end

-- The leases of one environment: reaps the ones past their end (orphan_lease) but `own`'s
-- (the instance renewing now), and returns the live ones (instance -> record), their QPS
-- shares' sum, what they reserve per field ("u<field>" / "p<pack id>"), and events written.
-- `K`: decide.lua's KEYS (usage 3, packs 4, payg 5, alerts 8, events 9, hot 10, days 11).
local function add_reserved(reserved, rec)  -- a lease record's reservations, added up
  for _, tk in ipairs(rec.t) do
    local k = tk[1] .. tk[2]
    reserved[k] = (reserved[k] or 0) + tk[3]
  end
end

local function hot_state(K, store_ms, now_ms, own)
  local all = redis.call('HGETALL', K[10])
  local live, share, reserved, events = {}, 0, {}, 0
  for i = 1, #all, 2 do
    local f = all[i]
    if string.sub(f, 1, 2) ~= 'x:' then
      local rec = cjson.decode(all[i + 1])
      if rec.e < store_ms and f ~= own then
        events = events + orphan_lease(K, f, rec, now_ms)
      else
        live[f] = rec
        share = share + rec.s
        add_reserved(reserved, rec)
      end
    end
  end
  return live, share, reserved, events
end

-- An instance tells it has admitted `used` calls (cumulative) under lease `id`: the calls not
-- charged yet are, from what the lease reserved (then pay-as-you-go). On a renewal, the
-- instance's record of another id (a lease it left and took again before the end reached the
-- store) becomes a note first. A lease noted before (its held calls charged as used): `revive` (a renewal:
-- the instance may have admitted more since it sent this) restores what it did not use as
-- held again and returns it as the live record; else (an end, a journal) that goes back, the
-- last taken first. Returns the live record (updated, not written; nil: none), and flags (2
-- payg, 16 events).
local function commit_lease(K, inst, id, used, now_ms, revive)
  local flags, events = 0, 0
  local raw = redis.call('HGET', K[10], inst)
  if raw then
    local rec = cjson.decode(raw)
    if rec.i == id then
      local delta = used - rec.c
      if delta > 0 then
        local charged = {}
        local beyond = take_reserved(rec.t, delta, {K[3], K[4]}, charged)
        events = charge_takes(charged, K[3], K[8], K[9], rec.cy, now_ms)
        flags = charge_beyond(K[5], beyond, rec.d)
        count_day(K[11], 'calls', delta, rec.d)
        rec.c = used
      end
      return rec, flags + (events > 0 and 16 or 0)
    end
    -- Another id: a renewal under a new one (the instance left the old lease and leases
    -- again) makes the old one a note; the end of an older one leaves the live one be.
    if revive then events = orphan_lease(K, inst, rec, now_ms) end
  end
  local orphan = 'x:' .. inst .. '|' .. id
  raw = redis.call('HGET', K[10], orphan)
  local rec = nil
  if raw then
    local note = cjson.decode(raw)
    local delta = math.max(0, used - note.c)
    local held = 0
    for _, tk in ipairs(note.t) do held = held + tk[3] end
    local back = held - math.min(delta, held)
    local again = {}  -- (revive) what goes back, held again, in the order it was taken
    for j = #note.t, 1, -1 do  -- the last taken first
      if back <= 0 then break end
      local tk = note.t[j]
      local m = math.min(back, tk[3])
      redis.call('HINCRBY', tk[1] == 'u' and K[3] or K[4], tk[2], -m)
      table.insert(again, 1, {tk[1], tk[2], m})
      back = back - m
    end
    flags = charge_beyond(K[5], delta - held, note.d)
    count_day(K[11], 'calls', delta - held, note.d)  -- (held was counted when charged whole)
    redis.call('HDEL', K[10], orphan)
    if revive then
      rec = {i = id, c = math.max(used, note.c), b = math.max(note.b or used, used), t = again,
             s = 0, w = 0, e = 0, d = note.d, cy = note.cy}
    end
  end
  return rec, flags + (events > 0 and 16 or 0)
end
