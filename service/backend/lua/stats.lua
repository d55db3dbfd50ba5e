-- Share one instance's stats record and read back every live instance's, in one atomic step.
-- A record lives ARGV[4] ms unless renewed: an instance that stops renewing disappears.
--
-- KEYS[1] instance index (zset: instance id -> expiry, ms on Redis' clock)
-- KEYS[2] live task counter (kept by write.lua, delete.lua, sweep.lua)
-- KEYS[3] change index (counts the live tasks of a store from before the counter: no tombstones)
-- ARGV[1] record key prefix   ARGV[2] instance id   ARGV[3] record   ARGV[4] lifetime in ms
-- Returns {live tasks in the store, record, remaining ms, record, remaining ms, ...}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[4])
redis.call('SET', ARGV[1] .. ARGV[2], ARGV[3], 'PX', ttl)
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)

local out = {tonumber(redis.call('GET', KEYS[2]) or redis.call('ZCARD', KEYS[3]))}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local key = ARGV[1] .. id
  local record = redis.call('GET', key)
  if record then
    out[#out + 1] = record
    out[#out + 1] = redis.call('PTTL', key)
  end
end
return out
