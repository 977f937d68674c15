//! Integration tests that need only the shared RabbitMQ and Redis (GeWe is
//! mocked over real HTTP), one test binary for all of them: each binary
//! links every dependency, so one binary instead of fifteen saves most of
//! the link time and disk of `cargo test`.
//!
//! The tests run in parallel within this binary. They never disturb the
//! broker for others (`rabbitmqctl stop_app` lives in `tests/broker_restart.rs`;
//! the extra RabbitMQ nodes in `tests/nodes/`), and each declares its own
//! queues, exchanges and Redis keys. Tests that read this process's metrics
//! run [`common::alone`]: no other in-process worker counts meanwhile.

#[path = "../common/mod.rs"]
mod common;

mod accounts;
mod admin;
mod asyncapi;
mod callback_endpoint;
mod callback_flood;
mod callback_races;
mod callbacks;
mod cli;
mod console_browser;
mod guarantees;
mod idempotency;
mod observability;
mod ops;
mod pacing;
mod parking;
mod redis_cluster;
mod redis_faults;
mod redis_memory;
mod resilience;
mod resources;
mod secrets;
mod sessions;
mod telemetry_export;
mod worker;
