--[[ renew.lua — one instance renews the leases of all its slots in a batch of environments.

For every environment e (in order) KEYS holds three keys: ent, slots, lease (as in decide.lua).
ARGV[1] instance  the renewing instance
ARGV[2] lease_ms  hold the slots this long from now (store clock); "0" = give them all back
                  (every slot of the instance in these environments, listed or not)
ARGV[3] now_ms    calendar clock, ms since the epoch; "0" = the store's clock
then per environment: k, followed by k (slot, count) pairs: what the instance holds now.

Counts are absolute: a renewal restores what the store lost (a restart, a lease reaped while
the instance could not reach the store) and forgets what it holds no more. A slot not listed
is left as it is. Dead instances' slots are reaped on the way.

Reply: one status per environment: 0 active, 3 isolated, 4 released, 5 not started, 7 no
snapshot (unknown, or the store lost it: the gateway writes the file's again).
]]

local store_ms = store_clock_ms()
local inst, lease_ms = ARGV[1], tonumber(ARGV[2])
local now_ms = tonumber(ARGV[3])
if now_ms <= 0 then now_ms = store_ms + EPOCH_2020_MS end

local statuses = {}
local a = 4
for e = 0, #KEYS / 3 - 1 do
  local ent_key, slots_key, lease_key = KEYS[3 * e + 1], KEYS[3 * e + 2], KEYS[3 * e + 3]
  reap(slots_key, lease_key, store_ms)
  local k = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, k do
    set_held(slots_key, inst, ARGV[a], lease_ms > 0 and tonumber(ARGV[a + 1]) or 0)
    a = a + 2
  end
  if lease_ms > 0 then
    hold_lease(slots_key, lease_key, inst, store_ms, lease_ms, true)
  else
    -- Given back: end the lease now and reap, so no field of this instance outlives it.
    redis.call('ZADD', lease_key, 0, inst)
    reap(slots_key, lease_key, store_ms)
  end
  local ent = snapshot(ent_key)
  if ent then
    calendar_at(ent, now_ms)
    statuses[#statuses + 1] = lifecycle()
  else
    statuses[#statuses + 1] = 7
  end
end
return statuses
