#!/usr/bin/env bash
# One extra RabbitMQ node (tls1@localhost) with only an AMQPS listener that requires a
# client certificate (mutual TLS), beside the machine's main broker rabbit@localhost.
#
# Usage: deploy/local-tls-broker.sh up DIR | down DIR | status DIR | url DIR
#
#   DIR must contain ca.pem, server.pem and server.key (PEM). The node's state
#   (config, copies of the certificates, mnesia, logs) lives in DIR/tls1-state;
#   `down DIR` stops the node and removes DIR/tls1-state, leaving the certificates.
#
# Environment (all optional):
#   TLS_PORT       AMQPS listener port on 127.0.0.1      (default 5771)
#   TLS_DIST_PORT  Erlang distribution port              (default 25771)
#   TLS_NODE       node name                             (default tls1@localhost)
#   STARTUP_TIMEOUT seconds to wait for the node          (default 120)
#
# The node has no plain AMQP listener (listeners.tcp = none) and uses
#   ssl_options.verify = verify_peer, ssl_options.fail_if_no_peer_cert = true.
# Log in with guest/guest over amqps (the guest user is restricted to loopback).
#
# Run as root (or as rabbitmq): Debian's wrappers re-exec rabbitmq-server/rabbitmqctl
# as the `rabbitmq` user, so the state dir is chowned to rabbitmq and, when DIR is not
# traversable by that user (e.g. a 0700 tempdir owned by root), DIR gets o+x (traverse
# only, no listing). The certificates are copied into the state dir for the same reason.
set -euo pipefail

TLS_PORT=${TLS_PORT:-5771}
TLS_DIST_PORT=${TLS_DIST_PORT:-25771}
TLS_NODE=${TLS_NODE:-tls1@localhost}
STARTUP_TIMEOUT=${STARTUP_TIMEOUT:-120}

# shellcheck source=lib/rabbitmq-node.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/rabbitmq-node.sh"

die() { echo "local-tls-broker: $*" >&2; exit 1; }
log() { echo "local-tls-broker: $*" >&2; }

usage() { echo "usage: $0 up|down|status|url DIR" >&2; exit 2; }

[ $# -eq 2 ] || usage
CMD=$1
DIR=$2
[ -d "$DIR" ] || die "no such directory: $DIR"
DIR=$(cd "$DIR" && pwd -P)   # absolute: the Debian wrappers cd to /var/lib/rabbitmq
STATE="$DIR/tls1-state"
# Where rabbit_node_start puts it (deploy/lib/rabbitmq-node.sh).
PID_FILE="$STATE/${TLS_NODE%@*}.pid"

case "$TLS_NODE" in
  rabbit@*) die "refusing to manage $TLS_NODE" ;;
esac

ctl() { rabbitmqctl -q -n "$TLS_NODE" "$@"; }
node_alive() { ctl ping >/dev/null 2>&1; }

url() { echo "amqps://guest:guest@localhost:${TLS_PORT}/%2f"; }

as_rabbitmq_can_read() {
  su rabbitmq -s /bin/sh -c "test -r '$1'" 2>/dev/null
}

cmd_up() {
  local f
  for f in ca.pem server.pem server.key; do
    [ -f "$DIR/$f" ] || die "missing $DIR/$f"
  done
  if node_alive; then
    log "$TLS_NODE already running"
    url
    return 0
  fi
  if ss -Hltn "sport = :$TLS_PORT" | grep -q .; then die "port $TLS_PORT already in use"; fi
  if ss -Hltn "sport = :$TLS_DIST_PORT" | grep -q .; then die "dist port $TLS_DIST_PORT already in use"; fi

  local t0=$SECONDS
  mkdir -p "$STATE/certs" "$STATE/mnesia" "$STATE/log"
  install -m 0644 "$DIR/ca.pem" "$STATE/certs/ca.pem"
  install -m 0644 "$DIR/server.pem" "$STATE/certs/server.pem"
  install -m 0600 "$DIR/server.key" "$STATE/certs/server.key"
  cat >"$STATE/rabbitmq.conf" <<EOF
listeners.tcp = none
listeners.ssl.local = 127.0.0.1:${TLS_PORT}
ssl_options.cacertfile = $STATE/certs/ca.pem
ssl_options.certfile = $STATE/certs/server.pem
ssl_options.keyfile = $STATE/certs/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
loopback_users = none
log.file.level = info
log.console = false
EOF
  echo '[].' >"$STATE/enabled_plugins"
  : >"$STATE/rabbitmq-env.conf"
  chown -R rabbitmq:rabbitmq "$STATE"
  if ! as_rabbitmq_can_read "$STATE/rabbitmq.conf"; then
    chmod o+x "$DIR"
    as_rabbitmq_can_read "$STATE/rabbitmq.conf" \
      || die "user rabbitmq cannot reach $STATE (check permissions of its parent dirs)"
  fi

  log "starting $TLS_NODE (amqps 127.0.0.1:$TLS_PORT, dist $TLS_DIST_PORT)"
  rabbit_node_start "$TLS_NODE" "$STATE" "$TLS_DIST_PORT" \
    || die "rabbitmq-server failed"

  local deadline=$((SECONDS + STARTUP_TIMEOUT))
  until node_alive; do
    if [ $SECONDS -ge $deadline ]; then
      tail -n 40 "$STATE/log/"*.log >&2 2>/dev/null || true
      die "$TLS_NODE did not come up"
    fi
    sleep 0.5
  done
  ctl await_startup --timeout "$STARTUP_TIMEOUT" >/dev/null \
    || { tail -n 40 "$STATE/log/"*.log >&2 2>/dev/null || true; die "$TLS_NODE failed to boot"; }
  # The listener must really be there (a bad cert/key makes it fail to start).
  ss -Hltn "sport = :$TLS_PORT" | grep -q . || die "no listener on $TLS_PORT; see $STATE/log"
  log "up in $((SECONDS - t0))s"
  url
}

cmd_down() {
  local pid
  if node_alive; then
    log "stopping $TLS_NODE"
    if [ -f "$PID_FILE" ]; then
      ctl stop "$PID_FILE" >/dev/null 2>&1 || true
    else
      ctl stop >/dev/null 2>&1 || true
    fi
  fi
  if [ -f "$PID_FILE" ]; then
    pid=$(cat "$PID_FILE" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null \
      && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$TLS_NODE"; then
      log "killing leftover $TLS_NODE (pid $pid)"
      kill "$pid" 2>/dev/null || true
    fi
  fi
  rm -rf -- "$STATE"
  log "down"
}

case "$CMD" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) node_alive || die "$TLS_NODE is not running"; rabbitmqctl -n "$TLS_NODE" status ;;
  url) url ;;
  *) usage ;;
esac
