//! The program: parse the command line, load configuration, dispatch to a
//! subcommand. It lives in the library so that the binary is one call:
//! the generic code it instantiates (the runtime, the subcommands'
//! futures) is compiled here once rather than again in `src/main.rs`, which
//! made a fresh release build 15 s longer on two cores (BENCHMARKS.md).

use std::process::ExitCode;

use crate::{
    app::{self, Application},
    cli::{Cli, Command, PublishArgs},
    command_publisher::{CommandPublisher, Listen, NewCommand},
    config::Settings,
    console_cli, demo,
    redact::Redactor,
    resources, simulator, telemetry,
};
use anyhow::Context;
use clap::Parser;

/// Runs the command line's subcommand; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    // Everything logged from here on is cleaned of every configured secret,
    // whichever crate writes the line; without that filter nothing runs.
    let redactor = Redactor::new(settings.secrets())?;
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            telemetry::init(settings.log.format, redactor, "info");
            warn_about_short_secrets(&settings);
            prepare_process();
            let app = Application::build(settings).await?;
            app.run(app::shutdown_on_signals()).await
        }
        Command::CheckConfig => {
            println!("{}", settings.redacted_json());
            // The contract makes the token required by `run` only; a config
            // for `publish` or `demo` is valid without it.
            if let Err(e) = settings.require_token() {
                eprintln!("warning: {e}; `run` will refuse to start without it");
            }
            if settings.amqp.tls_unused() {
                eprintln!("warning: amqp.tls is set but no URL in amqp.url is amqps://");
            }
            eprintln!("configuration is valid");
            Ok(())
        }
        Command::Publish(args) => {
            telemetry::init(settings.log.format, redactor, "warn");
            publish(&settings, args).await
        }
        Command::Demo(args) => {
            // The demo prints every result itself; expected failures
            // (refusals, an offline account) need no warning lines around them.
            telemetry::init(settings.log.format, redactor, "error");
            prepare_process();
            demo::run(settings, args.timeout).await
        }
        Command::Accounts(args) => {
            telemetry::init(settings.log.format, redactor, "warn");
            console_cli::accounts(&settings, args).await
        }
        Command::DeadLetters(args) => {
            telemetry::init(settings.log.format, redactor, "warn");
            console_cli::dead_letters(&settings, args).await
        }
        Command::SimulateGewe(args) => {
            telemetry::init(settings.log.format, redactor, "info");
            let stop = app::shutdown_on_signals();
            let (addr, server) = simulator::spawn(
                args.listen,
                simulator::Options {
                    token: args.token,
                    latency: args.latency,
                    fail_rate: args.fail_rate,
                    fail_with: args.fail_with,
                    daily_limit: args.daily_limit,
                    accept: args.callback_url.map(|url| simulator::AcceptPlan {
                        url,
                        accept_after: args.accept_after,
                    }),
                },
                stop,
            )
            .await
            .with_context(|| format!("could not listen on {}", args.listen))?;
            tracing::info!(%addr, "GeWe simulator listening");
            server.await??;
            Ok(())
        }
    }
}

/// Short secrets are masked in every log line and event text wherever they
/// appear, unrelated words included; the default `guest` password is one.
fn warn_about_short_secrets(settings: &Settings) {
    for key in settings.short_secrets() {
        tracing::warn!(
            key,
            "a secret shorter than 8 characters is masked wherever it appears in logs and events, also inside unrelated words: use a longer one"
        );
    }
}

/// For the long-running commands: panics logged as JSON lines, as many
/// descriptors as allowed, and the broker library's fallback runtime built
/// before descriptors can run short.
fn prepare_process() {
    telemetry::log_panics();
    resources::raise_fd_limit();
    resources::prewarm_broker_runtime();
}

async fn publish(settings: &Settings, args: PublishArgs) -> anyhow::Result<()> {
    let command = NewCommand {
        command_id: args
            .command_id
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        app_id: args.app_id,
        chatroom_id: args.chatroom_id,
        member_wxid: args.member_wxid,
        content: args.content,
    };
    let listen = if args.wait.is_some() {
        Listen::ReplyTo
    } else {
        Listen::Nothing
    };
    let mut publisher = CommandPublisher::connect(&settings.amqp, listen).await?;
    publisher.send(&command).await?;
    eprintln!("published command {}", command.command_id);
    if let Some(wait) = args.wait {
        let event = publisher.wait_for(&command.command_id, wait).await?;
        println!("{}", serde_json::to_string_pretty(&event)?);
    }
    publisher.close().await;
    Ok(())
}
