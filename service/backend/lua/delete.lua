-- Delete one task as a single atomic step: check that it lives and its expected version, then
-- replace it by its tombstone (version + 1), which is published like any change.
-- (common.lua is in front of this text.)
--
-- KEYS[1] task hash   KEYS[2] change index   KEYS[3] global change counter   KEYS[4] epoch
-- KEYS[5] task history   KEYS[6] live task counter   KEYS[7] due (zset)
-- ARGV[1] task id   ARGV[2] expected version ('' = any)   ARGV[3] epoch to use if none is set
-- ARGV[4] channel ('' = the caller publishes)   ARGV[5] ms the tombstone is kept
-- ARGV[6] Idempotency-Key's key name ('' = none)   ARGV[7] the request's fingerprint
-- ARGV[8] ms the answer is kept for the key
-- Returns {'ok', tombstone JSON, unpublished messages...}, {'replay', the first answer's
-- tombstone JSON}, {'reused'}, {'not_found'} (never written, or deleted) or
-- {'conflict', current state JSON}.
local store = {index = KEYS[2], seq = KEYS[3], epoch_key = KEYS[4], epoch = ARGV[3],
  channel = ARGV[4], live = KEYS[6], due = KEYS[7], messages = {}}

local answered = recall_answer(ARGV[6], ARGV[7])
if answered then return answered end

local raw = redis.call('HGET', KEYS[1], 'state')
if not raw then
  return {'not_found'}
end
local state = cjson.decode(raw)
if state.deleted == true then
  return {'not_found'}
end
if ARGV[2] ~= '' and tonumber(ARGV[2]) ~= state.version then
  return {'conflict', raw}
end
local tombstone = bury(store, KEYS[1], KEYS[5], ARGV[1], state, tonumber(ARGV[5]))
keep_answer(ARGV[6], ARGV[7], tombstone, tonumber(ARGV[8]))
return reply(store, 'ok', tombstone)
