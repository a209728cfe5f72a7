--[[ lease.lua — the budget an instance decides a hot environment with, in memory.

One call commits what the instance admitted under its lease and grants the next period: a share
of the environment's QPS and calls held for it through the waterfall (plan -> packs, then
pay-as-you-go with overage on). The lease record's fields are common.lua's (hot_state).

KEYS: decide.lua's KEYS[1..11] (ent, qps, usage, packs, payg, slots, lease, alerts, events, hot,
      days)
ARGV[1] now_ms    the calendar's time, ms since the epoch; "0" = the store's clock
ARGV[2] instance  the instance holding the lease (recover: the instance that stopped)
ARGV[3] op        "lease": commit and take the next period; "end": commit and give back what
                  is left (the instance decides per request again); "recover": "end" for an
                  instance that stopped, from its journal (nothing if already done)
ARGV[4] id        the lease's id (the instance's own, kept while it leases the environment)
ARGV[5] used      calls the instance admitted under it, cumulative (a repeated call with the
                  same count charges nothing twice)
ARGV[6] want_qps  (lease) requests/s the instance wants: its demand
ARGV[7] want      (lease) calls it wants held for it beyond `used`
ARGV[8] lease_ms  (lease) how long the lease holds without a renewal
ARGV[9] mode      (lease) the instance's "enforce" | "shadow" (the snapshot's mode wins)
ARGV[10] needs    (lease) meters the instance's requests need, comma-separated: the reply says
                  which are used up (hard stop)

Shares are fair: the environment's QPS (plan, promos, gateway version) is split max-min over
the wants of the live leases, and a lease is granted at most what the others leave now (they
shrink to their fair part at their own renewal: within a period or two the split is fair).

Reply: {code, flags, share, granted, qps_limit, quota, remaining, reset_ms, window_s, until_ms,
        used_up, bandwidth, qps_by, capped}
  code     0 leased; 3 isolated, 4 unknown/released (an "end" or "recover" commits the
           count all the same: a file's environment removed keeps its usage), 5 not
           started, 7 not leasable now (shadow or off mode; a local-day or cycle boundary
           closer than the lease; the quota near its end): no next period — what the lease held stays held until the
           instance sends "end" with its last count, and decides per request from then; 8
           ended ("end" and "recover")
  flags    2 pay-as-you-go written, 4 a database promo makes database and realtime requests
           free, 16 events written, 32 plan and packs used up (hard stop): no calls granted,
           the instance refuses quota in memory until a renewal finds room
  share    requests/s this instance may admit; granted: calls it may admit, cumulative (its
           `used` counts against it)
  quota / remaining  the calls meter: plan quota; what plan + valid packs hold for this
           instance (all that others have not reserved, its own lease included)
  reset_ms / window_s  as decide.lua; until_ms: the lease holds that long (store clock)
  used_up  the meters of ARGV[10] used up ("" none); capped: 1 when the share is less than
           wanted (the environment is at its QPS: refuse beyond the share, not ask the store)
]]

local MIN_GRANT = 16          -- calls: fewer than this held for a lease, it is not worth one
local MARGIN_MS = 1000        -- a lease ends this long before a local day or a cycle does

local store_ms = store_clock_ms()
local now_ms = tonumber(ARGV[1])
if now_ms <= 0 then now_ms = store_ms + EPOCH_2020_MS end
local inst, op, id, used = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])

local function reply(code, flags)
  return {code, flags, '0', 0, 0, 0, 0, 0, 0, 0, '', 0, 0, 0}
end

local ent = snapshot(KEYS[1])
if not ent then
  if op == 'lease' then return reply(4, 0) end
  -- No snapshot (an environment taken out of the file: its usage stays for the bills): an
  -- end or a recovery still commits what the lease admitted, from what it reserved, the rest
  -- as pay-as-you-go of the day it was granted on (beyond the reserved, a lease grants only
  -- with overage on). No alert: no quota to read them against. The calendar is UTC; nothing
  -- here reads it.
  calendar_at({tz = {{0, 0}}, packs = {}, quota = {}, overage = 1}, now_ms)
  local rec, flags = commit_lease(KEYS, inst, id, used, now_ms, false)
  if rec then redis.call('HDEL', KEYS[10], inst) end
  return reply(4, flags)
end
calendar_at(ent, now_ms)
-- The count first, so that what it charged is no longer counted as held below.
local rec, flags = commit_lease(KEYS, inst, id, used, now_ms, op == 'lease')
if rec then redis.call('HSET', KEYS[10], inst, cjson.encode(rec)) end
local live, share, reserved, events = hot_state(KEYS, store_ms, now_ms, inst)
if flags >= 16 then flags = flags - 16; events = events + 1 end
if events > 0 then flags = flags + 16 end

-- Nothing held for the instance any more: its lease ends.
local function give_back()
  if rec then redis.call('HDEL', KEYS[10], inst) end
end

if op ~= 'lease' then
  give_back()
  return reply(8, flags)
end

-- No next period: what the lease holds stays held (the instance may have admitted more since
-- it sent this call) until the instance ends it ("end", at once) or it expires.
local function no_lease(code)
  if rec then keep_hot(KEYS) end  -- (written above, with the count committed)
  return reply(code, flags)
end

