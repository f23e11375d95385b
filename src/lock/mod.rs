//! The lock engine: kernel flock for mutual exclusion, a fair ticket queue for order.
//!
//! Safety comes from the kernel only (`lock`, `lock.K` per lock); the queue, the ranks and the
//! policy decide who *tries*. Layout and protocol: `docs/architecture.md`.

pub mod dir;
pub mod engine;
pub mod meta;
pub mod name;
pub mod queue;
pub mod ticket;
pub mod wait;

pub use dir::{resolve_root, LockDir};
pub use engine::{acquire, AcquireOptions, Acquired, Guard};
