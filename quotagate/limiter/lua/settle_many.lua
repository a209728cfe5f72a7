--[[ settle_many.lua (in the function library only) — the settle.lua calls of several
environments whose keys this store node serves, in one call: what finished in one event-loop
iteration costs the node one call, however many environments it spread over.

Called with no KEYS (an environment's keys are in its own cluster slot: declared keys must
share one) and registered with the flag allow-cross-slot-keys: a cluster node then lets it
reach the keys of every slot it serves, and refuses, per command, a key it does not serve.

ARGV[1] the number of calls; then per call: the number of its KEYS, its KEYS (settle.lua's),
        the number of its ARGV, its ARGV (settle.lua's).

Each call runs as settle.lua would on its own, in order: same checks, same writes, same reply.
Reply: one reply per call, in order — settle.lua's {status, flags}, or
  {32, why}: this node does not serve its keys (a cluster slot moved since the caller's map
            was read): nothing of it was read or written; the caller sends it on its own;
  {33, why}: it failed with an error (what settle.lua wrote before the error stays, as for a
            call of its own that failed). The calls after it run all the same.
]]
local function op_settle_many(KEYS, ARGV)
  local calls = tonumber(ARGV[1])
  if not calls then return redis.error_reply('settle_many: ARGV[1] is not a count') end
  local replies, i = {}, 2
  for c = 1, calls do
    local k, a = {}, {}
    local nk = tonumber(ARGV[i])
    if not nk then return redis.error_reply('settle_many: bad KEYS count of call ' .. c) end
    for j = 1, nk do k[j] = ARGV[i + j] end
    i = i + nk + 1
    local na = tonumber(ARGV[i])
    if not na then return redis.error_reply('settle_many: bad ARGV count of call ' .. c) end
    for j = 1, na do a[j] = ARGV[i + j] end
    i = i + na + 1
    -- Every key of one call carries its environment's hash tag: one slot. Each key is asked
    -- for all the same: while that slot migrates, some of its keys may have left this node
    -- already (a single call's KEYS are checked before it runs; these are not).
    local away = nil
    for j = 1, nk do
      local here = redis.pcall('EXISTS', k[j])
      if type(here) == 'table' and here.err then away = here.err; break end
    end
    if away then
      replies[c] = {32, away}
    else
      local ok, reply = pcall(op_settle, k, a)
      if ok then
        replies[c] = reply
      else
        replies[c] = {33, type(reply) == 'table' and reply.err or tostring(reply)}
      end
    end
  end
  return replies
end
