-- One token bucket (API.md rate limits), shared by every node: KEYS[1] the bucket,
-- ARGV[1] its refill rate per second, ARGV[2] its burst. Time is the Redis server's, so nodes
-- with skewed clocks agree. Answers 0 when a token was taken, else the microseconds until one
-- is back. The bucket expires once it would be full again: a full bucket and no bucket are the
-- same.
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local held = redis.call('HMGET', KEYS[1], 't', 'n')
local tokens = burst
if held[1] and held[2] then
  local elapsed_s = math.max(0, now_us - tonumber(held[1])) / 1000000
  tokens = math.min(burst, tonumber(held[2]) + elapsed_s * rate)
end
local wait_us = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_us = math.ceil((1 - tokens) / rate * 1000000)
end
redis.call('HSET', KEYS[1], 't', string.format('%d', now_us), 'n', string.format('%.6f', tokens))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return wait_us
