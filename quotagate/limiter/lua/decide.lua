--[[ decide.lua — admit or refuse one request of one environment, atomically.

All keys carry the environment's hash tag {env}.
KEYS[1] ent    string, JSON entitlement snapshot (entitlements.py): quota {meter: amount},
               tz [[from_ms, utc_offset_s]…], cycles [start_day…] (last = end of the last),
               expire_day, release_day, packs [{id, meter, amount, from, to}] earliest expiry
               first, promos [{from, to, qps, fc, rt, db}], overage, mode, sms_calls
KEYS[2] qps    string, GCRA theoretical arrival time in ms since 2020-01-01 (store clock)
KEYS[3] usage  hash "<cycle_start_day>:<meter>" -> amount used from the plan quota
KEYS[4] packs  hash "<pack_id>" -> amount used from that pack
KEYS[5] payg   hash "<local_day>:<meter>" -> pay-as-you-go amount (billed next day);
               "<local_day>:<meter>:shadow" | ":unbilled" -> beyond quota, recorded, not billed

ARGV[1] now_ms    calendar clock, ms since the epoch; "0" = the store's clock
ARGV[2] kind      route kind: function database storage static ai sms realtime auth
ARGV[3] cost      units of the request: calls, or SMS messages for kind "sms"
ARGV[4] mode      "enforce" | "shadow" (the gateway's; the snapshot's mode wins) |
                  "record" (write back usage that passed while the store was down, at
                  ARGV[1] = when it passed: no QPS, no lifecycle check, never refuses)
ARGV[5] burst_ms  GCRA burst tolerance

Reply: {code, flags, qps_limit, qps_remaining, qps_reset_ms, quota, remaining,
        reset_ms, retry_after_ms, window_s, meter}
  code   0 admitted, 1 qps, 2 quota, 3 isolated, 4 unknown/released, 5 plan not started
  flags  1 shadow: refused by code but admitted (shadow mode), 2 pay-as-you-go used,
         4 database free, 8 mode off (nothing counted)
  quota / remaining  the calls meter: plan quota; what plan + valid packs still hold
  reset_ms           until the billing cycle resets; window_s the cycle's length
  meter              the meter that refused ("" when admitted)
A refused request (enforce) writes nothing.
]]

local EPOCH_2020_MS = 1577836800000
local t = redis.call('TIME')
local store_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - EPOCH_2020_MS
local now_ms = tonumber(ARGV[1])
if now_ms <= 0 then now_ms = store_ms + EPOCH_2020_MS end
local kind, cost, mode, burst = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])

-- Refusals before any counting; in shadow mode they are reported, not enforced.
local function early(code)
  return {code, (mode == 'shadow') and 1 or 0, 0, 0, 0, 0, 0, 0, 0, 0, ''}
end

local raw = redis.call('GET', KEYS[1])
if not raw then return early(4) end
local ent = cjson.decode(raw)
if mode ~= 'record' and ent.mode ~= '' then mode = ent.mode end
if mode == 'off' then return {0, 8, 0, 0, 0, 0, 0, 0, 0, 0, ''} end

-- Local calendar days of the environment (days since 1970-01-01 in its time zone).
local function offset_at(ms)
  local off = ent.tz[1][2]
  for i = 2, #ent.tz do
    if ent.tz[i][1] <= ms then off = ent.tz[i][2] else break end
  end
  return off
end
local offset = offset_at(now_ms)
local today = math.floor((math.floor(now_ms / 1000) + offset) / 86400)
local function local_day(ms)
  return math.floor((math.floor(ms / 1000) + offset_at(ms)) / 86400)
end
-- Epoch ms where a local day begins: the earliest instant whose local day is that day, tried
-- with the offsets in force a day either side (exact also where DST starts at midnight).
local function midnight_ms(day)
  local guess = (day * 86400 - offset) * 1000
  if #ent.tz == 1 then return guess end  -- a zone without offset changes (the common case)
  local best
  for _, probe in ipairs({guess - 86400000, guess + 86400000}) do
    local t = (day * 86400 - offset_at(probe)) * 1000
    if local_day(t) >= day and (best == nil or t < best) then best = t end
  end
  return best or guess
end

local cycles = ent.cycles
if mode ~= 'record' then  -- usage that already passed is recorded whatever the status now
  if today >= ent.release_day then return early(4) end
  if today >= ent.expire_day then return early(3) end
  if today < cycles[1] then return early(5) end