local mode = ARGV[9]
if ent.mode ~= '' then mode = ent.mode end
local status = lifecycle()
if status ~= 0 then return no_lease(status) end
if mode ~= 'enforce' then return no_lease(7) end

-- A lease never spans a local day's or a cycle's end (calendars, packs and promos change at
-- midnight): closer than that, per request.
local cycle_day, next_cycle = cycle_now()
local cycle_end_ms = midnight_ms(next_cycle)
local day_end_ms = midnight_ms(TODAY + 1)
local lease_ms = tonumber(ARGV[8])
if math.min(cycle_end_ms, day_end_ms) - now_ms < lease_ms + MARGIN_MS then
  return no_lease(7)
end

-- The QPS in force (as decide.lua): plan, promos, the gateway version.
local qps_limit, db_free = ent.qps, false
for _, p in ipairs(ent.promos) do
  if p.from <= TODAY and TODAY < p.to then
    if p.qps > qps_limit then qps_limit = p.qps end
    if p.db == 1 then db_free = true end
  end
end
if db_free then flags = flags + 4 end
local qps_by, bandwidth = 0, 0
local gw = ent.gw
if gw and TODAY >= gw.from then
  local gq, gb = gw.qps, gw.bps
  if gw.to ~= 0 and TODAY >= gw.to then gq, gb = gw.qps_after, gw.bps_after end
  bandwidth = gb
  if gq < qps_limit then qps_limit, qps_by = gq, 1 end
end

-- Calls: what plan + packs hold beyond every lease's reservation, this one's included.
local mine = {}
if rec then
  for _, tk in ipairs(rec.t) do mine[tk[1] .. tk[2]] = tk[3] end
end
local others = {}
for k, n in pairs(reserved) do others[k] = n - (mine[k] or 0) end
local _, quota, held = allocate({}, KEYS[3], KEYS[4], cycle_day, 'calls', 0, others)
local mine_held = 0
for _, n in pairs(mine) do mine_held = mine_held + n end
local free = held - mine_held  -- held for nobody

local t = rec and rec.t or {}
local granted = rec and rec.b or used
if granted < used then granted = used end
local want = tonumber(ARGV[7])
local n_leases = 1
for f, _ in pairs(live) do if f ~= inst then n_leases = n_leases + 1 end end
local add = math.max(0, used + want - granted)
if ent.overage ~= 1 then
  -- Hard stop: at most half of what is free, split over the leases; near the end nothing,
  -- and the instance decides per request (each decision exact).
  add = math.min(add, math.floor(free / (2 * n_leases)))
  if granted - used + add < math.min(MIN_GRANT, want) then
    -- Plan and packs used up, nothing held by anyone: the lease goes on, for the QPS share,
    -- with no calls (flags 32): its instance refuses quota here until a renewal finds room
    -- (a pack bought). With a few calls left, per request: each of them decided exactly.
    if free > 0 or granted > used then return no_lease(7) end
    add = 0
    flags = flags + 32
  end
end
if add > 0 then
  local takes = {}
  -- (What plan + packs do not hold is pay-as-you-go: only with overage on, as a hard stop's
  -- `add` is at most what is free.)
  allocate(takes, KEYS[3], KEYS[4], cycle_day, 'calls', add, reserved)
  for _, tk in ipairs(takes) do
    local kind = (tk[1] == KEYS[3]) and 'u' or 'p'
    local last = t[#t]
    if last and last[1] == kind and last[2] == tk[2] then
      last[3] = last[3] + tk[3]
    else
      t[#t + 1] = {kind, tk[2], tk[3]}
    end
  end
  granted = granted + add
end

-- QPS: max-min fair over the live leases' wants, at most what the others leave now.
local want_qps = tonumber(ARGV[6])
local wants = {want_qps}
local others_share = 0
for f, r in pairs(live) do
  if f ~= inst then
    wants[#wants + 1] = r.w
    others_share = others_share + r.s
  end
end
table.sort(wants)
local left, fair = qps_limit, qps_limit
for i, w in ipairs(wants) do
  fair = left / (#wants - i + 1)  -- the level, were every want from here on above it
  if w >= fair then break end
  left = left - w
end
local my_share = math.min(want_qps, fair, math.max(0, qps_limit - others_share))
local capped = (my_share < want_qps) and 1 or 0

redis.call('HSET', KEYS[10], inst, cjson.encode({
  i = id, s = my_share, w = want_qps, c = used, b = granted, t = t,
  e = store_ms + lease_ms, d = TODAY, cy = cycle_day}))
keep_hot(KEYS)

-- Meters the instance's requests need that are used up (hard stop: those are decided per
-- request, refused exactly there).
local used_up = {}
if ent.overage ~= 1 and ARGV[10] ~= '' then
  for need in string.gmatch(ARGV[10], '[^,]+') do
    local meter_held
    if need == 'capacity_bytes' then
      meter_held = gauge_left(KEYS[3], need)
    else
      local _
      _, _, meter_held = allocate({}, KEYS[3], KEYS[4], cycle_day, need, 0, reserved)
    end
    if meter_held <= 0 then used_up[#used_up + 1] = need end
  end
end

return {0, flags, string.format('%.3f', my_share), granted, qps_limit, quota,
        held, cycle_end_ms - now_ms,
        math.floor((cycle_end_ms - midnight_ms(cycle_day)) / 1000), lease_ms,
        table.concat(used_up, ','), bandwidth, qps_by, capped}
