//! Everything that talks AMQP: connections to the nodes of `amqp.url`
//! ([`connect`]), a connection and its channels ([`session`]), the topology
//! ([`topology`]) and confirmed publishing ([`publisher`]).

pub mod connect;
pub mod publisher;
pub mod session;
pub mod topology;

pub use connect::{ConnectError, Connector, NoNodeAnswered};
pub use publisher::{PublishError, Publisher};
pub use session::{Session, SessionError};
pub use topology::TopologyError;
