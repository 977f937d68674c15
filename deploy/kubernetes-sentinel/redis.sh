#!/bin/sh
# Starts this pod's Redis as a replica of the master the sentinels name.
# Only when no sentinel knows a master yet (the very first start) is pod 0
# the master: a pod 0 that restarts after a failover joins the new master
# instead of starting a second one.
set -eu
self="$(hostname).gewe-redis"
master=""
for i in 0 1 2; do
  master=$(redis-cli -h "gewe-sentinel-$i.gewe-sentinel" -p 26379 --raw \
    SENTINEL get-master-addr-by-name mymaster 2>/dev/null | head -n 1 || true)
  [ -n "$master" ] && break
done
set -- --appendonly yes --appendfsync everysec --save "" --dir /data \
  --replica-announce-ip "$self"
if [ -z "$master" ] && [ "$(hostname)" = gewe-redis-0 ]; then
  exec redis-server "$@"
fi
[ -n "$master" ] || master=gewe-redis-0.gewe-redis
if [ "$master" = "$self" ]; then
  exec redis-server "$@"
fi
exec redis-server "$@" --replicaof "$master" 6379
