--[[ decide.lua — admit or refuse one request of one environment, atomically.

All keys carry the environment's hash tag {env}.
KEYS[1] ent    string, JSON entitlement snapshot (entitlements.py): quota {meter: amount},
               caps {rt, fc}, tz [[from_ms, utc_offset_s]…], cycles [start_day…] (last = end
               of the last), expire_day, release_day, packs [{id, meter, amount, from, to}]
               earliest expiry first, promos [{from, to, qps, fc, rt, db}], overage, mode,
               sms_calls, gw (optional: the gateway version, {from, to, qps, bps,
               qps_after, bps_after}; to = 0 while it renews itself)
KEYS[2] qps    string, GCRA theoretical arrival time in ms since 2020-01-01 (store clock)
KEYS[3] usage  hash "<cycle_start_day>:<meter>" -> amount used from the plan quota
KEYS[4] packs  hash "<pack_id>" -> amount used from that pack
KEYS[5] payg   hash "<local_day>:<meter>" -> pay-as-you-go amount (billed next day);
               "<local_day>:<meter>:shadow" | ":unbilled" -> beyond quota, recorded, not billed
KEYS[6] slots  hash, leased concurrency slots (common.lua)
KEYS[7] lease  zset, instance -> lease end (common.lua)
KEYS[8] alerts hash "<cycle>:<meter>:<level>" -> when that alert fired (once per cycle)
KEYS[9] events stream of this environment's events (the gateway moves them to qg:events)
KEYS[10] hot   hash, leases of a hot environment's budget (common.lua, lease.lua): while
               instances hold some, this decides what they leave — the QPS beyond their
               shares, the quota beyond what they reserved — and says so (flags 128)
KEYS[11] days  hash "<local day>:<meter>" -> what the day used (common.lua count_day)
KEYS[12] (record mode, optional) seen: string set once per written-back entry id; an entry
        seen before is not counted again (flags 32) — a journal replayed after a crash

ARGV[1] now_ms    calendar clock, ms since the epoch; "0" = the store's clock
ARGV[2] kind      route kind: function database storage static ai sms realtime auth
ARGV[3] cost      units of the request: calls, or SMS messages for kind "sms"
ARGV[4] mode      "enforce" | "shadow" (the gateway's; the snapshot's mode wins) |
                  "record" (write back usage that passed while the store was down, at
                  ARGV[1] = when it passed: no QPS, no lifecycle, no slot, never refuses)
ARGV[5] burst_ms  GCRA burst tolerance
ARGV[6] slot      "" none | "rt:" a realtime watch | "fn:<name>" an invocation of a function
ARGV[7] instance  the gateway instance taking the slot
ARGV[8] lease_ms  how long the instance's slots are held without a renewal
ARGV[9] needs     metered or ingested meters the route uses, comma-separated ("" none): refused
                  once one is used up (hard stop)
ARGV[10] (optional) "pass": the request may pass while the environment is isolated or not
                  started (the route's ``pass_while_isolated``: the SDK's realtime sign call,
                  or the preflight of its endpoint), if it is of kind auth: then it costs
                  nothing, takes no slot and needs no meter, and only QPS can refuse it. A
                  released or unknown environment is refused as ever.

Reply: {code, flags, qps_limit, qps_remaining, qps_reset_ms, quota, remaining,
        reset_ms, retry_after_ms, window_s, meter, cap, in_use, qps_by, bandwidth}
  code   0 admitted, 1 qps, 2 quota, 3 isolated, 4 unknown/released, 5 plan not started,
         6 concurrency cap
  flags  1 shadow: refused by code but admitted (shadow mode), 2 pay-as-you-go used,
         4 database free, 8 mode off (nothing counted), 16 events written, 32 (record mode
         with KEYS[12]) an entry written back before: nothing written now, 64 (with code 3
         or 5) let through by ARGV[10] at no cost: counted in QPS only, 128 the
         environment is hot: instances decide it from leases (the caller leases too)
  quota / remaining  the calls meter: plan quota; what plan + valid packs still hold
  reset_ms           until the billing cycle resets; window_s the cycle's length
  meter              the meter that refused ("" when admitted)
  cap / in_use       the slot's cap and the live slots (with this one when admitted)
  qps_by             0 the plan's QPS (with promos) applied, 1 the gateway version's (lower)
  bandwidth          the gateway version's bytes per second for responses (0: not capped)
A refused request (enforce) writes nothing.
]]

local store_ms = store_clock_ms()
local now_ms = tonumber(ARGV[1])
if now_ms <= 0 then now_ms = store_ms + EPOCH_2020_MS end
local kind, cost, mode, burst = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local slot, needs = ARGV[6], ARGV[9]

