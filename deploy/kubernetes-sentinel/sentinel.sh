#!/bin/sh
# Writes this sentinel's configuration (Sentinel rewrites its file, so it
# lives on an emptyDir) monitoring the master the other sentinels name, or
# gewe-redis-0 on the very first start, then runs the sentinel.
set -eu
self="$(hostname).gewe-sentinel"
master=""
for i in 0 1 2; do
  peer="gewe-sentinel-$i.gewe-sentinel"
  [ "$peer" = "$self" ] && continue
  master=$(redis-cli -h "$peer" -p 26379 --raw \
    SENTINEL get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)
  [ -n "$master" ] && break
done
[ -n "$master" ] || master=gewe-redis-0.gewe-redis
cat > /data/sentinel.conf <<CONF
port 26379
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $self
sentinel monitor mymaster $master 6379 2
sentinel down-after-milliseconds mymaster 5000
sentinel failover-timeout mymaster 60000
sentinel parallel-syncs mymaster 1
CONF
exec redis-server /data/sentinel.conf --sentinel
