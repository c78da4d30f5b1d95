-- One request's commit (see redis.rs "commit"): every user's version check, then every issue
-- request in (ts_ms, seq) order across users, each candidate through rule 4's store half in the
-- order of rules.rs, then the new trigger states. Nothing below writes before every read that can
-- fail has been done, so the script never stops half-way.
--
-- ARGV[1]: the store identity the node knows; ARGV[2]: the payload (JSON, see redis.rs
-- `CommitPayload`); ARGV[3..]: the new trigger states' bytes (referenced by index from the payload).
local P = 'kabao:'
local function uk(u, s) return P .. '{u:' .. u .. '}:' .. s end
local function ck(c, s) return P .. '{c:' .. c .. '}:' .. s end
local DAY_MS = 86400000
local OUTBOX = P .. '{outbox}:stream'

if redis.call('HGET', P .. 'identity', 'id') ~= ARGV[1] then
  return redis.error_reply('KABAO_LOST the store identity is missing or different')
end
local p = cjson.decode(ARGV[2])
local commits = p.commits

local accepted, results = {}, {}
for i, c in ipairs(commits) do
  local cur = redis.call('HMGET', uk(c.u, 'state'), 'v', 'b')
  if (cur[1] or '0') == c.ev then
    accepted[i] = true
  else
    accepted[i] = false
    if cur[1] then results[i] = {0, cur[1], cur[2]} else results[i] = {0} end
  end
end

-- The user's devices in id order, read once per user and request.
local device_cache = {}
local function devices(u)
  local list = device_cache[u]
  if list then return list end
  local flat = redis.call('HGETALL', uk(u, 'devices'))
  list = {}
  for k = 1, #flat, 2 do list[#list + 1] = {id = flat[k], json = flat[k + 1]} end
  table.sort(list, function(a, b) return a.id < b.id end)
  device_cache[u] = list
  return list
end

local function has_any_tag(u, wanted)
  for _, d in ipairs(devices(u)) do
    local tags = cjson.decode(d.json).tags
    if type(tags) == 'table' then
      for _, t in ipairs(tags) do
        for _, w in ipairs(wanted) do
          if t == w then return true end
        end
      end
    end
  end
  return false
end

-- `issued_at_ms` of the campaign's coupons to the user, ascending, for the campaign's current
-- incarnation (a reused campaign id starts from none).
local function issue_times(u, c)
  local inc = redis.call('HGET', ck(c, 'stats'), 'inc')
  if not inc then return {} end
  local raw = redis.call('HGET', uk(u, 'issued'), c)
  if not raw then return {} end
  local sep = string.find(raw, '|', 1, true)
  if string.sub(raw, 1, sep - 1) ~= inc then return {} end
  local times = {}
  for t in string.gmatch(string.sub(raw, sep + 1), '[^,]+') do times[#times + 1] = tonumber(t) end
  return times
end

-- Rule 4's store half (rules.rs `refusal`); nil = may issue.
local function refusal(u, r, k)
  if redis.call('HEXISTS', uk(u, 'coupons'), k.id) == 1 then return 'D' end
  if #k.tags > 0 and not has_any_tag(u, k.tags) then return 'A' end
  if k.cd > 0 or k.pum > 0 then
    local times = issue_times(u, k.c)
    if k.cd > 0 then
      local cd_ms = k.cd * 1000
      for _, t in ipairs(times) do
        if math.abs(r.ts - t) < cd_ms then return 'C' end
      end
    end
    if k.pum > 0 and #times >= k.pum then return 'P' end
  end
  if k.tm > 0 then
    local issued = tonumber(redis.call('HGET', ck(k.c, 'stats'), 'issued') or '0')
    if issued >= k.tm then return 'T' end
  end
  if r.cap > 0 then
    local from = string.format('(%d', r.ts - DAY_MS)
    if redis.call('ZCOUNT', uk(u, 'wallet'), from, string.format('%d', r.ts)) >= r.cap then return 'Y' end
  end
  return nil
end

-- Records an allowed coupon: counters, issue times, wallet, record, owner index, one push per device.
local function record(u, r, k)
  local sk = ck(k.c, 'stats')
  local inc = redis.call('HGET', sk, 'inc')
  if not inc then
    inc = tostring(redis.call('INCR', P .. 'incarnation'))
    redis.call('HSET', sk, 'inc', inc)
  end
  redis.call('HINCRBY', sk, 'issued', 1)
  local times = issue_times(u, k.c)
  times[#times + 1] = r.ts
  table.sort(times)
  local parts = {}
  for i, t in ipairs(times) do parts[i] = string.format('%d', t) end
  redis.call('HSET', uk(u, 'issued'), k.c, inc .. '|' .. table.concat(parts, ','))
  redis.call('ZADD', uk(u, 'wallet'), string.format('%d', r.ts), k.id)
  redis.call('HSET', uk(u, 'coupons'), k.id, inc .. '||' .. k.cp)
  redis.call('HSET', P .. 'coupon_owner', k.id, u)
  -- One push per device, into the outbox stream (fields: outbox.lua).
  for _, d in ipairs(devices(u)) do
    local push = '{"coupon":' .. k.cp .. ',"device_id":' .. cjson.encode(d.id) .. ',"device":' .. d.json .. '}'
    local handle = redis.call('XADD', OUTBOX, '*', 'e', push, 'a', '0', 'u', u, 'c', k.c, 'i', inc)
    redis.call('SADD', P .. '{outbox}:u:' .. u, handle)
  end
end

local outcomes = {}
for i = 1, #commits do outcomes[i] = {} end
for _, at in ipairs(p.order) do
  local ci, ri = at[1], at[2]
  if accepted[ci] then
    local u = commits[ci].u
    local r = commits[ci].is[ri]
    local decided = {}
    for _, k in ipairs(r.cs) do
      local o = refusal(u, r, k)
      if not o then
        record(u, r, k)
        o = 'I'
      end
      decided[#decided + 1] = o
    end
    outcomes[ci][ri] = table.concat(decided)
  end
end

for i, c in ipairs(commits) do
  if accepted[i] then
    local version = c.ev
    if c.st > 0 then
      local key = uk(c.u, 'state')
      redis.call('HSET', key, 'v', c.nv, 'b', ARGV[2 + c.st])
      redis.call('PEXPIRE', key, string.format('%d', math.max(c.keep, 1)))
      version = c.nv
    end
    results[i] = {1, version, table.concat(outcomes[i], ',')}
  end
end
return results
