--[[ bandwidth.lua — lease a slot of an environment's bandwidth, or give back a slot's unused tail.

Every instance shapes the environment's response bytes on one timeline kept here: a lease of
B bytes is the slot [start, start + B / rate), start = the later of now and the end of the last
slot leased. Slots follow each other, so the instances together send at most `rate` bytes per
second, whatever their number; time nobody leased is not saved up (no burst).

KEYS[1] bw     string "<end>:<at>": the end of the last slot leased and the store's time when
               it was written, µs since 2020-01-01 (store clock; a plain "<end>", as earlier
               versions wrote it, is read too)
ARGV[1] rate   bytes per second
ARGV[2] bytes  > 0: lease this many; < 0: give back -bytes from the end of the slot whose end
               is ARGV[3] (only while it is still the last one: nobody leased after it)
ARGV[3] end    (giving back) the slot's end, as this script returned it

Reply, lease:     {start, end, now} as strings of µs since 2020 (store clock)
Reply, give back: 1 given back, 0 too late (another slot follows it, or it has passed)
]]

local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1577836800) * 1000000 + tonumber(t[2])
local rate, bytes = tonumber(ARGV[1]), tonumber(ARGV[2])
local raw = redis.call('GET', KEYS[1])
local end_text = raw and (string.match(raw, '^([^:]+):') or raw)
local last = tonumber(end_text) or now
local at = raw and tonumber(string.match(raw, ':(.+)$') or '')
-- The store's clock stepped back (NTP, a failover to a node whose clock differs): the timeline
-- steps with it, keeping what was leased ahead of the time it was written, not the step's
-- length on top (which would hold every response of the environment for that long).
if at and now < at then last = last - (at - now) end
local nowtext = string.format('%.0f', now)
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
local ends = string.format('%.0f', last + bytes * 1000000 / rate)
redis.call('SET', KEYS[1], ends .. ':' .. nowtext,
           'PX', math.ceil((tonumber(ends) - now) / 1000) + 1000)
return {string.format('%.0f', last), ends, nowtext}
