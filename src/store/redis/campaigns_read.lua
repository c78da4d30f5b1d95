-- Campaigns read in one step. ARGV[1]: 'all' (every campaign, with the store revision they are
-- complete up to) | 'page' (ARGV[2]: exclusive lower bound or '', ARGV[3]: limit) | 'changes'
-- (ARGV[2]: since). Returns {revision, doc1, rev1, doc2, rev2, ...} for 'all' and 'page';
-- {revision, oldest logged revision or -1, entry, ...} for 'changes'.
local P = 'kabao:'
local function ck(c, s) return P .. '{c:' .. c .. '}:' .. s end
local revision = tonumber(redis.call('GET', P .. 'campaign_rev') or '0')
local out = {revision}
if ARGV[1] == 'changes' then
  local oldest = redis.call('ZRANGE', P .. 'campaign_log', 0, 0, 'WITHSCORES')
  out[2] = oldest[2] and tonumber(oldest[2]) or -1
  local entries = redis.call('ZRANGEBYSCORE', P .. 'campaign_log', '(' .. ARGV[2], '+inf')
  for _, e in ipairs(entries) do out[#out + 1] = e end
  return out
end
local ids
if ARGV[1] == 'all' then
  ids = redis.call('ZRANGE', P .. 'campaigns', 0, -1)
else
  local from = '-'
  if ARGV[2] ~= '' then from = '(' .. ARGV[2] end
  ids = redis.call('ZRANGEBYLEX', P .. 'campaigns', from, '+', 'LIMIT', 0, ARGV[3])
end
for _, id in ipairs(ids) do
  local d = redis.call('HMGET', ck(id, 'def'), 'doc', 'rev')
  if d[1] then
    out[#out + 1] = d[1]
    out[#out + 1] = d[2]
  end
end
return out
