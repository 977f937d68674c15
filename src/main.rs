//! Entry point: the global allocator, then [`gewe_friend_worker::entry`].

#![forbid(unsafe_code)]

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: a delivery makes and frees about a
/// hundred small buffers; glibc's malloc and free were ~15 % of the
/// worker's CPU samples, and mimalloc spends a third of their instructions
/// on them (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    gewe_friend_worker::entry::main()
}