end
local ci = 1
for i = #cycles - 1, 1, -1 do
  if cycles[i] <= today then ci = i break end
end
local cycle_day = cycles[ci]
local cycle_end_ms = midnight_ms(cycles[ci + 1])
local reset_ms = cycle_end_ms - now_ms
local window_s = math.floor((cycle_end_ms - midnight_ms(cycle_day)) / 1000)

-- Active promos raise QPS; a database promo makes database requests free.
local qps_limit, flags = ent.qps, 0
for _, p in ipairs(ent.promos) do
  if p.from <= today and today < p.to then
    if p.qps > qps_limit then qps_limit = p.qps end
    if p.db == 1 and kind == 'database' then cost = 0; flags = 4 end
  end
end

-- QPS: GCRA on the store's clock (instance clocks do not matter).
local interval = 1000 / qps_limit
local tat = tonumber(redis.call('GET', KEYS[2])) or store_ms
if tat < store_ms then tat = store_ms end
local qps_ok = mode == 'record' or (tat - store_ms) <= burst
local new_tat = tat + interval
local qps_retry, qps_remaining, qps_reset
if qps_ok then
  qps_remaining = math.floor((burst - (new_tat - store_ms)) / interval) + 1
  qps_reset = math.ceil(new_tat - store_ms)
else
  qps_remaining = 0
  qps_reset = math.ceil(tat - store_ms)
  qps_retry = math.ceil(tat - burst - store_ms)
end
if qps_remaining < 0 then qps_remaining = 0 end

-- Waterfall plan -> valid packs (earliest expiry first); nothing is written yet.
local takes = {}
local function allocate(meter, amount)
  local field = cycle_day .. ':' .. meter
  local quota = ent.quota[meter] or 0
  local plan_left = quota - (tonumber(redis.call('HGET', KEYS[3], field)) or 0)
  if plan_left < 0 then plan_left = 0 end
  local left = amount
  local take = math.min(left, plan_left)
  if take > 0 then takes[#takes + 1] = {KEYS[3], field, take}; left = left - take end
  local held = plan_left
  for _, p in ipairs(ent.packs) do
    if p.meter == meter and p.from <= today and today < p.to then
      local pack_left = p.amount - (tonumber(redis.call('HGET', KEYS[4], p.id)) or 0)
      if pack_left > 0 then
        held = held + pack_left
        take = math.min(left, pack_left)
        if take > 0 then takes[#takes + 1] = {KEYS[4], p.id, take}; left = left - take end
      end
    end
  end
  return left, quota, held
end

local over, quota, held, consumed
if kind == 'sms' then
  -- SMS packs -> plan calls (sms_calls each) -> call packs -> call pay-as-you-go.
  local sms_left = allocate('sms', cost)
  over, quota, held = allocate('calls', sms_left * ent.sms_calls)
  consumed = sms_left * ent.sms_calls - over
else
  over, quota, held = allocate('calls', cost)
  consumed = cost - over
end

local code, meter, retry = 0, '', 0
if not qps_ok then
  code, meter, retry = 1, 'qps', qps_retry
elseif over > 0 and ent.overage ~= 1 and mode ~= 'record' then
  code, meter, retry = 2, (kind == 'sms') and 'sms' or 'calls', reset_ms
end
if code ~= 0 then
  if mode == 'enforce' then
    return {code, flags, qps_limit, qps_remaining, qps_reset, quota, held, reset_ms, retry,
            window_s, meter}
  end
  flags = flags + 1 -- shadow: counted and reported, not refused
end

for _, tk in ipairs(takes) do redis.call('HINCRBY', tk[1], tk[2], tk[3]) end
if over > 0 then
  local field = today .. ':calls'
  if ent.overage == 1 then
    flags = flags + 2
  elseif mode == 'shadow' then
    field = field .. ':shadow'
  else
    field = field .. ':unbilled'
  end
  redis.call('HINCRBY', KEYS[5], field, over)
end
if qps_ok and mode ~= 'record' then
  redis.call('SET', KEYS[2], string.format('%.4f', new_tat),
             'PX', math.ceil(new_tat - store_ms) + 1000)
end
return {code, flags, qps_limit, qps_remaining, qps_reset, quota, held - consumed, reset_ms,
        retry, window_s, meter}
