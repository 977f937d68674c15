#!/usr/bin/env bash
# Local 3-node RabbitMQ cluster (c1@localhost, c2@localhost, c3@localhost) that runs
# beside the machine's main broker (rabbit@localhost on 5672/25672), for tests of
# multi-URL failover and quorum queues. No Docker needed.
#
# Usage: deploy/local-cluster.sh up|down|status|urls
#
# Environment (all optional):
#   CLUSTER_DIR      base dir for config/data/logs   (default /tmp/gewe-local-cluster)
#   C1_PORT..C3_PORT AMQP listener ports             (default 5701, 5702, 5703)
#   C1_DIST_PORT..C3_DIST_PORT Erlang distribution ports (default 25701, 25702, 25703)
#   CLUSTER_HOST     host used in the printed URLs   (default 127.0.0.1)
#   STARTUP_TIMEOUT  seconds to wait for each node   (default 120)
#
# Notes:
#   * Run as root (or as the rabbitmq user). Debian's /usr/sbin/rabbitmq-server and
#     rabbitmqctl wrappers re-exec as the `rabbitmq` user via `su`, keeping the
#     environment, with HOME=/var/lib/rabbitmq: all nodes (and the CLI) therefore share
#     the main node's Erlang cookie /var/lib/rabbitmq/.erlang.cookie. CLUSTER_DIR is
#     chowned to rabbitmq for that reason.
#   * The nodes only listen on 127.0.0.1; the guest user works from loopback anyway.
#   * rabbit@localhost is never stopped, reset or joined by this script.
set -euo pipefail

CLUSTER_DIR=${CLUSTER_DIR:-/tmp/gewe-local-cluster}
CLUSTER_HOST=${CLUSTER_HOST:-127.0.0.1}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-120}
NODES=(c1 c2 c3)
declare -A PORT=([c1]=${C1_PORT:-5701} [c2]=${C2_PORT:-5702} [c3]=${C3_PORT:-5703})
declare -A DIST=([c1]=${C1_DIST_PORT:-25701} [c2]=${C2_DIST_PORT:-25702} [c3]=${C3_DIST_PORT:-25703})
SEED=c1@localhost

# shellcheck source=lib/rabbitmq-node.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/rabbitmq-node.sh"

die() { echo "local-cluster: $*" >&2; exit 1; }
log() { echo "local-cluster: $*" >&2; }

