--[[ settle.lua — what one environment's finished requests leave behind, in one call:
slots given back and metered usage (bytes served, GBs run) charged after the response.

KEYS[1] ent, KEYS[2] usage, KEYS[3] packs, KEYS[4] payg, KEYS[5] slots, KEYS[6] lease
        (as in decide.lua)
KEYS[7] alerts, KEYS[8] events, KEYS[9] hot, KEYS[10] days (as in decide.lua: KEYS[8..11]);
        the calls that leases of a hot environment hold are not taken by usage charged here
KEYS[11] (optional) seen: string, set once per id — an ingested record, a write-back, refunds
        sent again, a plugin-mode done call ("done:<holder>"): a call whose id was seen before
        changes nothing at all (reply status 8). Set by the call that applies, in the same
        script, whatever it carries (slots only, meters, refunds, nothing).
ARGV[1] now_ms    when the usage happened, ms since the epoch; "0" = the store's clock
ARGV[2] instance  the gateway instance giving slots back
ARGV[3] mode      "enforce" | "shadow" (the snapshot's mode wins) | "record" (write-back)
ARGV[4] n         number of (slot, count) pairs that follow, then (meter, amount) pairs;
                  a meter named "-<meter>@<ms>" gives back that amount charged at <ms>;
                  then, optionally, one last value: how long KEYS[11] is kept (ms; default
                  40 days, longer than any retry of a record)

Checked before anything is written: every count and amount is a whole number from 0 to
2^53 - 1 (exact in Lua's doubles), and no counter this call adds to may pass 2^62 (HINCRBY
stops at 2^63 - 1). Anything else is refused whole — reply status 16, nothing written, not
even the seen key or a slot — so an error can never leave half a settle behind.

Metered usage never refuses (the request has been served): it goes plan -> packs ->
pay-as-you-go with overage on, else it is recorded beyond the quota, unbilled; the next
request that needs the meter is then refused by decide.lua.

Reply: {status, flags}; status 4 = no snapshot (slots given back, usage not written: the
caller keeps it; the seen key is not set), 8 = an id seen before (nothing written), 16 =
refused (out of bounds: nothing written); flags 2 = pay-as-you-go used, 16 events written.
]]

local MAX_AMOUNT = 9007199254740991   -- 2^53 - 1
local GAUGE_GAP_DAYS = 400  -- the furthest back a gauge's days nobody carried are billed
local MAX_COUNTER = 4611686018427387904  -- 2^62

-- A whole number from 0 to 2^53 - 1, or nil.
local function whole(s)
  local v = tonumber(s)
  if v and v >= 0 and v <= MAX_AMOUNT and v == math.floor(v) then return v end
  return nil
end

-- 1. The arguments, before anything is read or written.
local now_ms, n = whole(ARGV[1]), whole(ARGV[4])
if not now_ms or not n or 4 + 2 * n > #ARGV then return {16, 0} end
local inst, mode = ARGV[2], ARGV[3]
local first = 5 + 2 * n  -- the first (meter, amount) pair
for j = 5, first - 1, 2 do
  if not whole(ARGV[j + 1]) then return {16, 0} end
end
local last = #ARGV  -- the last argument of a pair
local keep_ms = 40 * 86400000  -- longer than any retry of a record
if (last - first) % 2 == 0 then  -- one last value: how long the seen key is kept
  keep_ms = whole(ARGV[last])
  if not keep_ms or keep_ms < 1 then return {16, 0} end
  last = last - 1
end
local charged = {}  -- meter -> what this call adds to its counters
for j = first, last, 2 do
  local amount = whole(ARGV[j + 1])
  if not amount then return {16, 0} end
  local meter = ARGV[j]
  if meter ~= 'capacity_bytes' and string.sub(meter, 1, 1) ~= '-' then
    charged[meter] = (charged[meter] or 0) + amount
  end
end

-- 2. Once per id: a call seen before writes nothing.
if KEYS[11] and redis.call('EXISTS', KEYS[11]) == 1 then return {8, 0} end

local function give_slots_back()
  for j = 5, first - 1, 2 do
    release_held(KEYS[5], inst, ARGV[j], tonumber(ARGV[j + 1]))
  end
end
local function seen()
  if KEYS[11] then redis.call('SET', KEYS[11], '1', 'PX', keep_ms) end
end

if first > last then  -- slots only (or nothing): no snapshot needed
  seen()
  give_slots_back()
  return {0, 0}
end

local ent = snapshot(KEYS[1])
if not ent then
  give_slots_back()
  return {4, 0}
end
if now_ms == 0 then now_ms = store_clock_ms() + EPOCH_2020_MS end
if mode ~= 'record' and ent.mode ~= '' then mode = ent.mode end
if mode == 'off' then
  seen()
  give_slots_back()
  return {0, 0}
end
calendar_at(ent, now_ms)
local cycle_day = cycle_now()

-- 3. No counter may overflow: every one this call may add to (the plan's, each valid pack's,
-- today's beyond plan + packs) is read first, before the first write.
for meter, amount in pairs(charged) do
  local room = MAX_COUNTER - amount
  local function full(key, field)
    return (tonumber(redis.call('HGET', key, field)) or 0) > room
  end
  if amount > MAX_COUNTER or full(KEYS[2], cycle_day .. ':' .. meter)
      or full(KEYS[4], (over_field(meter, mode))) then
    return {16, 0}
  end
  for _, p in ipairs(ENT.packs) do
    if p.meter == meter and p.from <= TODAY and TODAY < p.to and full(KEYS[3], p.id) then
      return {16, 0}
    end
  end
end

-- 4. Written: the seen key, the slots, the meters.
seen()
give_slots_back()

local flags = 0

-- A gauge: the reported size replaces the last one; the day's pay-as-you-go is the largest
-- excess over plan + packs seen that day (billed per GB and day).
-- A day's excess of a gauge is the largest seen that day: kept if larger than what is there.
local function gauge_over(meter, size, day)
  local over = size - gauge_room(meter, day)
  if over <= 0 then return end
  local field, billed = over_field(meter, mode, day)
  if billed and flags % 4 < 2 then flags = flags + 2 end
  if (tonumber(redis.call('HGET', KEYS[4], field)) or 0) < over then
    redis.call('HSET', KEYS[4], field, over)
  end
end

local function gauge(meter, value)
  -- A report older than the one kept (a late retry) changes nothing.
  local kept_at = tonumber(redis.call('HGET', KEYS[2], 'gauge_at:' .. meter)) or 0
  if now_ms < kept_at then return end
  if kept_at > 0 then
    -- Days since the size was last reported or carried on which nobody carried it (no
    -- instance ran a scheduler round: an outage of a whole day, a deployment scaled to zero
    -- overnight) are billed the size kept, as a carry would have billed them: once each (a
    -- day's excess is its largest), active days only, at most GAUGE_GAP_DAYS back.
    local kept = tonumber(redis.call('HGET', KEYS[2], 'gauge:' .. meter)) or 0
    local from = math.max(local_day(kept_at) + 1, TODAY - GAUGE_GAP_DAYS, ENT.cycles[1])
    for day = from, math.min(TODAY, ENT.expire_day) - 1 do gauge_over(meter, kept, day) end
  end
  redis.call('HSET', KEYS[2], 'gauge:' .. meter, value, 'gauge_at:' .. meter, now_ms)
  gauge_over(meter, value, TODAY)
end

-- What the leases of a hot environment hold of each field ("u<field>" / "p<pack id>", as
-- hot_state's), read once: theirs to admit, not free for usage charged here. A lease past its
-- end counts too (the next decision charges it whole as used). Leases hold calls only.
local reserved = nil
local function held_by_leases()
  if reserved then return reserved end
  reserved = {}
  local all = redis.call('HGETALL', KEYS[9])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) ~= 'x:' then add_reserved(reserved, cjson.decode(all[i + 1])) end
  end
  return reserved
end

local function cumulative(meter, amount)
  local takes = {}
  local over = allocate(takes, KEYS[2], KEYS[3], cycle_day, meter, amount,
                        meter == 'calls' and held_by_leases() or nil)
  for _, tk in ipairs(takes) do redis.call('HINCRBY', tk[1], tk[2], tk[3]) end
  count_day(KEYS[10], meter, amount, TODAY)
  if alert_on(takes, KEYS[2], KEYS[7], KEYS[8], cycle_day, now_ms) > 0 then
    flags = flags + 16
  end
  if over > 0 then
    local field, billed = over_field(meter, mode)
    if billed and flags % 4 < 2 then flags = flags + 2 end
    redis.call('HINCRBY', KEYS[4], field, over)
  end
end

-- A charge given back (a call the upstream never answered), the last taken first: today's
-- excess (pay-as-you-go, or unbilled), then packs (latest expiry first, the reverse of
-- allocate's order), then the plan's cycle usage. Never below zero. Only on the day it was
-- charged (`at`, ms): a day later its excess may be billed and its cycle over, so it stays.
local function refund(meter, amount, at)
  if not at or local_day(at) ~= TODAY then return end
  local asked = amount
  local function give(key, field)
    local used = tonumber(redis.call('HGET', key, field)) or 0
    local n = math.min(amount, used)
    if n > 0 then redis.call('HINCRBY', key, field, -n); amount = amount - n end
  end
  give(KEYS[4], (over_field(meter, mode)))
  for j = #ENT.packs, 1, -1 do
    local p = ENT.packs[j]
    if amount <= 0 then break end
    if p.meter == meter and p.from <= TODAY and TODAY < p.to then give(KEYS[3], p.id) end
  end
  if amount > 0 then give(KEYS[2], cycle_day .. ':' .. meter) end
  count_day(KEYS[10], meter, amount - asked, TODAY)
end

for i = first, last, 2 do
  local meter, amount = ARGV[i], tonumber(ARGV[i + 1])
  if meter == 'capacity_bytes' then
    gauge(meter, amount)
  elseif string.sub(meter, 1, 1) == '-' then  -- "-<meter>@<charged at ms>"
    local name, at = string.match(meter, '^%-([%w_]+)@(%d+)$')
    if name and mode ~= 'record' then refund(name, amount, tonumber(at)) end
  else
    cumulative(meter, amount)
  end
end
return {0, flags}
