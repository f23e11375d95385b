//! What the integration tests share: the binary under test and its private environments
//! ([`util`]), statistics ([`stats`], also used by the benchmarks), and the real-part fixtures
//! of each area: the test policies ([`policy`]), dockerd ([`dockerd`]) and the chaos driver
//! with its independent overlap detector ([`torture`]); several users sharing a lock
//! directory, for the attack suite ([`users`]); OCI registries, plain or HTTPS with basic
//! auth ([`registry`]).

pub mod dockerd;
pub mod etcd;
pub mod observe;
pub mod policy;
pub mod registry;
pub mod stats;
pub mod torture;
pub mod users;
pub mod util;
