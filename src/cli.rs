//! Command-line interface (contract §1).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::simulator::Failure;

/// gewe-friend-worker: turns "add this group member as a friend" commands from
/// RabbitMQ into GeWe calls and publishes confirmed result events.
#[derive(Debug, Parser)]
#[command(name = "gewe-friend-worker", version, about)]
pub struct Cli {
    /// TOML configuration file (layered over the defaults, under GEWE_WORKER__* variables).
    #[arg(long, global = true, env = "GEWE_WORKER_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// What to do; `run` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker (the default).
    Run,
    /// Load and validate the configuration, print it with secrets redacted.
    CheckConfig,
    /// Publish one command; with --wait, print its result event.
    Publish(PublishArgs),
    /// A one-command tour: worker + in-process GeWe simulator + sample commands.
    Demo(DemoArgs),
    /// Run the GeWe simulator as a standalone HTTP server.
    SimulateGewe(SimulateArgs),
    /// List, pause and resume accounts through a worker's admin API.
    Accounts(AccountsArgs),
    /// List and replay dead letters through a worker's admin API.
    DeadLetters(DeadLettersArgs),
}

/// Where the admin API is (`accounts`, `dead-letters`).
#[derive(Debug, Args)]
pub struct AdminTarget {
    /// The worker's admin API, e.g. http://127.0.0.1:8090; admin.listen
    /// of the configuration when omitted. The token is admin.token
    /// (GEWE_WORKER__ADMIN__TOKEN or --config).
    #[arg(long, value_name = "URL", global = true)]
    pub admin_url: Option<String>,
}

/// `accounts` arguments.
#[derive(Debug, Args)]
pub struct AccountsArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// What to do.
    #[command(subcommand)]
    pub command: AccountsCommand,
}

/// `accounts` subcommands.
#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Every account seen in the last 7 days.
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause an account: its commands are deferred until resumed.
    Pause {
        /// The account's appId.
        app_id: String,
        /// For how long, e.g. 6h (until resumed when omitted).
        #[arg(long = "for", value_name = "DUR")]
        duration: Option<String>,
        /// Why, shown in the console.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Resume a paused account.
    Resume {
        /// The account's appId.
        app_id: String,
    },
}

/// `dead-letters` arguments.
#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    #[command(flatten)]
    pub target: AdminTarget,
    /// What to do.
    #[command(subcommand)]
    pub command: DeadLettersCommand,
}

/// `dead-letters` subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// The first dead letters, left in place.
    List {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move dead letters back to the command queue.
    #[command(group = clap::ArgGroup::new("which").required(true).args(["id", "all"]))]
    Replay {
        /// A dead letter's id (from `list`); repeat for more.
        #[arg(long = "id", value_name = "ID")]
        id: Vec<String>,
        /// All of them (up to --limit).
        #[arg(long)]
        all: bool,
        /// With --all: how many at most.
        #[arg(long, requires = "all")]
        limit: Option<usize>,
    },
}

/// `publish` arguments.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// GeWe device id of the WeChat account.
    #[arg(long)]
    pub app_id: String,
    /// Group id, e.g. 34757816141@chatroom.
    #[arg(long)]
    pub chatroom_id: String,
    /// wxid of the member to add.
    #[arg(long)]
    pub member_wxid: String,
    /// Greeting sent with the friend request.
    #[arg(long)]
    pub content: String,
    /// Idempotency key; a UUID when omitted.
    #[arg(long)]
    pub command_id: Option<String>,
    /// Wait up to SECONDS for the result event and print it as JSON.
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    pub wait: Option<Duration>,
}

/// `demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Give up if the results have not all arrived within this time.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `simulate-gewe` arguments.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Delay added to every response, e.g. 100ms.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Share of requests (0..=1) answered with HTTP 503.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub fail_rate: f64,
    /// Accept only this token (any non-empty token when omitted).
    #[arg(long, env = "GEWE_SIM_TOKEN")]
    pub token: Option<String>,
    /// Answer every request with this failure.
    #[arg(long, value_enum)]
    pub fail_with: Option<Failure>,
    /// Also play the member who accepts: after each success, POST GeWe's
    /// ModContacts callback carrying its v3 to URL (e.g. a worker's
    /// http://HOST:8081/gewe/callback?secret=S).
    #[arg(long, value_name = "URL")]
    pub callback_url: Option<url::Url>,
    /// Play WeChat's daily limit: after N successes for an appId in a day
    /// (Asia/Shanghai), answer WeChat's "too often" message.
    #[arg(long, value_name = "N")]
    pub daily_limit: Option<u32>,
    /// With --callback-url: time from a success to its callback.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = humantime::parse_duration)]
    pub accept_after: Duration,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v)),
        _ => humantime::parse_duration(s).map_err(|e| format!("not a number of seconds: {e}")),
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("must be a number between 0 and 1".to_owned()),
    }
}
