-- One bounded batch of the retention sweep, as a single atomic step: up to ARGV[5] tasks whose
-- due time has passed. A finished task is deleted (its tombstone published like any change); a
-- tombstone is purged (the task then reads as never written), and the purged ids are published
-- in one message, for the instances to forget them. Any number of instances may sweep at once:
-- a task taken by one batch is no longer due for the next. (common.lua is in front of this text.)
--
-- KEYS[1] due (zset)   KEYS[2] change index   KEYS[3] global change counter   KEYS[4] epoch
-- KEYS[5] live task counter
-- ARGV[1] task hash key prefix   ARGV[2] history key prefix   ARGV[3] epoch to use if none is set
-- ARGV[4] channel   ARGV[5] batch size   ARGV[6] ms a tombstone is kept
-- ARGV[7] the terminal statuses, as ',completed,failed,'   ARGV[8] FINISHED_TASK_TTL in ms
-- Returns {tasks expired, tombstones purged, 1 if the batch was full else 0, unpublished
-- messages...}.
local store = {index = KEYS[2], seq = KEYS[3], epoch_key = KEYS[4], epoch = ARGV[3],
  channel = ARGV[4], live = KEYS[5], due = KEYS[1], messages = {}}
local now_ms = clock()
local ids = redis.call('ZRANGEBYSCORE', store.due, '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[5]))
local expired, purged = 0, {}
for _, id in ipairs(ids) do
  local task_key = ARGV[1] .. id
  local raw = redis.call('HGET', task_key, 'state')
  local state = raw and cjson.decode(raw)
  if not state or state.deleted == true then  -- a tombstone, expired already or now
    redis.call('DEL', task_key)
    redis.call('ZREM', store.index, id)
    redis.call('ZREM', store.due, id)
    purged[#purged + 1] = id
  elseif tonumber(ARGV[8]) > 0 and terminal(state.status, ARGV[7]) then
    bury(store, task_key, ARGV[2] .. id, id, state, tonumber(ARGV[6]))
    expired = expired + 1
  else  -- kept forever now (the configuration changed since its write)
    redis.call('ZREM', store.due, id)
  end
end
if #purged > 0 then
  local epoch = redis.call('GET', store.epoch_key) or store.epoch
  announce(store, cjson.encode({epoch = epoch, forget = purged}))
end
return reply(store, expired, #purged, #ids == tonumber(ARGV[5]) and 1 or 0)
