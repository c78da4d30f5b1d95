-- A campaign write at a new store revision, logged in the change feed in the same step.
-- ARGV[1]: 'insert' | 'replace' | 'delete'; ARGV[2]: campaign id; ARGV[3]: the campaign's
-- document (JSON; '' for a delete); ARGV[4]: the document for the change log, or '' when it is
-- too large to keep there (followers then reload every campaign); ARGV[5]: log entries kept.
-- Returns the revision, or -1 (insert: the id is taken) / -2 (replace, delete: no such campaign).
local P = 'kabao:'
local function ck(c, s) return P .. '{c:' .. c .. '}:' .. s end
local op, id = ARGV[1], ARGV[2]
local def = ck(id, 'def')
local exists = redis.call('EXISTS', def) == 1
if op == 'insert' and exists then return -1 end
if op ~= 'insert' and not exists then return -2 end

local rev = redis.call('INCR', P .. 'campaign_rev')
local entry
if op == 'delete' then
  redis.call('DEL', def, ck(id, 'stats'))
  redis.call('ZREM', P .. 'campaigns', id)
  entry = '{"rev":' .. rev .. ',"op":"d","id":' .. cjson.encode(id) .. '}'
else
  redis.call('HSET', def, 'doc', ARGV[3], 'rev', rev)
  redis.call('ZADD', P .. 'campaigns', 0, id)
  if op == 'insert' then
    -- A new campaign, also under a reused id: counters start afresh, in a new incarnation.
    redis.call('DEL', ck(id, 'stats'))
    redis.call('HSET', ck(id, 'stats'), 'inc', redis.call('INCR', P .. 'incarnation'))
  end
  local doc = ARGV[4]
  if doc == '' then doc = 'null' end
  entry = '{"rev":' .. rev .. ',"op":"u","id":' .. cjson.encode(id) .. ',"doc":' .. doc .. '}'
end
redis.call('ZADD', P .. 'campaign_log', rev, entry)
redis.call('ZREMRANGEBYRANK', P .. 'campaign_log', 0, -(tonumber(ARGV[5]) + 1))
return rev
