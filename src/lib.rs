//! gewe-friend-worker: consumes "add group member as friend" commands from
//! RabbitMQ, calls GeWe's `addGroupMemberAsFriend` with paced, deduplicated,
//! retried requests, and publishes each outcome as a confirmed result event.
//!
//! The contract (CLI, configuration, message formats, error kinds) lives in
//! the repository's README and `shared/contract.md`.

#![forbid(unsafe_code)]

pub mod accounts;
pub mod admin;
pub mod app;
pub mod backoff;
pub mod bounded_cache;
pub mod breaker;
pub mod broker;
pub mod buckets;
pub mod callbacks;
pub mod cli;
pub mod command;
pub mod command_publisher;
pub mod config;
pub mod console_cli;
pub mod defer;
pub mod demo;
pub mod entry;
pub mod error_kind;
pub mod event;
pub mod gewe;
pub mod halt;
pub mod http_server;
pub mod idempotency;
pub mod json_out;
pub mod meters;
pub mod ops;
pub mod outbound;
pub mod outcome;
pub mod pacing;
pub mod park;
pub mod processor;
pub mod redact;
pub mod redis_client;
pub mod resources;
pub mod simulator;
pub mod telemetry;
pub mod timestamp;
pub mod trace_context;
pub mod varint;
pub mod worker;
