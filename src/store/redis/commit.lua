-- One request's commit (see redis.rs "commit"): every user's version check, then every issue
-- request in (ts_ms, seq) order across users, each candidate through rule 4's store half in the
-- order of rules.rs, then the new trigger states. Nothing below writes before every read that can
-- fail has been done, so the script never stops half-way.
--
-- The arguments, positional (no payload to decode; see redis.rs `commit_arguments`):
--   ARGV[1] the store identity the node knows; ARGV[2] the number of users, n;
--   per user, n times: user id, expected version, new version, `1` and the new state's bytes or
--     `0` (state unchanged), keep-for ms;
--   then the issue requests in (ts_ms, seq) order across users, each: the user's index (1-based),
--     the request's index within that user's requests, ts_ms, daily cap, candidate count, and per
--     candidate: coupon id, campaign id, coupon JSON (stored as given), cooldown s, per_user_max,
--     total_max, audience tag count, the tags.
-- Versions are strings (u64; Lua numbers are doubles).
-- Globals used per candidate, as locals (a local is a register; a global, a table lookup).
local call, tonumber, format, A = redis.call, tonumber, string.format, ARGV
local P = 'kabao:'
local function uk(u, s) return P .. '{u:' .. u .. '}:' .. s end
local function ck(c, s) return P .. '{c:' .. c .. '}:' .. s end
local DAY_MS = 86400000
local OUTBOX = P .. '{outbox}:stream'

if call('HGET', P .. 'identity', 'id') ~= A[1] then
  return redis.error_reply('KABAO_LOST the store identity is missing or different')
end
local users = {}
local at = 3
for i = 1, tonumber(A[2]) do
  local c = {u = A[at], ev = A[at + 1], nv = A[at + 2]}
  if A[at + 3] == '1' then
    c.state = A[at + 4]
    at = at + 5
  else
    at = at + 4
  end
  c.keep = tonumber(A[at])
  at = at + 1
  users[i] = c
end

local accepted, results = {}, {}
for i, c in ipairs(users) do
  -- The state is one string, `<version>|<bytes>`.
  local cur = call('GET', uk(c.u, 'state'))
  local version, bytes = '0', nil
  if cur then
    local sep = string.find(cur, '|', 1, true)
    version, bytes = string.sub(cur, 1, sep - 1), string.sub(cur, sep + 1)
  end
  if version == c.ev then
    accepted[i] = true
  else
    accepted[i] = false
    if cur then results[i] = {0, version, bytes} else results[i] = {0} end
  end
end

-- The user's devices in id order, read once per user and request.
local device_cache = {}
local function devices(u)
  local list = device_cache[u]
  if list then return list end
  local flat = call('HGETALL', uk(u, 'devices'))
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

-- What the script reads of a campaign, once per call: its incarnation (false before its first
-- coupon) and its `issued` counter; `added` counts this call's coupons, written by one HINCRBY at
-- the end instead of one per coupon.
local campaigns = {}
local function campaign(c)
  local k = campaigns[c]
  if k then return k end
  local got = call('HMGET', ck(c, 'stats'), 'inc', 'issued')
  k = {inc = got[1], issued = tonumber(got[2] or '0'), added = 0}
  campaigns[c] = k
  return k
end

