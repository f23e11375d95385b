//! dockerd lifecycle for `cachelock dockerd` and the Earthly drop-in: one dockerd per (locked)
//! data root, with its own exec root, socket, pidfile, log and network.
//!
//! Split by concern: [`root`] data roots and mounts, [`daemon_json`] the merged daemon.json,
//! [`network`] per-instance network isolation, [`tree`] finding every process an instance
//! started, [`daemon`] start/readiness/stop, [`hygiene`] cached-root clean-up with the docker CLI,
//! [`job`] the whole sequence shared by `cachelock dockerd` and `cachelock earthly` (lock,
//! root, run, release), [`session`] its part once the root is taken,
//! [`earthly`] Earthly's and EarthBuild's wrapper contracts, [`private`] per-run roots inside a
//! shared directory, [`claim`] host-wide paths (default socket, log) one daemon at a time,
//! [`usage`] the size cap on cached roots and its eviction.

pub mod claim;
pub mod daemon;
pub mod daemon_json;
pub mod earthly;
pub mod flock;
pub mod hygiene;
pub mod job;
pub mod network;
pub mod private;
pub mod root;
pub mod session;
pub mod setup;
pub mod tree;
pub mod usage;