# Absolute path: the Debian wrappers cd to /var/lib/rabbitmq before exec'ing.
case "$CLUSTER_DIR" in
  /*) ;;
  *) CLUSTER_DIR="$(pwd)/$CLUSTER_DIR" ;;
esac
[ "$CLUSTER_DIR" != "/" ] || die "refusing CLUSTER_DIR=/"

# rabbitmqctl against one of our nodes only. Output of the CLI goes to stdout.
ctl() {
  local node=$1; shift
  rabbitmqctl -q -n "$node@localhost" "$@"
}

# True when the Erlang node answers (not necessarily with the rabbit app running).
node_alive() { ctl "$1" ping >/dev/null 2>&1; }

# True when the rabbit application is running on the node.
app_running() {
  [ "$(ctl "$1" eval 'rabbit:is_running().' 2>/dev/null)" = "true" ]
}

# True when $1 already knows $SEED as a cluster member.
in_cluster_with_seed() {
  [ "$(ctl "$1" eval "lists:member('$SEED', rabbit_nodes:all())." 2>/dev/null)" = "true" ]
}

urls() {
  local out="" n
  for n in "${NODES[@]}"; do
    out+="${out:+,}amqp://guest:guest@${CLUSTER_HOST}:${PORT[$n]}/%2f"
  done
  echo "$out"
}

write_node_files() {
  local n=$1 d="$CLUSTER_DIR/$1"
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.local = 127.0.0.1:${PORT[$n]}
loopback_users = none
log.file.level = info
log.console = false
EOF
  # Empty plugin list: no management listener (15672) that could clash with anything.
  echo '[].' >"$d/enabled_plugins"
  # Own (empty) env file so /etc/rabbitmq/rabbitmq-env.conf (NODENAME=rabbit@localhost)
  # is not sourced by our nodes.
  : >"$d/rabbitmq-env.conf"
}

start_node() {
  local n=$1 d="$CLUSTER_DIR/$1"
  if node_alive "$n"; then
    # A node left with its app stopped (e.g. by an interrupted failover
    # test) would make await_startup wait for the whole timeout.
    if ! app_running "$n"; then
      log "$n@localhost is up with its app stopped; starting the app"
      ctl "$n" start_app >/dev/null
    else
      log "$n@localhost already running"
    fi
    return 0
  fi
  if ss -Hltn "sport = :${PORT[$n]}" | grep -q .; then
    die "port ${PORT[$n]} for $n is already in use"
  fi
  if ss -Hltn "sport = :${DIST[$n]}" | grep -q .; then
    die "dist port ${DIST[$n]} for $n is already in use"
  fi
  write_node_files "$n"
  chown -R rabbitmq:rabbitmq "$CLUSTER_DIR"
  log "starting $n@localhost (amqp ${PORT[$n]}, dist ${DIST[$n]})"
  rabbit_node_start "$n@localhost" "$d" "${DIST[$n]}" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="${PORT[$n]}" \
    || die "rabbitmq-server failed for $n"
}

await_node() {
  local n=$1 deadline=$((SECONDS + STARTUP_TIMEOUT))
  # await_startup needs the Erlang node to be reachable first.
  until node_alive "$n"; do
    [ $SECONDS -lt $deadline ] || { tail -n 30 "$CLUSTER_DIR/$n/log/"*.log >&2 || true; die "$n@localhost did not come up"; }
    sleep 0.5
  done
  ctl "$n" await_startup --timeout "$STARTUP_TIMEOUT" >/dev/null
}

join_node() {
  local n=$1
  if in_cluster_with_seed "$n"; then
    log "$n@localhost already clustered with $SEED"
    app_running "$n" || ctl "$n" start_app
    return 0
  fi
  log "joining $n@localhost to $SEED"
  # join_cluster logs harmless "[error] Failed to create a tracked connection table"
  # lines on 3.10; keep the CLI output in a file and show it only on failure.
  local out="$CLUSTER_DIR/$n/join.out"
  { ctl "$n" stop_app && ctl "$n" join_cluster "$SEED" && ctl "$n" start_app; } >"$out" 2>&1 \
    || { cat "$out" >&2; die "joining $n@localhost to $SEED failed"; }
}

running_count() {
  ctl c1 eval 'length(rabbit_nodes:all_running()).' 2>/dev/null || echo 0
}

cmd_up() {
  mkdir -p "$CLUSTER_DIR"
  if [ "$(running_count)" = "3" ] && node_alive c2 && node_alive c3; then
    log "already up"
    urls
    return 0
  fi
  local t0=$SECONDS n
  # Start all three at once (each boot is mostly waiting), then wait for each.
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in c2 c3; do join_node "$n"; done
  ctl c1 await_online_nodes 3 --timeout "$STARTUP_TIMEOUT" >/dev/null 2>&1 || true
  [ "$(running_count)" = "3" ] || die "cluster did not reach 3 running nodes"
  log "up in $((SECONDS - t0))s"
  urls
}

stop_node() {
  local n=$1 d="$CLUSTER_DIR/$1"
  node_alive "$n" || return 0
  log "stopping $n@localhost"
  if [ -f "$d/$n.pid" ]; then
    ctl "$n" stop "$d/$n.pid" >/dev/null 2>&1 || true
  else
    ctl "$n" stop >/dev/null 2>&1 || true
  fi
}

cmd_down() {
  local n d pid pids=()
  # The cluster is thrown away, so stop all nodes at once.
  for n in "${NODES[@]}"; do stop_node "$n" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || true; done
  for n in "${NODES[@]}"; do
    d="$CLUSTER_DIR/$n"
    # A node that no longer answers but whose OS process is still there.
    if [ -f "$d/$n.pid" ]; then
      pid=$(cat "$d/$n.pid" 2>/dev/null || true)
      if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
        && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$n@localhost"; then
        log "killing leftover $n@localhost (pid $pid)"
        kill "$pid" 2>/dev/null || true
      fi
    fi
  done
  rm -rf -- "$CLUSTER_DIR"
  log "down"
}

cmd_status() {
  node_alive c1 || die "c1@localhost is not running"
  rabbitmqctl -n "$SEED" cluster_status
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  urls) urls ;;
  *) echo "usage: $0 up|down|status|urls" >&2; exit 2 ;;
esac
