//! Tests that start extra RabbitMQ nodes beside the shared broker, with the
//! scripts in `deploy/`: a 3-node cluster on ports 5701-5703 and a
//! mutual-TLS node on 5771. Fixed ports and node names: each test holds the
//! machine-wide lock [`common::lock::extra_nodes`] while its nodes are up,
//! so two runs (two worktrees, or nextest) never start them twice. They need
//! root and `rabbitmq-server`, as on the CI machine.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
mod tls;
