//! The lock engine: kernel flock for mutual exclusion, a fair ticket queue for order.
//!
//! Safety comes from the kernel only (`lock`, `lock.K` per lock); the queue, the ranks and the
//! policy decide who *tries*. Layout and protocol: `docs/architecture.md`. One module per
//! concern: [`dir`] (the directory, modes, `O_NOFOLLOW` opens), [`ticket`] (ticket files and
//! liveness probes), [`meta`] (`meta.lock` critical sections: ticket numbers, the arrival clock,
//! generation, queue keys), [`queue`] (scan, order, head set), [`wait`] (inotify or polling),
//! [`engine`] (acquire, release, [`Guard`]).
//!
//! Choices beyond the design note, and why:
//! - **Release closes the lock descriptor** instead of `LOCK_UN`: an unlock would also free the
//!   lock for a background process that inherited the descriptor and still runs; a close
//!   leaves it held until the last holder of the descriptor exits.
//! - **`meta.json` is rewritten in place** under `meta.lock` (readers take it shared) instead of
//!   write-and-rename: ext4 starts a writeback on rename-over, which cost milliseconds on every
//!   handoff.
//! - **Handoff path**: a waiter in the head set woken by a removal only (typically the holder's
//!   ticket) tries the kernel lock before re-scanning; waiters further back coalesce bursts of
//!   changes for a few milliseconds; inotify is set up only once a request is contended, and
//!   closed on a background thread (closing an inotify instance waits for an RCU grace period,
//!   5-20 ms).
//! - **Timer wake-ups are cheap**: one flock try at the head and, when polling, one listing of
//!   `queue/`; a full scan and a policy call happen on a change or every 250 ms.

pub mod dir;
pub mod engine;
pub mod meta;
pub mod name;
pub mod queue;
pub mod ticket;
pub mod wait;

pub use dir::{resolve_root, LockDir};
pub use engine::{acquire, AcquireOptions, Acquired, Guard};
