-- Redeems a coupon exactly once. ARGV[1]: store identity; ARGV[2]: coupon id; ARGV[3]: merchant;
-- ARGV[4]: now_ms. Returns {'N'} unknown, {'R'} redeemed before, {'E'} expired, {'M'} another
-- merchant's, {'OK', the record}. Checked in that order (memory.rs).
local P = 'kabao:'
local function uk(u, s) return P .. '{u:' .. u .. '}:' .. s end
local function ck(c, s) return P .. '{c:' .. c .. '}:' .. s end
if redis.call('HGET', P .. 'identity', 'id') ~= ARGV[1] then
  return redis.error_reply('KABAO_LOST the store identity is missing or different')
end
local id = ARGV[2]
local u = redis.call('HGET', P .. 'coupon_owner', id)
if not u then return {'N'} end
local raw = redis.call('HGET', uk(u, 'coupons'), id)
if not raw then return {'N'} end
local inc, redeemed, cp = string.match(raw, '^([^|]*)|([^|]*)|(.*)$')
if redeemed ~= '' then return {'R'} end
local c = cjson.decode(cp)
if type(c.expires_at_ms) == 'number' and tonumber(ARGV[4]) >= c.expires_at_ms then return {'E'} end
if type(c.merchant_id) == 'string' and c.merchant_id ~= ARGV[3] then return {'M'} end
local record = inc .. '|' .. ARGV[4] .. '|' .. cp
redis.call('HSET', uk(u, 'coupons'), id, record)
local stats = ck(c.campaign_id, 'stats')
if redis.call('HGET', stats, 'inc') == inc then redis.call('HINCRBY', stats, 'redeemed', 1) end
return {'OK', record}