-- Refusals before any counting; in shadow mode they are reported, not enforced.
local function early(code)
  return {code, (mode == 'shadow') and 1 or 0, 0, 0, 0, 0, 0, 0, 0, 0, '', 0, 0, 0, 0}
end

local ent = snapshot(KEYS[1])
if not ent then return early(4) end
if mode == 'record' and KEYS[12] and redis.call('EXISTS', KEYS[12]) == 1 then
  return {0, 32, 0, 0, 0, 0, 0, 0, 0, 0, '', 0, 0, 0, 0}  -- written back before: not again
end
if mode ~= 'record' and ent.mode ~= '' then mode = ent.mode end
if mode == 'off' then return {0, 8, 0, 0, 0, 0, 0, 0, 0, 0, '', 0, 0, 0, 0} end

calendar_at(ent, now_ms)
-- Isolated or not started, a request marked "pass" (an auth one) goes on at no cost: the
-- SDK's realtime sign call, so that the SDK opens its socket and is told the state (3050).
local lifecycle_status = 0
if mode ~= 'record' then  -- usage that already passed is recorded whatever the status now
  lifecycle_status = lifecycle()
  if lifecycle_status ~= 0 then
    if (lifecycle_status == 3 or lifecycle_status == 5) and ARGV[10] == 'pass'
        and kind == 'auth' then
      cost, slot, needs = 0, '', ''
    else
      return early(lifecycle_status)
    end
  end
else
  slot = ''
end
local cycle_day, next_cycle = cycle_now()
local cycle_end_ms = midnight_ms(next_cycle)
local reset_ms = cycle_end_ms - now_ms
local window_s = math.floor((cycle_end_ms - midnight_ms(cycle_day)) / 1000)

-- Active promos raise QPS and caps; a database promo makes database requests free.
local qps_limit, flags = ent.qps, 0
local cap = 0
if slot ~= '' then cap = (slot == 'rt:') and ent.caps.rt or ent.caps.fc end
for _, p in ipairs(ent.promos) do
  if p.from <= TODAY and TODAY < p.to then
    if p.qps > qps_limit then qps_limit = p.qps end
    if slot == 'rt:' then
      if p.rt > cap then cap = p.rt end
    elseif slot ~= '' and p.fc > cap then
      cap = p.fc
    end
    if p.db == 1 and (kind == 'database' or kind == 'realtime') then cost = 0; flags = 4 end
  end
end

-- The gateway version: the lower QPS applies; its bandwidth goes back to the gateway, which
-- shapes the response. Expired (and not renewing itself): the lowest version's caps.
local qps_by, bandwidth = 0, 0
local gw = ent.gw
if gw and TODAY >= gw.from then
  local gq, gb = gw.qps, gw.bps
  if gw.to ~= 0 and TODAY >= gw.to then gq, gb = gw.qps_after, gw.bps_after end
  if mode == 'enforce' then bandwidth = gb end  -- shadow mode reports, never delays
  if gq < qps_limit then qps_limit, qps_by = gq, 1 end
end

-- A hot environment: leases hold shares of its QPS and reserve calls; this request gets what
-- they leave (and leases past their end are reaped). A write-back (record) takes no QPS, but
-- its calls go where no lease has reserved them, as a decision's would.
local reserved, leased_qps, hot_events = nil, 0, false
if redis.call('EXISTS', KEYS[10]) == 1 then
  local live, share, res, events = hot_state(KEYS, store_ms, now_ms)
  if next(live) and mode ~= 'record' then flags = flags + 128 end
  if events > 0 then flags, hot_events = flags + 16, true end
  reserved, leased_qps = res, share
end

