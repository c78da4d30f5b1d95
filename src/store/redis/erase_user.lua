-- Erases everything kept about one user (API.md DELETE /v1/users/{id}): devices, trigger state,
-- wallet, coupon records and their owner index, per-user issue times (in the coupons hash). Campaign counters keep
-- counting the coupons. Pending pushes and dead letters live in the outbox's slot: outbox.lua
-- `erase`, pipelined after this step. ARGV[1]: the user id.
local P = 'kabao:'
local function uk(u, s) return P .. '{u:' .. u .. '}:' .. s end
local u = ARGV[1]
for _, id in ipairs(redis.call('HKEYS', uk(u, 'coupons'))) do
  -- Fields starting with \1 are the user's issue times (commit.lua), not coupons.
  if string.byte(id, 1) ~= 1 then redis.call('HDEL', P .. 'coupon_owner', id) end
end
redis.call('DEL', uk(u, 'devices'), uk(u, 'state'), uk(u, 'wallet'), uk(u, 'coupons'))
return 1
