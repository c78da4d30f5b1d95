-- Erases everything kept about one user (API.md DELETE /v1/users/{id}): devices, trigger state,
-- wallet, coupon records and their owner index, per-user issue times, pending pushes and dead
-- letters. Campaign counters keep counting the coupons. ARGV[1]: the user id.
local P = 'kabao:'
local function uk(u, s) return P .. '{u:' .. u .. '}:' .. s end
local u = ARGV[1]
for _, id in ipairs(redis.call('HKEYS', uk(u, 'coupons'))) do
  redis.call('HDEL', P .. 'coupon_owner', id)
end
for _, id in ipairs(redis.call('SMEMBERS', uk(u, 'outbox'))) do
  redis.call('ZREM', P .. 'outbox:due', id)
  redis.call('HDEL', P .. 'outbox:entries', id)
  redis.call('HDEL', P .. 'outbox:attempts', id)
  redis.call('SREM', P .. 'outbox:retrying', id)
end
redis.call('DEL', uk(u, 'devices'), uk(u, 'state'), uk(u, 'wallet'), uk(u, 'coupons'), uk(u, 'issued'), uk(u, 'outbox'))
local letters = redis.call('LRANGE', P .. 'dead_letters', 0, -1)
local kept, dropped = {}, false
for _, l in ipairs(letters) do
  if cjson.decode(l).entry.coupon.user_id == u then dropped = true else kept[#kept + 1] = l end
end
if dropped then
  redis.call('DEL', P .. 'dead_letters')
  for _, l in ipairs(kept) do redis.call('RPUSH', P .. 'dead_letters', l) end
end
return 1
