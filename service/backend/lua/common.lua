-- Shared by write.lua, delete.lua and sweep.lua, which redis.py loads with this text in front:
-- every one of them stamps, counts, stores and buries a task the same way.
--
-- A store table names the keys and arguments they share: index (change index, zset: task id ->
-- seq of its last change), seq (global change counter), epoch_key, epoch (to use if none is set),
-- channel ('' = publish nothing: the messages go back to the caller, which publishes them once
-- replicas have the change), live (counter of live tasks), due (zset: task id -> when a sweep is
-- to look at it, ms on Redis' clock: a finished task's expiry, or a tombstone's purge), and
-- messages (what was not published, for reply()).

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

-- Now on Redis' clock: milliseconds since the epoch, and the stamp of a write.
local function clock()
  local now = redis.call('TIME')
  local sec, usec = tonumber(now[1]), tonumber(now[2])
  return sec * 1000 + math.floor(usec / 1000), iso8601(sec, usec)
end

-- Live tasks in the store, the ones MAX_TASKS counts. The scripts keep the count; a store
-- written before the count existed has no tombstones, so its change index counts them.
local function live_tasks(store)
  local count = redis.call('GET', store.live)
  if count then return tonumber(count) end
  count = redis.call('ZCARD', store.index)
  redis.call('SET', store.live, count)
  return count
end

-- Publish a message on the store's channel, or keep it for the caller when it has none.
local function announce(store, message)
  if store.channel ~= '' then
    redis.call('PUBLISH', store.channel, message)
  else
    store.messages[#store.messages + 1] = message
  end
end

-- A script's reply: its own elements, then the messages it did not publish.
local function reply(store, ...)
  local elements = {...}
  for _, message in ipairs(store.messages) do
    elements[#elements + 1] = message
  end
  return elements
end

-- Store a task's new state as the next change: seq, change index, message. Returns its JSON.
local function commit(store, task_key, id, state)
  local epoch = redis.call('GET', store.epoch_key)
  if not epoch then
    epoch = store.epoch
    redis.call('SET', store.epoch_key, epoch)
  end
  local seq = redis.call('INCR', store.seq)
  local encoded = cjson.encode(state)
  redis.call('HSET', task_key, 'state', encoded, 'version', state.version, 'seq', seq)
  redis.call('ZADD', store.index, seq, id)
  announce(store, '{"epoch":"' .. epoch .. '","seq":' .. seq .. ',"state":' .. encoded .. '}')
  return encoded
end

-- Replace a live task by its tombstone (version + 1, deleted) and drop its history. The
-- tombstone lives tombstone_ms: its hash expires then, and the sweep takes it out of the index.
local function bury(store, task_key, history_key, id, state, tombstone_ms)
  local live = live_tasks(store)
  local now_ms, stamp = clock()
  local encoded = commit(store, task_key, id, {
    task = id, status = cjson.null, version = state.version + 1, updated_at = stamp,
    progress = cjson.null, message = cjson.null, deleted = true})
  redis.call('HSET', task_key, 'deleted', 1)
  redis.call('PEXPIRE', task_key, tombstone_ms)
  redis.call('DEL', history_key)
  redis.call('SET', store.live, live - 1)
  redis.call('ZADD', store.due, now_ms + tombstone_ms, id)
  return encoded
end

-- Idempotency-Key: the answer kept for `key` (a key name, '' for none) from the first request
-- made with it: {'replay', state JSON}, {'reused'} when that request was another (its
-- fingerprint differs), or nil when the key is new. A replay writes to the key (it counts the
-- replays): so a WAIT after it covers the kept answer too, which a WAIT after a script that
-- writes nothing would not.
local function recall_answer(key, fingerprint)
  if key == '' then return nil end
  local kept = redis.call('HMGET', key, 'fingerprint', 'state')
  if not kept[1] then return nil end
  if kept[1] ~= fingerprint then return {'reused'} end
  redis.call('HINCRBY', key, 'replays', 1)
  return {'replay', kept[2]}
end

-- Keep `encoded` as the answer to the request with `key` for ttl_ms (no key: nothing to keep).
local function keep_answer(key, fingerprint, encoded, ttl_ms)
  if key == '' then return end
  redis.call('HSET', key, 'fingerprint', fingerprint, 'state', encoded)
  redis.call('PEXPIRE', key, ttl_ms)
end

-- Whether status is in the terminal ones, given as ',completed,failed,'.
local function terminal(status, statuses)
  return status ~= cjson.null and string.find(statuses, ',' .. status .. ',', 1, true) ~= nil
end

-- ---------------------------------------------------------------------------------------------
