-- A waiter leaves its lane's queue: admitted or given up.
-- KEYS: the lane's waiters, their heartbeats, the lower lanes' starvation credit. ARGV:
-- waiter id, admitted (1/0), it overtook a higher lane (1/0), starvation share, credit ttl ms.
-- Every admission while others wait adds the share to the credit (at most a whole one); an
-- overtaking one spends a whole credit. Uncontended admissions leave no key behind. Returns
-- the credit.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local credit = tonumber(redis.call('GET', KEYS[3])) or 0
if ARGV[2] == '1' and (ARGV[3] == '1' or redis.call('EXISTS', KEYS[1]) == 1) then
  credit = math.min(1, credit + tonumber(ARGV[4]))
  if ARGV[3] == '1' then credit = credit - 1 end
  redis.call('SET', KEYS[3], string.format('%.6f', credit), 'PX', tonumber(ARGV[5]))
end
return string.format('%.6f', credit)
