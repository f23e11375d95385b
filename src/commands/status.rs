//! `cachelock status`: holders and waiters of every lock (or of one), waiters in serving order
//! as ranked by each lock's configured policy (see `observe::status`). `--watch` redraws the
//! view whenever the queue changes and every second for the clocks, until Ctrl-C; it only
//! reads (not even a dead request's ticket is removed).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use cachelock::error::{Error, Kind, Result};
use cachelock::observe::status::StatusReader;
use cachelock::observe::watch::{StoreWatch, Wake};
use cachelock::output::status::{render_json, render_text, StatusDoc};
use cachelock::process::Signals;

use crate::cli::StatusArgs;

/// How often a watched view is redrawn when nothing changes (its clocks move).
const CLOCK_TICK: Duration = Duration::from_secs(1);

/// Runs `cachelock status`; returns the exit code.
pub fn execute(args: StatusArgs) -> Result<i32> {
    if let Some(n) = &args.name {
        cachelock::lock::name::validate(n)?;
    }
    let (loaded, store, private_because) = crate::request::configured_store(&args.store)?;
    let cap = loaded.config.dockerd.cache_max_size;
    let names = args.name.clone().map(|n| vec![n]);
    // Before the first read (which may compile a policy): a Ctrl-C during it ends the watch
    // as cleanly as one during the loop.
    let signals = if args.watch {
        Some(Signals::install()?)
    } else {
        None
    };
    let mut reader = StatusReader::new(loaded, &store, private_because, args.watch)?;
    let read = |reader: &mut StatusReader| -> Result<StatusDoc> {
        let mut doc = reader.read(names.as_deref())?;
        doc.cache = args
            .cache_root
            .as_ref()
            .map(|root| cachelock::dockerd::usage::status(root, cap));
        Ok(doc)
    };
    if let Some(signals) = &signals {
        return watch(&args, &store, &mut reader, read, signals);
    }
    let doc = read(&mut reader)?;
    let missing = doc.locks.iter().find(|l| !l.exists && args.name.is_some());
    if args.json {
        print!("{}", render_json(&doc));
    } else if let Some(l) = missing {
        return Err(no_such_lock(&l.name, &doc.lock_dir));
    } else {
        print!("{}", render_text(&doc));
    }
    match missing {
        Some(l) => Err(no_such_lock(&l.name, &doc.lock_dir)),
        None => Ok(0),
    }
}

fn no_such_lock(name: &str, store: &str) -> Error {
    Error::new(
        Kind::NoInput,
        format!(
            "no lock named {name} in {store}: nobody has used it (check the name, the --lock-dir or the --backend)"
        ),
    )
}

/// How a watched view is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Screen {
    /// A terminal that takes cursor movement: the view is redrawn in place.
    Redraw,
    /// Anything else (a pipe, a log, `TERM=dumb`, `NO_COLOR`): each new state printed after
    /// the last, when something other than the clocks changed.
    Lines,
}

fn screen() -> Screen {
    let plain = !std::io::stdout().is_terminal()
        || std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
        || std::env::var("TERM").is_ok_and(|t| t == "dumb");
    if plain {
        Screen::Lines
    } else {
        Screen::Redraw
    }
}

/// What a line-mode view compares: everything but the clocks.
fn shape(doc: &StatusDoc) -> String {
    let mut s = String::new();
    for l in &doc.locks {
        s.push_str(&format!(
            "{}:{}:{}:{}|",
            l.name, l.exists, l.generation, l.mixed_policies
        ));
        for h in &l.holders {
            s.push_str(&format!("h{},", h.ticket.ticket));
        }
        for w in &l.waiters {
            s.push_str(&format!("w{},", w.ticket.ticket));
        }
        s.push_str(&format!("u{}|", l.unreadable.len()));
    }
    s
}

fn watch(
    args: &StatusArgs,
    store: &cachelock::lock::Store,
    reader: &mut StatusReader,
    read: impl Fn(&mut StatusReader) -> Result<StatusDoc>,
    signals: &Signals,
) -> Result<i32> {
    let mut changes = StoreWatch::new(store, false)?;
    let screen = screen();
    let mut last_shape = None;
    let mut out = std::io::stdout().lock();
    loop {
        let doc = read(reader)?;
        let text = if args.json {
            render_json(&doc)
        } else {
            render_text(&doc)
        };
        let written = match screen {
            // Home, clear, draw: one write, so the terminal never shows half a view.
            Screen::Redraw => write!(out, "\x1b[H\x1b[2J{}{text}", header(&doc)),
            Screen::Lines => {
                let s = shape(&doc);
                if last_shape.as_ref() == Some(&s) {
                    Ok(())
                } else {
                    last_shape = Some(s);
                    writeln!(out, "{}{text}", header(&doc))
                }
            }
        };
        // A reader that went away (`| head`) ends the view.
        if written.and_then(|_| out.flush()).is_err() {
            return Ok(0);
        }
        match changes.wait(CLOCK_TICK, &[signals.fd()]) {
            Wake::Ready(_) if signals.take_terminating().is_some() => {
                if screen == Screen::Redraw {
                    let _ = writeln!(out);
                }
                return Ok(0);
            }
            _ => {}
        }
    }
}

fn header(doc: &StatusDoc) -> String {
    format!("{}  {}\n", doc.time, doc.lock_dir)
}
