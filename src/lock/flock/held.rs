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

use super::dir::{LockFiles, MAX_ENTRIES, MAX_SCANNED};
use super::ticket::{self, OwnTicket, Probe};
use crate::error::{Error, Kind, Result};
use crate::lock::backend::TicketData;
use crate::policy::Mode;
use crate::sys;

/// How many names a holder tries for its entry when the ones before are taken.
const NAME_ATTEMPTS: usize = 4;

/// The slot and ticket id an entry of `held/` stands for: `<slot>.<id>`, or
/// `<slot>.<id>.<suffix>` when another user's file took the plain name first. Nothing else can
/// be a holder's entry.
fn parse(name: &str) -> Option<(u32, &str)> {
    let mut parts = name.splitn(3, '.');
    let slot = parts.next()?.parse().ok()?;
    let id = parts.next()?;
    ticket::is_ticket_id(id).then_some((slot, id))
}

/// Publishes `own` as a holder of `slot` (call under `meta.lock`, after marking it holding);
/// returns the entry's name. A name another user planted in advance (ticket ids are
/// predictable) is passed over for one with an unpredictable suffix.
pub fn add(files: &LockFiles, own: &OwnTicket, slot: u32) -> Result<String> {
    let held = files.need(&files.held, "held")?;
    let plain = format!("{slot}.{}", own.data.id());
    // A leftover of an earlier holder with our id (the counters were reset) goes first, if it
    // is ours to remove.
    let _ = sys::unlink_at(held, &plain);
    let mut last = None;
    for k in 0..NAME_ATTEMPTS {
        let name = if k == 0 {
            plain.clone()
        } else {
            format!("{plain}.{:016x}", sys::unpredictable())
        };
        match sys::link_at(files.queue.as_fd(), own.data.id(), held, &name) {
            Ok(()) => return Ok(name),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(record_error(files, e)),
        }
    }
    Err(record_error(
        files,
        last.unwrap_or_else(|| std::io::ErrorKind::AlreadyExists.into()),
    ))
}

fn record_error(files: &LockFiles, e: std::io::Error) -> Error {
    Error::io(
        format!(
            "cannot record the holder in {}",
            files.path("held").display()
        ),
        e,
    )
}

/// Withdraws our entry `name` from `held/`.
pub fn remove(files: &LockFiles, name: &str) {
    if let Some(held) = files.held.as_ref() {
        let _ = sys::unlink_at(held.as_fd(), name);
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
///
/// The index is never read in part: names that cannot be a holder's entry are passed over,
/// an entry that is not the very file `queue/<id>` is (two `stat`s) is no holder's, and only
/// what is left is probed. Past the bounds (more than [`MAX_SCANNED`] names, or more than
/// [`MAX_ENTRIES`] published entries) the grant is refused, saying whose files flood it:
/// a lock whose holders cannot all be seen is not granted.
pub fn check(files: &LockFiles, slot: u32, mode: Mode, granted: (u64, u64)) -> Result<Holders> {
    let mut found = Holders::default();
    let Some(held) = files.held.as_ref() else {
        return Ok(found);
    };
    let listing = sys::list_dir_valid(held.as_fd(), MAX_SCANNED, MAX_SCANNED, |n| {
        parse(n).is_some()
    })
    .map_err(|e| Error::io(format!("cannot read {}", files.path("held").display()), e))?;
    if listing.overflow {
        return Err(flooded(files, held.as_fd(), MAX_SCANNED, "names"));
    }
    let mut published = 0usize;
    for (name, _) in &listing.entries {
        let Some((entry_slot, id)) = parse(name) else {
            continue;
        };
        // Only a published ticket counts: the entry must be the very file `queue/<id>` is.
        let linked = match (
            sys::info_at(held.as_fd(), name),
            sys::info_at(files.queue.as_fd(), id),
        ) {
            (Ok(a), Ok(b)) => a.id() == b.id(),
            _ => false,
        };
        if !linked {
            continue;
        }
        published += 1;
        if published > MAX_ENTRIES {
            return Err(flooded(
                files,
                held.as_fd(),
                MAX_ENTRIES,
                "published entries",
            ));
        }
        let t = match ticket::probe(held.as_fd(), name, id, &files.name) {
            Probe::Alive(Ok(t)) => t,
            // Unreadable: not a ticket of a holder; dead or gone: not holding.
            _ => continue,
        };
        let d = &t.data;
        if !d.holding || d.slot != Some(entry_slot) {
            continue;
        }
        found.max_generation = found
            .max_generation
            .max(super::meta::plausible(d.generation.unwrap_or(0)));
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

/// The refusal of a grant when `held/` holds more than `bound` `what`: names the owners of
/// what is there (from a sample), so that root knows whose files to remove.
fn flooded(
    files: &LockFiles,
    held: std::os::fd::BorrowedFd<'_>,
    bound: usize,
    what: &str,
) -> Error {
    Error::new(
        Kind::IoErr,
        format!(
            "{} holds more than {bound} {what} ({}); cachelock cannot see every holder of lock {} and does not grant it: remove the extra files (as their owners or root)",
            files.path("held").display(),
            ticket::owners_sample(held),
            files.name
        ),
    )
}
