//! Everything that talks AMQP: connections to the nodes of `amqp.url`
//! ([`connect`]), a connection and its channels ([`session`]), the topology
//! ([`topology`]), confirmed publishing ([`publisher`]), a session as
//! its deliveries share it ([`handle`]) and settling a delivery
//! ([`settle`]).

pub mod connect;
pub mod handle;
pub mod publisher;
pub mod session;
pub mod settle;
pub mod topology;

pub use connect::{ConnectError, Connector, NoNodeAnswered};
pub use handle::{SessionControl, SessionHandle};
pub use publisher::{PublishError, Publisher};
pub use session::{Session, SessionError};
pub use topology::TopologyError;
