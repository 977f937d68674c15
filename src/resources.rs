//! The process's own resources: open-file descriptors above all.
//!
//! Under the common soft limit of 1,024 descriptors, a large `amqp.prefetch`
//! (one GeWe connection per command in flight) runs out, and that used to
//! look like a GeWe outage. The worker raises the soft limit to the hard one
//! at start-up, warns when its own bounds could still exceed it, and tells a
//! local shortage (EMFILE, ENFILE) apart from an unreachable GeWe.

use std::{error::Error, io};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; logs both.
pub fn raise_fd_limit() {
    let before = rlimit::Resource::NOFILE.get();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => match before {
            Ok((soft, hard)) if soft < now => {
                tracing::info!(from = soft, to = now, hard, "raised the open-file limit")
            }
            Ok((soft, hard)) => tracing::info!(soft, hard, "open-file limit"),
            Err(_) => tracing::info!(soft = now, "open-file limit"),
        },
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

/// The soft open-file limit, if it can be read.
pub fn fd_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// Builds async-compat's fallback tokio runtime now, while descriptors are
/// free. lapin's I/O thread (no tokio context) builds it lazily the first
/// time it drops a connection; if that happens out of descriptors the
/// build panics, and every later connection loss panics again on the
/// poisoned lazy value. Built once here, it is never built under pressure.
pub fn prewarm_broker_runtime() {
    // On a thread without a tokio context, as lapin's is.
    let built = std::thread::Builder::new()
        .name("prewarm-async-compat".into())
        .spawn(|| drop(async_compat::Compat::new(())))
        .map(|thread| thread.join());
    match built {
        Ok(Ok(())) => {}
        Ok(Err(_)) => tracing::error!("could not start the broker library's fallback runtime"),
        Err(e) => {
            tracing::error!(error = %e, "could not start the broker library's fallback runtime")
        }
    }
}

/// Whether `error` (or anything it was caused by) says this process or the
/// system is out of file descriptors: a local problem, not the peer's.
pub fn is_fd_exhaustion(error: &(dyn Error + 'static)) -> bool {
    os_error(error)
        .and_then(io::Error::raw_os_error)
        .is_some_and(|code| code == libc::EMFILE || code == libc::ENFILE)
}

fn os_error<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.raw_os_error().is_some() {
                return Some(io);
            }
            // io::Error::other(inner): its source() skips `inner` itself.
            if let Some(inner) = io.get_ref().and_then(|inner| os_error(inner)) {
                return Some(inner);
            }
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapper(io::Error);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("tcp open error")
        }
    }

    impl Error for Wrapper {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn descriptor_shortage_is_found_anywhere_in_the_chain() {
        let direct = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_fd_exhaustion(&direct));
        let wrapped = Wrapper(io::Error::from_raw_os_error(libc::ENFILE));
        assert!(is_fd_exhaustion(&wrapped));
        let boxed = io::Error::other(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(is_fd_exhaustion(&boxed));
        let refused = Wrapper(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert!(!is_fd_exhaustion(&refused));
        assert!(!is_fd_exhaustion(&io::Error::other("no os error")));
    }
}
