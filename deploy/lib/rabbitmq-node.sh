# Sourced by deploy/local-cluster.sh and deploy/local-tls-broker.sh: how one
# extra RabbitMQ node is started beside rabbit@localhost with all its state
# (config, data, logs, expanded plugins, pid file) in one directory.

# rabbit_node_start NODE DIR DIST_PORT [VAR=value ...]
#   Starts NODE (name@localhost) detached. DIR holds rabbitmq.conf,
#   advanced.config, rabbitmq-env.conf and enabled_plugins, and receives
#   mnesia/, log/, start.out and the pid file. Erlang distribution and epmd
#   stay on 127.0.0.1 (DIST_PORT). Extra VAR=value assignments (such as
#   RABBITMQ_NODE_PORT) are passed to rabbitmq-server too. Fails, after
#   printing start.out, when rabbitmq-server does.
rabbit_node_start() {
  local node=$1 dir=$2 dist=$3
  shift 3
  env "$@" \
    RABBITMQ_NODENAME="$node" \
    RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_PLUGINS_EXPAND_DIR="$dir/mnesia/plugins-expand" \
    RABBITMQ_PID_FILE="$dir/${node%@*}.pid" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    rabbitmq-server -detached >"$dir/start.out" 2>&1 \
    || { cat "$dir/start.out" >&2; return 1; }
}
