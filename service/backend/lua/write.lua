-- Apply one update to one task as a single atomic step: check the expected version, bump the
-- version, store the state, record the change in the change index and in the task's history,
-- PUBLISH it, and set (or clear) the task's expiry. Nothing can see the new state without its
-- message being on its way (nor without its history entry), and two writers never share a
-- version. A write to a tombstone creates the task anew, continuing from the tombstone's version.
-- (common.lua is in front of this text.)
--
-- KEYS[1] task hash   KEYS[2] change index   KEYS[3] global change counter   KEYS[4] epoch
-- KEYS[5] task history (list, newest first)   KEYS[6] live task counter   KEYS[7] due (zset)
-- ARGV[1] task id   ARGV[2] initial status   ARGV[3] expected version ('' = any)
-- ARGV[4] epoch to use if none is set   ARGV[5] channel ('' = the caller publishes)
-- ARGV[6..11] (mode, value) for status, progress, message; mode is keep | set | null
-- ARGV[12] the most live tasks the store may hold
-- ARGV[13] history entries kept per task (0: none)   ARGV[14] who writes (token subject, '' = none)
-- ARGV[15] ms a finished task is kept after this write (0: forever)
-- ARGV[16] the terminal statuses, as ',completed,failed,'
-- ARGV[17] Idempotency-Key's key name ('' = none)   ARGV[18] the request's fingerprint
-- ARGV[19] ms the answer is kept for the key
-- Returns {'ok', previous status, new state JSON, unpublished messages...},
-- {'conflict', current state JSON}, {'replay', the first answer's state JSON}, {'reused'} or
-- {'task_limit'} (the write would create a task beyond ARGV[12]).
local store = {index = KEYS[2], seq = KEYS[3], epoch_key = KEYS[4], epoch = ARGV[4],
  channel = ARGV[5], live = KEYS[6], due = KEYS[7], messages = {}}

local answered = recall_answer(ARGV[17], ARGV[18])
if answered then return answered end

local raw = redis.call('HGET', KEYS[1], 'state')
local state
if raw then
  state = cjson.decode(raw)
else
  state = {task = ARGV[1], status = ARGV[2], version = 0}
end

if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= state.version then
  return {'conflict', raw or cjson.encode({task = ARGV[1], status = ARGV[2], version = 0,
    updated_at = cjson.null, progress = cjson.null, message = cjson.null})}
end
local created = not raw or state.deleted == true
if created and live_tasks(store) >= tonumber(ARGV[12]) then
  return {'task_limit'}
end
if created then  -- the state of a task never written, at the tombstone's version if any
  state = {task = ARGV[1], status = ARGV[2], version = state.version, updated_at = cjson.null,
    progress = cjson.null, message = cjson.null}
end

local previous_status = state.status
local function apply(field, mode, value, as_number)
  if mode == 'set' then
    if as_number then state[field] = tonumber(value) else state[field] = value end
  elseif mode == 'null' then
    state[field] = cjson.null
  end
end
apply('status', ARGV[6], ARGV[7], false)
apply('progress', ARGV[8], ARGV[9], true)
apply('message', ARGV[10], ARGV[11], false)

state.version = state.version + 1
local now_ms
now_ms, state.updated_at = clock()
if created then
  redis.call('INCR', store.live)
  if raw then  -- a tombstone: the task lives again
    redis.call('HDEL', KEYS[1], 'deleted')
    redis.call('PERSIST', KEYS[1])
  end
end
local encoded = commit(store, KEYS[1], ARGV[1], state)
local keep_for = tonumber(ARGV[15])
if keep_for > 0 and terminal(state.status, ARGV[16]) then
  redis.call('ZADD', store.due, now_ms + keep_for, ARGV[1])
else
  redis.call('ZREM', store.due, ARGV[1])
end
local keep = tonumber(ARGV[13])
if keep > 0 then
  local subject = cjson.null
  if ARGV[14] ~= '' then subject = ARGV[14] end
  redis.call('LPUSH', KEYS[5], cjson.encode({
    version = state.version, status = state.status, progress = state.progress,
    message = state.message, updated_at = state.updated_at, subject = subject}))
  redis.call('LTRIM', KEYS[5], 0, keep - 1)
end
keep_answer(ARGV[17], ARGV[18], encoded, tonumber(ARGV[19]))
return reply(store, 'ok', previous_status, encoded)
