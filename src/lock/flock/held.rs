//! `held/`: who holds which slot, so that a lock file removed or renamed while held cannot let
//! a second holder in.
//!
//! The kernel lock is on an *inode*: if `lock` is removed (by a cleaner such as
//! systemd-tmpfiles, or by the user who created it) while someone holds it, the next request
//! creates a new file and the kernel grants it at once. So a grant is checked, under
//! `meta.lock`, against the holders: each holder links its ticket here as `<slot>.<id>` (a hard
//! link: the same inode, so alive exactly while the ticket is) atomically with its generation,
//! and its ticket records the device and inode of the slot file it holds. A request the kernel
//! has just granted backs off while another live holder of its slot holds *another* file — a
//! holder that recorded the very file just granted no longer holds it (the kernel says so).

use std::os::fd::AsFd;

use super::dir::{LockFiles, MAX_ENTRIES};
use super::ticket::{self, OwnTicket, Probe};
use crate::error::Result;
use crate::lock::backend::TicketData;
use crate::policy::Mode;
use crate::sys;

fn entry(slot: u32, id: &str) -> String {
    format!("{slot}.{id}")
}

/// Publishes `own` as a holder of `slot` (call under `meta.lock`, after marking it holding).
pub fn add(files: &LockFiles, own: &OwnTicket, slot: u32) -> Result<()> {
    let held = files.need(&files.held, "held")?;
    let name = entry(slot, own.data.id());
    // A leftover of an earlier holder with our id (the counters were reset) goes first.
    let _ = sys::unlink_at(held, &name);
    sys::link_at(files.queue.as_fd(), own.data.id(), held, &name).map_err(|e| {
        crate::error::Error::io(
            format!(
                "cannot record the holder in {}",
                files.path("held").display()
            ),
            e,
        )
    })
}

/// Withdraws `id` as a holder of `slot`.
pub fn remove(files: &LockFiles, slot: u32, id: &str) {
    if let Some(held) = files.held.as_ref() {
        let _ = sys::unlink_at(held.as_fd(), &entry(slot, id));
    }
}

/// What [`check`] found among the live holders.
#[derive(Debug, Default)]
pub struct Holders {
    /// A live holder of our slot whose grant conflicts with ours on another file.
    pub conflict: Option<TicketData>,
    /// The highest generation a live holder has (of any slot): a new generation must exceed
    /// it even if every counters file was lost.
    pub max_generation: u64,
}

/// Looks at the live holders for a grant of `slot` in `mode` on the file `granted` (device,
/// inode): a holder of `slot` conflicts when the modes conflict and it holds another file —
/// or does not say which (a format-1 ticket, or a handcrafted one: it counts as held). Dead
/// entries are removed on the way (where permitted).
pub fn check(files: &LockFiles, slot: u32, mode: Mode, granted: (u64, u64)) -> Result<Holders> {
    let mut found = Holders::default();
    let Some(held) = files.held.as_ref() else {
        return Ok(found);
    };
    let (entries, more) = sys::list_dir(held.as_fd(), MAX_ENTRIES).map_err(|e| {
        crate::error::Error::io(format!("cannot read {}", files.path("held").display()), e)
    })?;
    if more {
        ticket::warn_flood(files, "held");
    }
    for (name, _) in entries {
        let Some((entry_slot, id)) = name
            .split_once('.')
            .and_then(|(s, id)| Some((s.parse::<u32>().ok()?, id)))
        else {
            continue;
        };
        let t = match ticket::probe(held.as_fd(), &name, id, &files.name) {
            Probe::Alive(Ok(t)) => t,
            // Unreadable: not a ticket of a holder; dead or gone: not holding.
            _ => continue,
        };
        // Only a published ticket counts: the entry must be the very file `queue/<id>` is.
        let published = match (
            sys::info_at(held.as_fd(), &name),
            sys::info_at(files.queue.as_fd(), id),
        ) {
            (Ok(a), Ok(b)) => a.id() == b.id(),
            _ => false,
        };
        let d = &t.data;
        if !published || !d.holding || d.slot != Some(entry_slot) {
            continue;
        }
        found.max_generation = found.max_generation.max(d.generation.unwrap_or(0));
        if entry_slot != slot || found.conflict.is_some() {
            continue;
        }
        if mode == Mode::Shared && d.request().mode == Mode::Shared {
            continue;
        }
        if t.lock_file == Some([granted.0, granted.1]) {
            continue;
        }
        found.conflict = Some(t.data);
    }
    Ok(found)
}
