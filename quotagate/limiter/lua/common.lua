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
-- the plan quota, and what plan + packs held before this amount.
local function allocate(takes, usage_key, packs_key, cycle_day, meter, amount)
  local field = cycle_day .. ':' .. meter
  local quota = ENT.quota[meter] or 0
  local plan_left = quota - (tonumber(redis.call('HGET', usage_key, field)) or 0)
  if plan_left < 0 then plan_left = 0 end
  local left = amount
  local take = math.min(left, plan_left)
  if take > 0 then takes[#takes + 1] = {usage_key, field, take}; left = left - take end
  local held = plan_left
  for _, p in ipairs(ENT.packs) do
    if p.meter == meter and p.from <= TODAY and TODAY < p.to then
      local pack_left = p.amount - (tonumber(redis.call('HGET', packs_key, p.id)) or 0)
      if pack_left > 0 then
        held = held + pack_left
        take = math.min(left, pack_left)
        if take > 0 then takes[#takes + 1] = {packs_key, p.id, take}; left = left - take end
      end
    end
  end
  return left, quota, held
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
local SNAP_MAX = 2000
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
