-- The outbox's steps, all in the `{outbox}` slot (see redis.rs "The outbox"). One push is one
-- entry of the stream KEYS[1], read by the consumer group ARGV[2]; its fields: `e` the push's
-- JSON (coupon, device_id, device), `a` attempts so far, `u` user, `c` campaign, `i` the
-- campaign's incarnation. A push waiting for a retry leaves the stream: it sits in the sorted set
-- KEYS[2] (member = the handle it was taken under, score = when it is due), its fields in the
-- hash KEYS[3], until a take moves it back into the stream as a new entry.
--
-- KEYS[1] stream, KEYS[2] delayed retries (due times), KEYS[3] delayed retries (fields),
-- KEYS[4] dead letters. The per-user index `kabao:{outbox}:u:<user>` (the user's handles, for
-- erasure) and the push counters `kabao:{outbox}:pushes:<campaign>:<incarnation>` are derived
-- from an entry's fields, in the same slot.
--
-- ARGV[1] the step, ARGV[2] the group, then per step:
--   take    ARGV[3] consumer, ARGV[4] now_ms, ARGV[5] lease_ms, ARGV[6] max, ARGV[7] '1' on the
--           consumer's first take in its process (what a previous process of that name left
--           pending is handed back at once)
--           -> {handle, fields, handle, fields, ...} (fields: flat field/value list)
--   retry   ARGV[3] handle, ARGV[4] attempts, ARGV[5] not_before_ms -> 1, or 0 if finished before
--   finish  ARGV[3] handle, ARGV[4] outcome (delivered | dead_token | failed | dropped),
--           ARGV[5] dead letter JSON (failed), ARGV[6] dead letters kept -> 1, or 0 if finished before
--   erase   ARGV[3] user -> 1
local STREAM, DUE, DELAYED, LETTERS = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, group = ARGV[1], ARGV[2]
local P = 'kabao:{outbox}:'
local function index_of(u) return P .. 'u:' .. u end
local function pushes_of(f) return P .. 'pushes:' .. f.c .. ':' .. f.i end

-- A flat {field, value, ...} list as a table.
local function fields_of(flat)
  local f = {}
  for k = 1, #flat, 2 do f[flat[k]] = flat[k + 1] end
  return f
end

-- The entry's fields, or nil when it is no longer in the stream (erased).
local function entry(handle)
  local found = redis.call('XRANGE', STREAM, handle, handle)
  if #found == 0 then return nil end
  return fields_of(found[1][2])
end

-- Acknowledges and removes a handle; true only for the first caller (the entry was pending).
local function settle(handle)
  local acked = redis.call('XACK', STREAM, group, handle) == 1
  redis.call('XDEL', STREAM, handle)
  return acked
end

-- One push fewer waiting for a retry.
local function unretry(pushes)
  if tonumber(redis.call('HGET', pushes, 'retrying') or '0') > 0 then
    redis.call('HINCRBY', pushes, 'retrying', -1)
  end
end

if op == 'take' then
  local consumer, now, lease, max = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
  -- Retries now due go back into the stream, as fresh entries under new handles.
  for _, handle in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now, 'LIMIT', 0, max)) do
    local raw = redis.call('HGET', DELAYED, handle)
    redis.call('ZREM', DUE, handle)
    redis.call('HDEL', DELAYED, handle)
    if raw then
      local f = cjson.decode(raw)
      local fresh = redis.call('XADD', STREAM, '*', 'e', f.e, 'a', f.a, 'u', f.u, 'c', f.c, 'i', f.i)
      redis.call('SREM', index_of(f.u), handle)
      redis.call('SADD', index_of(f.u), fresh)
    end
  end
  -- The group is made on first use (and again if the stream was lost).
  redis.pcall('XGROUP', 'CREATE', STREAM, group, '0', 'MKSTREAM')
  local out = {}
  local function hand_out(entries)
    for _, e in ipairs(entries) do
      if e[2] then
        out[#out + 1] = e[1]
        out[#out + 1] = e[2]
      else
        -- Pending but no longer in the stream (erased): nothing to deliver.
        redis.call('XACK', STREAM, group, e[1])
      end
    end
  end
  if ARGV[7] == '1' then
    local own = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max, 'STREAMS', STREAM, '0')
    if own then hand_out(own[1][2]) end
  end
  -- Entries whose consumer held them past the lease (it died, or hangs): taken over, oldest first.
  local room = max - #out / 2
  if room > 0 then
    hand_out(redis.call('XAUTOCLAIM', STREAM, group, consumer, lease, '0-0', 'COUNT', room)[2])
  end
  room = max - #out / 2
  if room > 0 then
    local read = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', room, 'STREAMS', STREAM, '>')
    if read then hand_out(read[1][2]) end
  end
  return out
end

if op == 'retry' then
  local handle = ARGV[3]
  local f = entry(handle)
  if not settle(handle) or not f then return 0 end
  if f.a == '0' then redis.call('HINCRBY', pushes_of(f), 'retrying', 1) end
  f.a = ARGV[4]
  redis.call('HSET', DELAYED, handle, cjson.encode(f))
  redis.call('ZADD', DUE, ARGV[5], handle)
  return 1
end

if op == 'finish' then
  local handle, outcome = ARGV[3], ARGV[4]
  local f = entry(handle)
  if not settle(handle) or not f then return 0 end
  redis.call('SREM', index_of(f.u), handle)
  local pushes = pushes_of(f)
  if f.a ~= '0' then unretry(pushes) end
  if outcome ~= 'dropped' then redis.call('HINCRBY', pushes, outcome, 1) end
  if outcome == 'failed' then
    redis.call('LPUSH', LETTERS, ARGV[5])
    redis.call('LTRIM', LETTERS, 0, tonumber(ARGV[6]) - 1)
  end
  return 1
end

if op == 'erase' then
  local u = ARGV[3]
  for _, handle in ipairs(redis.call('SMEMBERS', index_of(u))) do
    local f
    if redis.call('ZREM', DUE, handle) == 1 then
      local raw = redis.call('HGET', DELAYED, handle)
      if raw then f = cjson.decode(raw) end
      redis.call('HDEL', DELAYED, handle)
    else
      f = entry(handle)
      settle(handle)
    end
    -- A push waiting for a retry no longer is.
    if f and f.a ~= '0' then unretry(pushes_of(f)) end
  end
  redis.call('DEL', index_of(u))
  local letters = redis.call('LRANGE', LETTERS, 0, -1)
  local kept, dropped = {}, false
  for _, l in ipairs(letters) do
    if cjson.decode(l).entry.coupon.user_id == u then dropped = true else kept[#kept + 1] = l end
  end
  if dropped then
    redis.call('DEL', LETTERS)
    for _, l in ipairs(kept) do redis.call('RPUSH', LETTERS, l) end
  end
  return 1
end

return redis.error_reply('unknown outbox step ' .. tostring(op))
