-- The tasks changed after a cursor, read in one atomic step with the cursor they lead to, so no
-- change can fall between the list and the new cursor.
--
-- KEYS[1] change index (zset)   KEYS[2] global change counter   KEYS[3] epoch
-- ARGV[1] task hash key prefix   ARGV[2] client's epoch ('' = snapshot)   ARGV[3] client's seq
-- ARGV[4] epoch to use if none is set
-- Returns {epoch, seq, reset (0/1), state JSON, ...}, states in change order. A snapshot leaves
-- tombstones out; the changes after a cursor include them (deletions are changes).
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[3], epoch)
end
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local since = tonumber(ARGV[3])
local reset = ARGV[2] ~= epoch or since > seq

local ids
if reset then
  ids = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. since, '+inf')
end

local out = {epoch, seq, reset and 1 or 0}
for _, id in ipairs(ids) do
  local task = redis.call('HMGET', ARGV[1] .. id, 'state', 'deleted')
  if task[1] and not (reset and task[2]) then out[#out + 1] = task[1] end
end
return out
