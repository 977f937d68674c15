//! Writes that must survive a failover: a script followed by `WAIT` in one
//! pipeline ([`super::RedisClient::run_durable`]).
//!
//! Redis replicates asynchronously: a write the master acknowledged can be
//! missing on the replica Sentinel promotes. For the writes that guard a
//! friend request (a claim, a stored outcome, a pacing reservation, a budget
//! unit) the caller must not rely on the write until a replica has it, so
//! the script is sent with `WAIT 1 <timeout>` behind it, and a reply of 0
//! replicas is an error ([`super::RedisError::NotReplicated`]): the caller
//! holds its command and tries again, exactly as when Redis is down. A
//! script repeated that way must therefore be idempotent for its caller.
//!
//! A caller writes, for example,
//! `client.run_durable::<i64>(Durable::new(&TAKE_UNIT).key(&day_key).arg(limit))`
//! inside [`super::retry_while_unavailable`], which waits out every
//! [`super::RedisError`], `NotReplicated` included, without calling GeWe.
//!
//! The script goes as `EVALSHA`; a server that does not know it (a replica
//! just promoted has an empty script cache) answers `NOSCRIPT`, and the
//! script is loaded and the pipeline sent once more, which is safe because
//! a `NOSCRIPT` reply means the script did not run.

use std::time::Duration;

use redis::{ErrorKind, FromRedisValue, Script, ToRedisArgs, Value, aio::MultiplexedConnection};

/// A script call whose writes a replica must acknowledge.
pub struct Durable<'a> {
    script: &'a Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'a> Durable<'a> {
    /// A call of `script`; add keys and arguments in order.
    pub fn new(script: &'a Script) -> Self {
        Self {
            script,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Adds `KEYS[n]`.
    pub fn key(&mut self, key: impl ToRedisArgs) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Adds `ARGV[n]`.
    pub fn arg(&mut self, arg: impl ToRedisArgs) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn pipeline(&self, replicas: u32, wait: Duration) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        let eval = pipe
            .cmd("EVALSHA")
            .arg(self.script.get_hash())
            .arg(self.keys.len());
        for key in &self.keys {
            eval.arg(key.as_slice());
        }
        for arg in &self.args {
            eval.arg(arg.as_slice());
        }
        if replicas > 0 {
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            pipe.cmd("WAIT").arg(replicas).arg(ms);
        }
        pipe
    }

    /// Runs the script, then waits up to `wait` for `replicas` replicas to
    /// have it (none: no `WAIT`). Returns the script's reply and how many
    /// replicas acknowledged.
    pub(super) async fn run(
        &self,
        conn: &mut MultiplexedConnection,
        replicas: u32,
        wait: Duration,
    ) -> Result<(Value, u32), redis::RedisError> {
        let pipe = self.pipeline(replicas, wait);
        let replies: Vec<Value> = match pipe.query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                self.script.prepare_invoke().load_async(conn).await?;
                pipe.query_async(conn).await?
            }
            other => other?,
        };
        let mut replies = replies.into_iter();
        let reply = replies.next().unwrap_or(Value::Nil);
        let acknowledged = match replies.next() {
            Some(count) => u32::from_redis_value(&count)?,
            None => 0,
        };
        Ok((reply, acknowledged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_is_evalsha_then_wait() {
        let script = Script::new("return 1");
        let mut call = Durable::new(&script);
        call.key("k1").key("k2").arg(5);
        let packed = String::from_utf8_lossy(
            &call
                .pipeline(1, Duration::from_millis(500))
                .get_packed_pipeline(),
        )
        .into_owned();
        assert!(
            packed.contains("EVALSHA") && packed.contains(script.get_hash()),
            "{packed}"
        );
        assert!(
            packed.contains("\r\n$4\r\nWAIT\r\n$1\r\n1\r\n$3\r\n500\r\n"),
            "{packed}"
        );
        let packed = call
            .pipeline(0, Duration::from_millis(500))
            .get_packed_pipeline();
        assert!(!String::from_utf8_lossy(&packed).contains("WAIT"));
    }
}
