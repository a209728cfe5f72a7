--[[ settle.lua — what one environment's finished requests leave behind, in one call:
slots given back and metered usage (bytes served, GBs run) charged after the response.

KEYS[1] ent, KEYS[2] usage, KEYS[3] packs, KEYS[4] payg, KEYS[5] slots, KEYS[6] lease
        (as in decide.lua)
KEYS[7] alerts, KEYS[8] events (as in decide.lua)
KEYS[9] (ingestion only) seen: string, set once per ingested record id; a record seen before
        is not counted again (reply status 8)
ARGV[1] now_ms    when the usage happened, ms since the epoch; "0" = the store's clock
ARGV[2] instance  the gateway instance giving slots back
ARGV[3] mode      "enforce" | "shadow" (the snapshot's mode wins) | "record" (write-back)
ARGV[4] n         number of (slot, count) pairs that follow, then (meter, amount) pairs;
                  a meter named "-<meter>@<ms>" gives back that amount charged at <ms>

Metered usage never refuses (the request has been served): it goes plan -> packs ->
pay-as-you-go with overage on, else it is recorded beyond the quota, unbilled; the next
request that needs the meter is then refused by decide.lua.

Reply: {status, flags}; status 4 = no snapshot (usage not written: the caller keeps it),
8 = an ingested record seen before (nothing written); flags 2 = pay-as-you-go used, 16 events
written.
]]

local store_ms = store_clock_ms()
local now_ms = tonumber(ARGV[1])
if now_ms <= 0 then now_ms = store_ms + EPOCH_2020_MS end
local inst, mode = ARGV[2], ARGV[3]
local n = tonumber(ARGV[4])

local i = 5
for _ = 1, n do
  release_held(KEYS[5], inst, ARGV[i], tonumber(ARGV[i + 1]))
  i = i + 2
end
if i > #ARGV then return {0, 0} end

local ent = snapshot(KEYS[1])
if not ent then return {4, 0} end
if KEYS[9] then
  if redis.call('EXISTS', KEYS[9]) == 1 then return {8, 0} end
  redis.call('SET', KEYS[9], '1', 'PX', 40 * 86400000)  -- longer than any retry
end
if mode ~= 'record' and ent.mode ~= '' then mode = ent.mode end
if mode == 'off' then return {0, 0} end
calendar_at(ent, now_ms)
local cycle_day = cycle_now()

local flags = 0

-- A gauge: the reported size replaces the last one; the day's pay-as-you-go is the largest
-- excess over plan + packs seen that day (billed per GB and day).
local function gauge(meter, value)
  -- A report older than the one kept (a late retry) changes nothing.
  local kept_at = tonumber(redis.call('HGET', KEYS[2], 'gauge_at:' .. meter)) or 0
  if now_ms < kept_at then return end
  redis.call('HSET', KEYS[2], 'gauge:' .. meter, value, 'gauge_at:' .. meter, now_ms)
  local left = gauge_left(KEYS[2], meter)
  if left < 0 then
    local field, billed = over_field(meter, mode)
    if billed and flags % 4 < 2 then flags = flags + 2 end
    if (tonumber(redis.call('HGET', KEYS[4], field)) or 0) < -left then
      redis.call('HSET', KEYS[4], field, -left)
    end
  end
end

local function cumulative(meter, amount)
  local takes = {}
  local over = allocate(takes, KEYS[2], KEYS[3], cycle_day, meter, amount)
  for _, tk in ipairs(takes) do redis.call('HINCRBY', tk[1], tk[2], tk[3]) end
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
  local function give(key, field)
    local used = tonumber(redis.call('HGET', key, field)) or 0
    local n = math.min(amount, used)
    if n > 0 then redis.call('HINCRBY', key, field, -n); amount = amount - n end
  end
  give(KEYS[4], (over_field(meter, mode)))
  for j = #ENT.packs, 1, -1 do
    local p = ENT.packs[j]
    if amount <= 0 then return end
    if p.meter == meter and p.from <= TODAY and TODAY < p.to then give(KEYS[3], p.id) end
  end
  if amount > 0 then give(KEYS[2], cycle_day .. ':' .. meter) end
end

while i < #ARGV do
  local meter, amount = ARGV[i], tonumber(ARGV[i + 1])
  if meter == 'capacity_bytes' then
    gauge(meter, amount)
  elseif string.sub(meter, 1, 1) == '-' then  -- "-<meter>@<charged at ms>"
    local name, at = string.match(meter, '^%-([%w_]+)@(%d+)$')
    if name and mode ~= 'record' then refund(name, amount, tonumber(at)) end
  else
    cumulative(meter, amount)
  end
  i = i + 2
end
return {0, flags}
