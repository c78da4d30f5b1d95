-- The outbox's steps. The entries live in a hash by zero-padded sequence number (so ids sort in
-- issue order), their due times in a sorted set (0 = fresh; a lease or a retry moves it on).
-- ARGV[1]: 'take' (ARGV[2] now_ms, ARGV[3] lease_ms, ARGV[4] max) | 'retry' (ARGV[2] id,
-- ARGV[3] attempts, ARGV[4] not_before_ms, ARGV[5] campaign) | 'finish' (ARGV[2] id, ARGV[3]
-- campaign, ARGV[4] outcome: delivered | dead_token | failed | dropped, ARGV[5] user, ARGV[6]
-- device id, ARGV[7] the token pushed to, ARGV[8] dead letter JSON, ARGV[9] dead letters kept).
local P = 'kabao:'
local function uk(u, s) return P .. '{u:' .. u .. '}:' .. s end
local function ck(c, s) return P .. '{c:' .. c .. '}:' .. s end
local DUE, ENTRIES, ATTEMPTS, RETRYING = P .. 'outbox:due', P .. 'outbox:entries', P .. 'outbox:attempts', P .. 'outbox:retrying'
local op = ARGV[1]

if op == 'take' then
  local ids = redis.call('ZRANGEBYSCORE', DUE, '-inf', ARGV[2], 'LIMIT', 0, ARGV[4])
  local leased_until = string.format('%.17g', tonumber(ARGV[2]) + tonumber(ARGV[3]))
  local out = {}
  for _, id in ipairs(ids) do
    local entry = redis.call('HGET', ENTRIES, id)
    if entry then
      redis.call('ZADD', DUE, leased_until, id)
      out[#out + 1] = entry
      out[#out + 1] = redis.call('HGET', ATTEMPTS, id) or '0'
    else
      redis.call('ZREM', DUE, id)
    end
  end
  return out
end

if op == 'retry' then
  local id = ARGV[2]
  if not redis.call('ZSCORE', DUE, id) then return 0 end
  redis.call('ZADD', DUE, ARGV[4], id)
  redis.call('HSET', ATTEMPTS, id, ARGV[3])
  local stats = ck(ARGV[5], 'stats')
  if redis.call('SADD', RETRYING, id) == 1 and redis.call('EXISTS', stats) == 1 then
    redis.call('HINCRBY', stats, 'retrying', 1)
  end
  return 1
end

-- finish: once per entry (a second finish of the same entry finds it gone and counts nothing).
local id = ARGV[2]
if redis.call('ZREM', DUE, id) == 0 then return 0 end
redis.call('HDEL', ENTRIES, id)
redis.call('HDEL', ATTEMPTS, id)
redis.call('SREM', uk(ARGV[5], 'outbox'), id)
local was_retrying = redis.call('SREM', RETRYING, id) == 1
local stats = ck(ARGV[3], 'stats')
local outcome = ARGV[4]
if redis.call('EXISTS', stats) == 1 then
  if was_retrying and tonumber(redis.call('HGET', stats, 'retrying') or '0') > 0 then
    redis.call('HINCRBY', stats, 'retrying', -1)
  end
  if outcome ~= 'dropped' then redis.call('HINCRBY', stats, outcome, 1) end
end
if outcome == 'dead_token' then
  -- Only if the device still has the token that was found dead.
  local devices = uk(ARGV[5], 'devices')
  local current = redis.call('HGET', devices, ARGV[6])
  if current and cjson.decode(current).token == ARGV[7] then redis.call('HDEL', devices, ARGV[6]) end
elseif outcome == 'failed' then
  redis.call('LPUSH', P .. 'dead_letters', ARGV[8])
  redis.call('LTRIM', P .. 'dead_letters', 0, tonumber(ARGV[9]) - 1)
end
return 1
