//! The `accounts` and `dead-letters` subcommands (contract §8): the command
//! line's arguments turned into calls of the admin API's client
//! ([`crate::admin::client`]) and its answers printed.

use crate::{
    admin::client::{AdminClient, ClientError, accounts_table, base_url, dead_letters_table},
    cli::{AccountsArgs, AccountsCommand, AdminTarget, DeadLettersArgs, DeadLettersCommand},
    config::Settings,
};

fn client(settings: &Settings, target: &AdminTarget) -> Result<AdminClient, ClientError> {
    AdminClient::new(
        &base_url(settings, target.admin_url.as_deref()),
        settings.admin.token.as_ref(),
    )
}

/// `gewe-friend-worker accounts …`.
pub async fn accounts(settings: &Settings, args: AccountsArgs) -> anyhow::Result<()> {
    let client = client(settings, &args.target)?;
    match args.command {
        AccountsCommand::List { json } => {
            let accounts = client.accounts().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&accounts)?);
            } else {
                print!("{}", accounts_table(&accounts));
            }
        }
        AccountsCommand::Pause {
            app_id,
            duration,
            reason,
        } => {
            let view = client
                .pause(&app_id, duration.as_deref(), reason.as_deref())
                .await?;
            let until = view["restingUntil"].as_str().unwrap_or("resumed");
            println!("paused {app_id} until {until}");
        }
        AccountsCommand::Resume { app_id } => {
            let view = client.resume(&app_id).await?;
            let state = view["state"].as_str().unwrap_or("active");
            println!("resumed {app_id} (now {state})");
        }
    }
    Ok(())
}

/// `gewe-friend-worker dead-letters …`.
pub async fn dead_letters(settings: &Settings, args: DeadLettersArgs) -> anyhow::Result<()> {
    let client = client(settings, &args.target)?;
    match args.command {
        DeadLettersCommand::List { limit, json } => {
            let list = client.dead_letters(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", dead_letters_table(&list));
            }
        }
        DeadLettersCommand::Replay { id, all, limit } => {
            if all {
                let moved = client.replay_all(limit).await?;
                println!("replayed {moved} dead letters");
            } else {
                let (moved, missing) = client.replay_ids(&id).await?;
                println!("replayed {moved} dead letters");
                if !missing.is_empty() {
                    anyhow::bail!("not in the dead letters: {}", missing.join(", "));
                }
            }
        }
    }
    Ok(())
}