-- QPS: GCRA on the store's clock (instance clocks do not matter).
-- (Leases holding all of it: refused, the TAT untouched; they renew within a fraction of a
-- second, this instance's lease among them.)
local free_qps = qps_limit - leased_qps
local interval = 1000 / math.max(free_qps, 1)
local tat = tonumber(redis.call('GET', KEYS[2])) or store_ms
if tat < store_ms then tat = store_ms end
-- An admission puts the TAT at most burst + interval ahead of now: one further ahead is the
-- store's clock stepping back (NTP, a failover to a node whose clock differs), not clients.
-- It is taken as a full burst (the clamp kept, whatever this request's answer): the step
-- refuses nothing of its own, and admits at most one request more than a steady clock would.
-- (1 ms of slack: a TAT is stored to 4 decimals, and an interval such as 1000/600 rounds up,
-- so an admission can leave it a hair beyond burst + interval; taking that for a step would
-- admit every request of that millisecond.)
if tat > store_ms + burst + interval + 1 then
  tat = store_ms + burst
  if mode ~= 'record' then  -- kept even if this request is refused (for QPS or else)
    redis.call('SET', KEYS[2], string.format('%.4f', tat), 'PX', math.ceil(tat - store_ms) + 1000)
  end
end
local qps_ok = mode == 'record' or ((tat - store_ms) <= burst and free_qps >= 1)
local new_tat = tat + interval
local qps_retry, qps_remaining, qps_reset
if qps_ok then
  qps_remaining = math.floor((burst - (new_tat - store_ms)) / interval) + 1
  qps_reset = math.ceil(new_tat - store_ms)
else
  qps_remaining = 0
  qps_reset = math.ceil(tat - store_ms)
  qps_retry = math.max(math.ceil(tat - burst - store_ms), free_qps >= 1 and 0 or 100)
end
if qps_remaining < 0 then qps_remaining = 0 end

-- Waterfall plan -> valid packs; nothing is written yet.
local takes = {}
local over, quota, held, consumed
local day_sms, day_calls = 0, cost  -- what this request adds to the day's counts
if kind == 'sms' then
  -- SMS packs -> plan calls (sms_calls each) -> call packs -> call pay-as-you-go.
  local sms_left = allocate(takes, KEYS[3], KEYS[4], cycle_day, 'sms', cost, reserved)
  over, quota, held = allocate(takes, KEYS[3], KEYS[4], cycle_day, 'calls',
                               sms_left * ent.sms_calls, reserved)
  consumed = sms_left * ent.sms_calls - over
  day_sms, day_calls = cost - sms_left, sms_left * ent.sms_calls
else
  over, quota, held = allocate(takes, KEYS[3], KEYS[4], cycle_day, 'calls', cost, reserved)
  consumed = cost - over
end

local code, meter, retry = 0, '', 0
if not qps_ok then
  code, meter, retry = 1, 'qps', qps_retry
elseif mode ~= 'record' and ent.overage ~= 1 then
  if over > 0 then
    code, meter, retry = 2, (kind == 'sms') and 'sms' or 'calls', reset_ms
  elseif needs ~= '' then
    -- A meter charged after the response (or ingested) used up: requests needing it stop.
    for need in string.gmatch(needs, '[^,]+') do
      local meter_held
      if need == 'capacity_bytes' then  -- a gauge: full is full (writes refused)
        meter_held = gauge_left(KEYS[3], need)
      else
        local _
        _, _, meter_held = allocate({}, KEYS[3], KEYS[4], cycle_day, need, 0, reserved)
      end
      if meter_held <= 0 then code, meter, retry = 2, need, reset_ms break end
    end
  end
end

-- Concurrency: live slots of live instances, at the cap new ones are refused.
local in_use = 0
if slot ~= '' then
  reap(KEYS[6], KEYS[7], store_ms)
  in_use = tonumber(redis.call('HGET', KEYS[6], '=' .. slot)) or 0
  if code == 0 and in_use >= cap then
    code = 6
    meter = (slot == 'rt:') and 'realtime' or 'function_concurrency'
  end
end

if code ~= 0 then
  if mode == 'enforce' then
    return {code, flags, qps_limit, qps_remaining, qps_reset, quota, held, reset_ms, retry,
            window_s, meter, cap, in_use, qps_by, bandwidth}
  end
  flags = flags + 1 -- shadow: counted and reported, not refused
end

for _, tk in ipairs(takes) do redis.call('HINCRBY', tk[1], tk[2], tk[3]) end
count_day(KEYS[11], 'calls', day_calls, TODAY)
count_day(KEYS[11], 'sms', day_sms, TODAY)
if alert_on(takes, KEYS[3], KEYS[8], KEYS[9], cycle_day, now_ms) > 0 and not hot_events then
  flags = flags + 16
end
if over > 0 then
  local field, billed = over_field('calls', mode)
  if billed then flags = flags + 2 end
  redis.call('HINCRBY', KEYS[5], field, over)
end
if qps_ok and mode ~= 'record' then
  redis.call('SET', KEYS[2], string.format('%.4f', new_tat),
             'PX', math.ceil(new_tat - store_ms) + 1000)
end
if slot ~= '' then
  local inst = ARGV[7]
  redis.call('HINCRBY', KEYS[6], inst .. '|' .. slot, 1)
  in_use = redis.call('HINCRBY', KEYS[6], '=' .. slot, 1)
  hold_lease(KEYS[6], KEYS[7], inst, store_ms, tonumber(ARGV[8]), false)
end
if mode == 'record' and KEYS[12] then  -- last: only a write-back that counted is marked
  redis.call('SET', KEYS[12], '1', 'PX', 40 * 86400000)  -- longer than any replay
end
if code == 0 and lifecycle_status ~= 0 then  -- let through while isolated (ARGV[10])
  code, flags = lifecycle_status, flags + 64
end
return {code, flags, qps_limit, qps_remaining, qps_reset, quota, held - consumed, reset_ms,
        retry, window_s, meter, cap, in_use, qps_by, bandwidth}
