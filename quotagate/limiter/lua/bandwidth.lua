--[[ bandwidth.lua — lease a slot of an environment's bandwidth, or give back a slot's unused tail.

Every instance shapes the environment's response bytes on one timeline kept here: a lease of
B bytes is the slot [start, start + B / rate), start = the later of now and the end of the last
slot leased. Slots follow each other, so the instances together send at most `rate` bytes per
second, whatever their number; time nobody leased is not saved up (no burst).

KEYS[1] bw     string "<end>:<at>": the end of the last slot leased and the store's time when
               it was written, µs since 2020-01-01 (store clock; a plain "<end>", as earlier
               versions wrote it, is read too)
KEYS[2] ent    (leasing; optional) the environment's snapshot (as in decide.lua): the rate in
               force is read there, at each lease, so a version changed, expired or renewed
               reaches responses already being sent at their next slot
ARGV[1] rate   bytes per second: the instance's (giving back; leasing without a snapshot)
ARGV[2] bytes  > 0: lease a slot of this many bytes at ARGV[1] (its length: what the instance
               asked for, sent at the rate in force); < 0: give back -bytes at ARGV[1] from
               the end of the slot whose end is ARGV[3] (only while it is still the last one:
               nobody leased after it)
ARGV[3] end    (giving back) the slot's end, as this script returned it
ARGV[4] mode   (leasing) the instance's "enforce" | "shadow" (the snapshot's mode wins)
ARGV[5] now_ms (leasing) the environment's calendar at this instant, ms since the epoch; "0"
               = the store's clock (as decide.lua)

Reply, lease:     {start, end, now, rate}: strings of µs since 2020 (store clock) and the rate
                  the slot was leased at (bytes per second); rate "0": the environment is not
                  shaped now (no version in force, or not enforcing) and nothing was leased
Reply, give back: 1 given back, 0 too late (another slot follows it, or it has passed)
]]

local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1577836800) * 1000000 + tonumber(t[2])
local rate, bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
-- A slot lasts what the instance asked for at the rate it knew (at most a second or so): the
-- rate in force (below) is what it sends at in it. A change never books the timeline for the
-- old request's bytes at the new rate (2.5 MB at 125,000 B/s would hold it for 20 s).
if not rate or rate <= 0 then  -- (a lease at no rate has no length: refused, nothing written)
  if bytes > 0 then return {'0', '0', '0', '0'} end
  return 0
end
local slot_us = bytes * 1000000 / rate
local raw = redis.call('GET', KEYS[1])
local end_text = raw and (string.match(raw, '^([^:]+):') or raw)
local last = tonumber(end_text) or now
local at = raw and tonumber(string.match(raw, ':(.+)$') or '')
-- The store's clock stepped back (NTP, a failover to a node whose clock differs): the timeline
-- steps with it, keeping what was leased ahead of the time it was written, not the step's
-- length on top (which would hold every response of the environment for that long).
if at and now < at then last = last - (at - now) end
local nowtext = string.format('%.0f', now)
if bytes > 0 and KEYS[2] then
  local ent = snapshot(KEYS[2])
  if ent then  -- (none: an environment the store lost; the instance's rate then)
    local at_ms = tonumber(ARGV[5]) or 0
    if at_ms <= 0 then at_ms = store_clock_ms() + EPOCH_2020_MS end
    calendar_at(ent, at_ms)
    local mode = ARGV[4]
    if ent.mode ~= '' then mode = ent.mode end
    rate = 0
    local gw = ent.gw
    if mode == 'enforce' and gw and TODAY >= gw.from then  -- as decide.lua tells it
      rate = gw.bps
      if gw.to ~= 0 and TODAY >= gw.to then rate = gw.bps_after end
    end
    if rate <= 0 then return {'0', '0', nowtext, '0'} end
  end
end
if bytes < 0 then
  if end_text ~= ARGV[3] then return 0 end
  local back = last + bytes * 1000000 / rate
  if back < now then back = now end
  if back >= last then return 0 end
  redis.call('SET', KEYS[1], string.format('%.0f', back) .. ':' .. nowtext,
             'PX', math.ceil((back - now) / 1000) + 1000)
  return 1
end
if last < now then last = now end
local ends = string.format('%.0f', last + slot_us)
redis.call('SET', KEYS[1], ends .. ':' .. nowtext,
           'PX', math.ceil((tonumber(ends) - now) / 1000) + 1000)
return {string.format('%.0f', last), ends, nowtext, string.format('%.0f', rate)}
