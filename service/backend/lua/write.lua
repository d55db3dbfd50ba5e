-- Apply one update to one task as a single atomic step: check the expected version, bump the
-- version, store the state, record the change in the change index and in the task's history,
-- PUBLISH it. Nothing can see the new state without its message being on its way (nor without
-- its history entry), and two writers never share a version.
--
-- KEYS[1] task hash   KEYS[2] change index (zset: task id -> seq of its last change)
-- KEYS[3] global change counter   KEYS[4] epoch   KEYS[5] task history (list, newest first)
-- ARGV[1] task id   ARGV[2] initial status   ARGV[3] expected version ('' = any)
-- ARGV[4] epoch to use if none is set   ARGV[5] channel ('' = publish nothing: the caller
-- publishes the returned message once replicas have the write)
-- ARGV[6..11] (mode, value) for status, progress, message; mode is keep | set | null
-- ARGV[12] the most tasks the store may hold
-- ARGV[13] history entries kept per task (0: none)   ARGV[14] who writes (token subject, '' = none)
-- Returns {'ok', previous status, new state JSON, message}, {'conflict', current state JSON} or
-- {'task_limit'} (the write would create a task beyond ARGV[12]).

-- 2026-11-26T03:20:25.029Z from Redis' own clock, so every instance stamps alike.
-- Civil-from-days after Howard Hinnant's algorithm (Lua here has no os.date).
local function iso8601(sec, usec)
  local days = math.floor(sec / 86400)
  local rem = sec - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', year, month, day,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, math.floor(usec / 1000))
end

local raw = redis.call('HGET', KEYS[1], 'state')
local state
if raw then
  state = cjson.decode(raw)
else
  state = {task = ARGV[1], status = ARGV[2], version = 0, updated_at = cjson.null,
           progress = cjson.null, message = cjson.null}
end

if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= state.version then
  return {'conflict', cjson.encode(state)}
end
if not raw and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[12]) then
  return {'task_limit'}
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
local now = redis.call('TIME')
state.updated_at = iso8601(tonumber(now[1]), tonumber(now[2]))

local epoch = redis.call('GET', KEYS[4])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[4], epoch)
end
local seq = redis.call('INCR', KEYS[3])
local encoded = cjson.encode(state)
redis.call('HSET', KEYS[1], 'state', encoded, 'version', state.version, 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
local keep = tonumber(ARGV[13])
if keep > 0 then
  local subject = cjson.null
  if ARGV[14] ~= '' then subject = ARGV[14] end
  redis.call('LPUSH', KEYS[5], cjson.encode({
    version = state.version, status = state.status, progress = state.progress,
    message = state.message, updated_at = state.updated_at, subject = subject}))
  redis.call('LTRIM', KEYS[5], 0, keep - 1)
end
local message = '{"epoch":"' .. epoch .. '","seq":' .. seq .. ',"state":' .. encoded .. '}'
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], message)
end
return {'ok', previous_status, encoded, message}