-- `issued_at_ms` of the campaign's coupons to the user, ascending, for the campaign's current
-- incarnation (a reused campaign id starts from none). They are the field `\1<campaign id>` of the
-- user's coupons hash (no id holds a control character), read with the "already issued" check in
-- one HMGET, once per user and campaign, then kept up to date by `record`.
local times_cache = {}
local function times_key(u, c) return u .. '\0' .. c end
local function parse_times(c, raw)
  local times = {}
  local inc = campaign(c).inc
  if inc and raw then
    local sep = string.find(raw, '|', 1, true)
    if string.sub(raw, 1, sep - 1) == inc then
      for t in string.gmatch(string.sub(raw, sep + 1), '[^,]+') do times[#times + 1] = tonumber(t) end
    end
  end
  return times
end

-- Rule 4's store half (rules.rs `refusal`): the refusal's code, or nil and the user's issue times
-- for the campaign (for `record`) when the coupon may issue.
local function refusal(u, r, k)
  local got = call('HMGET', uk(u, 'coupons'), k.id, '\1' .. k.c)
  if got[1] then return 'D' end
  local tk = times_key(u, k.c)
  local times = times_cache[tk]
  if not times then
    times = parse_times(k.c, got[2])
    times_cache[tk] = times
  end
  if #k.tags > 0 and not has_any_tag(u, k.tags) then return 'A' end
  if k.cd > 0 then
    local cd_ms = k.cd * 1000
    for _, t in ipairs(times) do
      if math.abs(r.ts - t) < cd_ms then return 'C' end
    end
  end
  if k.pum > 0 and #times >= k.pum then return 'P' end
  if k.tm > 0 then
    local camp = campaign(k.c)
    if camp.issued + camp.added >= k.tm then return 'T' end
  end
  if r.cap > 0 then
    local from = format('(%d', r.ts - DAY_MS)
    if call('ZCOUNT', uk(u, 'wallet'), from, format('%d', r.ts)) >= r.cap then return 'Y' end
  end
  return nil, times
end

-- Coupon id, owner pairs for the owner index, written together at the end.
local owners = {}

-- Records an allowed coupon: issue times, wallet, record, one push per device; the campaign's
-- counter and the owner index at the end of the call.
local function record(u, r, k, times)
  local camp = campaign(k.c)
  if not camp.inc then
    camp.inc = tostring(call('INCR', P .. 'incarnation'))
    call('HSET', ck(k.c, 'stats'), 'inc', camp.inc)
  end
  camp.added = camp.added + 1
  times[#times + 1] = r.ts
  table.sort(times)
  local parts = {}
  for i, t in ipairs(times) do parts[i] = format('%d', t) end
  call('HSET', uk(u, 'coupons'), k.id, camp.inc .. '||' .. k.cp, '\1' .. k.c, camp.inc .. '|' .. table.concat(parts, ','))
  call('ZADD', uk(u, 'wallet'), format('%d', r.ts), k.id)
  owners[#owners + 1] = k.id
  owners[#owners + 1] = u
  -- One push per device, into the outbox stream (fields: outbox.lua).
  for _, d in ipairs(devices(u)) do
    local push = '{"coupon":' .. k.cp .. ',"device_id":' .. cjson.encode(d.id) .. ',"device":' .. d.json .. '}'
    local handle = call('XADD', OUTBOX, '*', 'e', push, 'a', '0', 'u', u, 'c', k.c, 'i', camp.inc)
    call('SADD', P .. '{outbox}:u:' .. u, handle)
  end
end

-- A count or cap argument as a number; most are `0`, which needs no conversion.
local function count_of(arg)
  if arg == '0' then return 0 end
  return tonumber(arg)
end

local NO_TAGS = {}
local outcomes = {}
for i = 1, #users do outcomes[i] = {} end
local last = #A
while at <= last do
  local ci, ri = tonumber(A[at]), tonumber(A[at + 1])
  local r = {ts = tonumber(A[at + 2]), cap = count_of(A[at + 3])}
  local count = tonumber(A[at + 4])
  at = at + 5
  local decided = ''
  for _ = 1, count do
    local k = {id = A[at], c = A[at + 1], cp = A[at + 2], cd = count_of(A[at + 3]),
      pum = count_of(A[at + 4]), tm = count_of(A[at + 5]), tags = NO_TAGS}
    local tags = count_of(A[at + 6])
    if tags > 0 then
      k.tags = {}
      for t = 1, tags do k.tags[t] = A[at + 6 + t] end
    end
    at = at + 7 + tags
    if accepted[ci] then
      local o, times = refusal(users[ci].u, r, k)
      if not o then
        record(users[ci].u, r, k, times)
        o = 'I'
      end
      decided = decided .. o
    end
  end
  if accepted[ci] then
    outcomes[ci][ri] = decided
  end
end

for c, camp in pairs(campaigns) do
  if camp.added > 0 then call('HINCRBY', ck(c, 'stats'), 'issued', camp.added) end
end
-- In slices: Lua's unpack has a stack limit.
for from = 1, #owners, 1000 do
  call('HSET', P .. 'coupon_owner', unpack(owners, from, math.min(from + 999, #owners)))
end

for i, c in ipairs(users) do
  if accepted[i] then
    local version = c.ev
    if c.state then
      call('SET', uk(c.u, 'state'), c.nv .. '|' .. c.state, 'PX', format('%d', math.max(c.keep, 1)))
      version = c.nv
    end
    results[i] = {1, version, table.concat(outcomes[i], ',')}
  end
end
return results
