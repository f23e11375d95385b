//! The attack suite (docs/security.md has the table): each test plays an attack of issue 9 by a
//! user who shares the lock directory — as root, with unprivileged users `cl-alice` (the
//! victim) and `cl-bob` (the attacker) run through `setpriv` — and shows that it fails.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::users::*;
use crate::support::util::{bin, overlaps, read_log, Env, Proc};

const SIGKILL: i32 = libc::SIGKILL;

/// `run -q LOCK -- <section until go>` as `user`.
fn holder(sh: &Shared, user: &User, lock: &str, log: &Path, tag: &str, go: &Path) -> Proc {
    let mut args: Vec<String> = vec!["run".into(), "-q".into(), lock.into(), "--".into()];
    args.extend(sh.section_until(log, tag, go));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    sh.spawn(sh.cl(Some(user), &refs))
}

fn started(go: &Path) -> std::path::PathBuf {
    go.with_extension("go.started")
}

/// Runs `script` with `sh -c` as `user` (the attacker's hands).
fn shell(sh: &Shared, user: &User, script: &str) -> std::process::Output {
    let mut c = sh.as_user(Some(user), "sh");
    let cwd = if sh.lock_dir.is_dir() {
        sh.lock_dir.clone()
    } else {
        sh.path("")
    };
    c.args(["-c", script]).current_dir(cwd);
    c.output().unwrap()
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Item 1. The kernel lock is on an inode: `lock` removed or renamed while held (by its owner,
/// or a cleaner such as systemd-tmpfiles) used to let the next request create a new file and
/// enter beside the holder. Now a request the kernel grants backs off while a live holder
/// holds the slot on another file — also when the holder's cachelock was killed and only its
/// command (which inherits the lock and the ticket) still runs.
#[test]
fn replaced_lock_file_lets_no_second_holder_in() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    // alice uses the lock first: its files are hers, so she can remove them later.
    let o = sh.run(Some(a), &["run", "-q", "L", "--", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for attack in ["rm lock", "mv lock lock.old", "kill holder; rm lock"] {
        let tag = attack.replace([' ', ';', '.'], "_");
        let log = sh.log(&format!("{tag}.log"));
        let go = sh.path(&format!("{tag}.go"));
        let mut h = holder(&sh, b, "L", &log, "holder", &go);
        wait_until("the holder runs", || started(&go).exists());
        let script = match attack.strip_prefix("kill holder; ") {
            Some(rest) => {
                // cachelock itself dies; its command goes on (it ignores the parent-death
                // SIGTERM) and still holds the lock it inherited.
                h.signal(SIGKILL);
                assert_eq!(h.wait(), 128 + SIGKILL);
                rest
            }
            None => attack,
        };
        let o = shell(&sh, a, &format!("cd L.lock && {script}"));
        assert!(o.status.success(), "{attack}: {}", stderr(&o));

        let ran = sh.path(&format!("{tag}.ran"));
        let o = sh.run(
            Some(a),
            &["run", "-n", "L", "--", "touch", ran.to_str().unwrap()],
        );
        assert_eq!(o.status.code(), Some(1), "{attack}: {}", stderr(&o));
        assert!(
            !ran.exists(),
            "{attack}: a second holder ran beside the first"
        );
        assert!(stderr(&o).contains("held by"), "{attack}: {}", stderr(&o));

        let mut w = holder(&sh, a, "L", &log, "waiter", &go);
        wait_until("the waiter queues", || sh.tickets("L").len() == 2);
        std::fs::write(&go, "").unwrap();
        assert_eq!(w.wait(), 0, "{attack}: {}", w.stderr());
        let v = read_log(&log);
        assert_eq!(v.len(), 2, "{attack}: {v:?}");
        assert!(overlaps(&v).is_empty(), "{attack}: overlap {v:?}");
        drop(h);
    }
}

/// Item 1, permission model. Directories are 1777 (sticky: only an entry's owner removes or
/// renames it), kernel lock and shared metadata files 0666, tickets and per-user counters
/// 0644 — whatever the creator's umask (a second user used to get exit 74 after a first one
/// with umask 022). bob can neither remove nor rewrite alice's ticket or counters.
#[test]
fn other_users_cannot_remove_or_rewrite_a_users_files() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    for (umask, lock) in [(0o022, "u22"), (0o077, "u77")] {
        let mut c = sh.cl(Some(a), &["run", "-q", lock, "--", "true"]);
        // SAFETY: umask(2) is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                libc::umask(umask);
                Ok(())
            });
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let o = sh.run(Some(b), &["run", "-n", lock, "--", "true"]);
        assert_eq!(o.status.code(), Some(0), "umask {umask:o}: {}", stderr(&o));
        let base = sh.lock_dir.join(format!("{lock}.lock"));
        for d in ["", "queue", "tmp", "keys", "held", "meta.d"] {
            assert_eq!(mode_of(&base.join(d)), 0o1777, "{lock}/{d}");
        }
        for f in ["lock", "meta.lock", "meta.json"] {
            assert_eq!(mode_of(&base.join(f)), 0o666, "{lock}/{f}");
        }
        let mine = base.join(format!("meta.d/{}.json", a.uid));
        assert_eq!(mode_of(&mine), 0o644);
        assert_eq!(std::fs::metadata(&mine).unwrap().uid(), a.uid);
    }

    let log = sh.log("s.log");
    let go = sh.path("s.go");
    let h = holder(&sh, a, "u22", &log, "alice", &go);
    wait_until("alice holds", || started(&go).exists());
    let t = sh.tickets("u22");
    assert_eq!(t.len(), 1);
    let ticket = format!("u22.lock/queue/{}", t[0]);
    assert_eq!(mode_of(&sh.lock_dir.join(&ticket)), 0o644);
    for attack in [
        format!("rm -f {ticket}"),
        format!("mv {ticket} u22.lock/queue/x"),
        format!("echo '{{}}' > {ticket}"),
        "mv u22.lock/queue u22.lock/q2".to_string(),
        format!("rm -f u22.lock/held/0.{}", t[0]),
        format!("rm -f u22.lock/meta.d/{}.json", a.uid),
        "mv u22.lock u22.old".to_string(),
    ] {
        let o = shell(&sh, b, &attack);
        assert!(!o.status.success(), "bob could: {attack}");
    }
    let doc = sh.run(Some(b), &["status", "--json", "u22"]);
    let doc: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    assert_eq!(
        doc["locks"][0]["holders"][0]["pid"].as_i64(),
        Some(h.pid() as i64),
        "alice still holds, as everyone sees: {doc}"
    );
    assert_eq!(doc["locks"][0]["holders"][0]["uid"], a.uid, "{doc}");
    std::fs::write(&go, "").unwrap();
    drop(h);
}

/// Items 3 and 4. The default lock directory is `/var/lib/cachelock` for everyone (root
/// creates it 1777), so root and users exclude each other. A user who cannot use it falls back
/// to a private directory loudly (every run warns, `status` says so), and only to one that is
/// truly theirs: a symlink, another user's directory, or a world-writable one planted at
/// `$TMPDIR/cachelock-<uid>` is refused with exit 73. (`/var/lib` is a test's own here, in a
/// mount namespace.)
#[test]
fn default_lock_dir_is_shared_and_its_fallback_is_not_trusted_blindly() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let default = |user: Option<&User>, args: &[&str]| {
        let mut c = sh.cl(user, args);
        c.env_remove("CACHELOCK_LOCK_DIR");
        sh.with_private_var_lib(&mut c);
        c
    };
    let private = sh.path(&format!("tmp/cachelock-{}", a.uid));
    let bobs = sh.path("tmp/bobs");
    let plant = |script: &str| {
        let o = shell(&sh, b, script);
        assert!(o.status.success(), "{script}: {}", stderr(&o));
    };
    plant(&format!(
        "mkdir -m 777 {0} && ln -s {0} {1}",
        bobs.display(),
        private.display()
    ));
    let o = default(Some(a), &["run", "L", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_dir(&bobs).unwrap().count(),
        0,
        "followed bob's link"
    );
    plant(&format!("rm {0} && mkdir -m 777 {0}", private.display()));
    let o = default(Some(a), &["run", "L", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("owned by uid {}", b.uid)),
        "{}",
        stderr(&o)
    );
    plant(&format!("rmdir {}", private.display()));
    let o = shell(&sh, a, &format!("mkdir -m 777 {}", private.display()));
    assert!(o.status.success());
    let o = default(Some(a), &["run", "L", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("writable by other users"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir(&private).unwrap();

    // No /var/lib/cachelock, and alice cannot create it: a private directory, loudly.
    let o = default(Some(a), &["run", "L", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: using the private lock directory"),
        "{}",
        stderr(&o)
    );
    assert_eq!(mode_of(&private), 0o700);
    let o = default(Some(a), &["status", "--json"]).output().unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        doc["lock_dir_note"]
            .as_str()
            .is_some_and(|n| n.contains("private fallback")),
        "{doc}"
    );

    // Root's first run creates the shared directory; from then on root and alice share it.
    let o = default(None, &["run", "L", "--", "true"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(mode_of(&sh.path("varlib/cachelock")), 0o1777);
    let log = sh.log("d.log");
    let go = sh.path("d.go");
    let mut args: Vec<String> = vec!["run".into(), "-q".into(), "L".into(), "--".into()];
    args.extend(sh.section_until(&log, "alice", &go));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut h = sh.spawn(default(Some(a), &refs));
    wait_until("alice holds", || started(&go).exists());
    let o = default(None, &["run", "-n", "L", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "root and alice must exclude each other: {}",
        stderr(&o)
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    assert!(!h.stderr().contains("warning"), "no fallback any more");
}

/// Item 5. FIFOs planted in every place of a lock's state (`queue/`, `tmp/`, `held/`, `keys/`,
/// `meta.d/`, `meta.json`) block no open: runs, `-n` and `status` complete, the queue's FIFO is
/// shown as unreadable. A FIFO as the kernel lock file is refused at once (exit 74, naming its
/// owner). A process holding `meta.lock` for ever cannot make a run ignore SIGTERM.
#[test]
fn planted_fifos_and_a_held_meta_lock_hang_nothing() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    std::fs::create_dir(&sh.lock_dir).unwrap();
    std::fs::set_permissions(&sh.lock_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    use sha2::Digest;
    let key = format!("{}.{:x}", a.uid, sha2::Sha256::digest(b"job"));
    let o = shell(
        &sh,
        b,
        &format!(
            "mkdir -m 1777 F.lock F.lock/queue F.lock/tmp F.lock/keys F.lock/held F.lock/meta.d && \
             mkfifo -m 666 F.lock/meta.json F.lock/queue/000000000007 F.lock/tmp/000000000000.1.1 \
             F.lock/held/0.000000000007 F.lock/keys/{key} F.lock/meta.d/{}.json && \
             mkdir -m 1777 G.lock && mkfifo -m 666 G.lock/lock",
            a.uid
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    for args in [
        &["run", "F", "--", "true"][..],
        &["run", "-n", "-k", "job", "F", "--", "true"],
        &["status", "F"],
    ] {
        let mut p = sh.spawn(sh.cl(Some(a), args));
        assert_eq!(p.wait(), 0, "{args:?}: {}", p.stderr());
    }
    let o = sh.run(Some(a), &["status", "--json", "F"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let u = &doc["locks"][0]["unreadable"][0];
    assert_eq!(u["ticket"], "000000000007", "{doc}");
    assert_eq!(u["owner_uid"], b.uid);
    assert!(u["reason"].as_str().unwrap().contains("not a regular file"));
    let mut p = sh.spawn(sh.cl(Some(a), &["run", "G", "--", "true"]));
    assert_eq!(p.wait(), 74);
    let e = p.stderr();
    assert!(
        e.contains("not a regular file") && e.contains(&format!("uid {}", b.uid)),
        "{e}"
    );

    // bob holds meta.lock for ever.
    let held = sh.path("meta-held");
    let mut c = sh.as_user(Some(b), "flock");
    c.args(["-x", "F.lock/meta.lock", "sh", "-c"])
        .arg(format!("echo > {}; exec sleep 600", held.display()))
        .current_dir(&sh.lock_dir);
    let _bob = sh.spawn(c);
    wait_until("bob holds meta.lock", || held.exists());
    let mut w = sh.spawn(sh.cl(Some(a), &["run", "F", "--", "true"]));
    let mut s = sh.spawn(sh.cl(Some(a), &["status", "F"]));
    assert_eq!(
        s.wait(),
        0,
        "status reads without meta.lock: {}",
        s.stderr()
    );
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(), 128 + libc::SIGTERM, "{}", w.stderr());
    assert!(w.stderr().contains("interrupted by signal"));
}

/// Found in review: a symlink planted as a lock's `queue/` (or any of its directories) made
/// `status` probe the files it points to — and delete every one not flocked, in the victim's
/// own directory. Directories are now opened without following links; `status` of all locks
/// still shows the others.
#[test]
fn a_planted_symlink_redirects_nothing() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let o = sh.run(Some(a), &["run", "Z", "--", "true"]);
    assert!(o.status.success());
    let precious = sh.path("alices");
    let o = shell(
        &sh,
        a,
        &format!("mkdir {0} && echo precious > {0}/notes", precious.display()),
    );
    assert!(o.status.success());
    for (dir, link) in [("Y.lock", "queue"), ("Y2.lock", "held")] {
        let o = shell(
            &sh,
            b,
            &format!(
                "mkdir -m 1777 {dir} && ln -s {} {dir}/{link}",
                precious.display()
            ),
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    for args in [
        &["status", "Y"][..],
        &["run", "Y", "--", "true"],
        &["run", "Y2", "--", "true"],
    ] {
        let o = sh.run(Some(a), args);
        assert_eq!(o.status.code(), Some(73), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    }
    let o = sh.run(Some(a), &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("lock Z") && text.contains("symbolic link"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(precious.join("notes")).unwrap(),
        "precious\n"
    );
}

/// A live ticket as a user of the lock directory can plant one: valid JSON in `queue/`,
/// flocked by a process that never tries the lock.
fn forged_ticket(id: &str, lock: &str, priority: i64, host: &str, holding: bool) -> String {
    serde_json::json!({
        "id": id, "lock": lock, "mode": "exclusive", "priority": priority,
        "labels": [["k", "v"]], "host": host, "pid": 1, "enqueued_at_ms": 0,
        "wait_limit_ms": null, "queue_key": null, "holding": holding,
        "slot": if holding { Some(0) } else { None }, "generation": 1
    })
    .to_string()
}

/// Keeps `files` (relative to the lock directory) flocked as `user` until dropped.
fn keep_locked(sh: &Shared, user: &User, files: &[&str]) -> Proc {
    let ready = sh.path(&format!("locked-{}", files.len()));
    let mut script = String::new();
    for (i, f) in files.iter().enumerate() {
        script.push_str(&format!("exec {}<{f}; flock -x {}; ", i + 3, i + 3));
    }
    script.push_str(&format!("echo > {}; exec sleep 600", ready.display()));
    let mut c = sh.as_user(Some(user), "bash");
    c.args(["-c", &script]).current_dir(&sh.lock_dir);
    let p = sh.spawn(c);
    wait_until("the planted files are locked", || ready.exists());
    p
}

/// Item 6. A head that never takes a free lock — a stopped waiter, or a live ticket planted
/// with the highest priority — no longer blocks everyone: after a grace of 2 s the next in
/// line tries (the kernel still decides), and a timeout before that names the real reason.
#[test]
fn a_head_that_never_takes_a_free_lock_blocks_nobody() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let log = sh.log("h.log");
    let go = sh.path("h.go");
    let mut h = holder(&sh, a, "S", &log, "holder", &go);
    wait_until("alice holds", || started(&go).exists());
    let mut stopped = holder(&sh, a, "S", &log, "stopped", &go);
    wait_until("alice's waiter queues", || sh.tickets("S").len() == 2);
    let mut next = holder(&sh, b, "S", &log, "next", &go);
    wait_until("bob's waiter queues", || sh.tickets("S").len() == 3);
    stopped.signal(libc::SIGSTOP);
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    assert_eq!(
        next.wait(),
        0,
        "the next in line took the lock: {}",
        next.stderr()
    );
    // Still stopped, still first in line, the lock free: a short wait times out saying so.
    let o = sh.run(Some(b), &["run", "-w", "0.5", "S", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("has not taken it"), "{}", stderr(&o));
    stopped.signal(libc::SIGCONT);
    assert_eq!(stopped.wait(), 0);
    assert!(overlaps(&read_log(&log)).is_empty());

    // A forged live ticket with the highest priority at the head.
    let o = sh.run(Some(b), &["run", "P", "--", "true"]);
    assert!(o.status.success());
    let mut f = std::fs::File::create(sh.path("forged")).unwrap();
    f.write_all(forged_ticket("000000999999", "P", i32::MAX as i64, "h", false).as_bytes())
        .unwrap();
    let o = shell(
        &sh,
        b,
        &format!(
            "cp {} P.lock/queue/000000999999",
            sh.path("forged").display()
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let _forger = keep_locked(&sh, b, &["P.lock/queue/000000999999"]);
    let o = sh.run(Some(a), &["status", "--json", "P"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        doc["locks"][0]["waiters"][0]["ticket"], "000000999999",
        "{doc}"
    );
    // Whatever it claims, status names the user who planted it.
    assert_eq!(doc["locks"][0]["waiters"][0]["uid"], b.uid, "{doc}");
    let mut p = sh.spawn(sh.cl(Some(a), &["run", "-q", "P", "--", "true"]));
    assert_eq!(p.wait(), 0, "{}", p.stderr());
}

/// Round 2, item 6. Any number of heads that never take a free lock are passed, one after
/// another: two SIGSTOPped waiters, and five live tickets planted by another user at the head;
/// and a planted ticket replaced by a new one every 1.5 s does not restart the grace. In each
/// case a `-w 30` run behind them is served.
#[test]
fn any_number_of_stalled_or_replaced_heads_is_passed() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let log = sh.log("m.log");
    let go = sh.path("m.go");
    let mut h = holder(&sh, a, "M", &log, "holder", &go);
    wait_until("alice holds", || started(&go).exists());
    let mut stopped = Vec::new();
    for (i, u) in [a, b].into_iter().enumerate() {
        stopped.push(holder(&sh, u, "M", &log, &format!("stopped{i}"), &go));
        wait_until("a waiter queues", || sh.tickets("M").len() == i + 2);
    }
    for p in &stopped {
        p.signal(libc::SIGSTOP);
    }
    let mut next = sh.spawn(sh.cl(Some(b), &["run", "-q", "-w", "30", "M", "--", "true"]));
    wait_until("bob's run queues", || sh.tickets("M").len() == 4);
    std::fs::write(&go, "").unwrap();
    assert_eq!(h.wait(), 0);
    assert_eq!(
        next.wait(),
        0,
        "served behind two stopped waiters: {}",
        next.stderr()
    );
    for mut p in stopped {
        p.signal(libc::SIGCONT);
        assert_eq!(p.wait(), 0);
    }
    assert!(overlaps(&read_log(&log)).is_empty());

    // Five live tickets planted at the head by bob.
    let o = sh.run(Some(b), &["run", "F", "--", "true"]);
    assert!(o.status.success());
    let mut names = Vec::new();
    for i in 0..5 {
        let id = format!("00000099999{i}");
        std::fs::write(
            sh.path(&format!("forged{i}")),
            forged_ticket(&id, "F", i32::MAX as i64, "h", false),
        )
        .unwrap();
        let o = shell(
            &sh,
            b,
            &format!(
                "cp {} F.lock/queue/{id}",
                sh.path(&format!("forged{i}")).display()
            ),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        names.push(format!("F.lock/queue/{id}"));
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let _forger = keep_locked(&sh, b, &names);
    let o = sh.run(Some(a), &["run", "-q", "-w", "30", "F", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // One planted ticket, replaced by a fresh one every 1.5 s: each is live (locked before it
    // is linked into the queue), ranked first, and gone before 2 s.
    let o = sh.run(Some(b), &["run", "R", "--", "true"]);
    assert!(o.status.success());
    std::fs::write(
        sh.path("forged-r"),
        forged_ticket("ID", "R", i32::MAX as i64, "h", false),
    )
    .unwrap();
    let replaced = sh.path("replaced");
    let script = format!(
        r#"i=0; old=; while :; do
             id=$(printf '0000009%05d' $i); t={tmp}/plant.$i
             sed "s/"ID"/"$id"/" {forged} > $t
             ( exec 3<$t; flock -x 3; ln $t R.lock/queue/$id; exec sleep 600 ) & pid=$!
             while [ ! -e R.lock/queue/$id ]; do read -t 0.01 <> {fifo}; done
             if [ -n "$old" ]; then kill $oldpid; rm -f R.lock/queue/$old; fi
             echo $id >> {replaced}
             old=$id; oldpid=$pid; i=$((i+1)); read -t 1.5 <> {fifo}
           done"#,
        tmp = sh.path("tmp").display(),
        forged = sh.path("forged-r").display(),
        fifo = sh.path("fifo").display(),
        replaced = replaced.display(),
    );
    let mut c = sh.as_user(Some(b), "bash");
    c.args(["-c", &script]).current_dir(&sh.lock_dir);
    let _planter = sh.spawn(c);
    wait_until("the first planted ticket", || replaced.exists());
    let o = sh.run(Some(a), &["run", "-q", "-w", "30", "R", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let planted = std::fs::read_to_string(&replaced).unwrap();
    assert!(
        planted.lines().count() >= 2,
        "the planted ticket was replaced meanwhile: {planted}"
    );
}

/// Items 7, 8 and 14 (garbage). Planted live tickets that are a 2 GiB sparse file, a 200 KB
/// document, a label beyond the bounds, or garbage are never read whole, never reach a policy,
/// and cannot hide: `status` lists each as unreadable with its owner. A contended request (the
/// policy ranks the queue) is served as if they were not there.
#[test]
fn oversized_and_garbage_tickets_are_bounded_and_shown() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let o = sh.run(Some(b), &["run", "O", "--", "true"]);
    assert!(o.status.success());
    let big_label = "x".repeat(200_000);
    let long_label = "y".repeat(300);
    let huge = forged_ticket("000000900002", "O", 5, "h", false)
        .replace("\"v\"", &format!("\"{big_label}\""));
    let long = forged_ticket("000000900003", "O", 5, "h", false)
        .replace("\"v\"", &format!("\"{long_label}\""));
    for (name, text) in [
        ("900002", huge),
        ("900003", long),
        ("900004", "garbage{".to_string()),
    ] {
        std::fs::write(sh.path(name), text).unwrap();
    }
    let o = shell(
        &sh,
        b,
        &format!(
            "cd O.lock/queue && truncate -s 2G 000000900001 && cp {0}/900002 000000900002 && \
             cp {0}/900003 000000900003 && cp {0}/900004 000000900004",
            sh.tmp.path().display()
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let q = |n: u32| format!("O.lock/queue/00000090000{n}");
    let (q1, q2, q3, q4) = (q(1), q(2), q(3), q(4));
    let _bob = keep_locked(&sh, b, &[&q1, &q2, &q3, &q4]);

    let log = sh.log("o.log");
    let go = sh.path("o.go");
    let _h = holder(&sh, a, "O", &log, "holder", &go);
    wait_until("alice holds", || started(&go).exists());
    let mut w = holder(&sh, a, "O", &log, "waiter", &go);
    wait_until("alice's waiter queues", || sh.tickets("O").len() == 6);
    let (o, max_rss_kib) = run_measured(sh.cl(Some(a), &["status", "--json", "O"]));
    assert!(o.status.success(), "{}", stderr(&o));
    // Reading the 2 GiB ticket would show here; ranking the queue compiles the policy (cold
    // cache: cranelift, with the optimizing compile in the background), which peaks near
    // 150 MiB on this machine.
    assert!(max_rss_kib < 256 * 1024, "status used {max_rss_kib} KiB");
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let u = doc["locks"][0]["unreadable"].as_array().unwrap();
    assert_eq!(u.len(), 4, "{doc}");
    for e in u {
        assert_eq!(e["owner_uid"], b.uid, "{e}");
    }
    let reasons: Vec<&str> = u.iter().map(|e| e["reason"].as_str().unwrap()).collect();
    assert_eq!(
        reasons.iter().filter(|r| r.contains("larger than")).count(),
        2,
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("label outside the bounds")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not a ticket")),
        "{reasons:?}"
    );
    assert_eq!(
        doc["locks"][0]["waiters"].as_array().unwrap().len(),
        1,
        "{doc}"
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(w.wait(), 0, "the waiter is served: {}", w.stderr());
}

/// Runs `cmd` to completion; returns its output and its peak resident memory (KiB).
// The child is reaped by wait4, which also gives its resource usage.
#[allow(clippy::zombie_processes)]
fn run_measured(mut cmd: Command) -> (std::process::Output, i64) {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: plain wait4 on our child, into locals.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) },
        child.id() as i32
    );
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        let mut v = Vec::new();
        f.rewind().unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    use std::os::unix::process::ExitStatusExt;
    let o = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: read(out),
        stderr: read(err),
    };
    (o, ru.ru_maxrss)
}

/// Item 11. Configuration input is bounded: `/dev/zero`, a 200 KB deeply nested flow document
/// and out-of-range values are refused with exit 78 and a message naming the problem; a FIFO
/// without a writer blocks nothing.
#[test]
fn hostile_configuration_files_are_refused_quickly() {
    let env = Env::new();
    let nested = env.path("nested.yaml");
    std::fs::write(
        &nested,
        format!("locks: {}{}\n", "[".repeat(100_000), "]".repeat(100_000)),
    )
    .unwrap();
    for (file, yaml, says) in [
        ("/dev/zero".to_string(), None, "larger than 1 MiB"),
        (nested.display().to_string(), None, "flow collections"),
        (
            "p.yaml".into(),
            Some("progress_interval: 1e20\n"),
            "progress_interval",
        ),
        (
            "s.yaml".into(),
            Some("locks:\n  - match: x\n    slots: 4294967295\n"),
            "slots",
        ),
        (
            "g.yaml".into(),
            Some("dockerd:\n  stop_grace_max: 1e20\n"),
            "stop_grace_max",
        ),
        (env.path("").display().to_string(), None, "directory"),
    ] {
        let path = match yaml {
            Some(y) => {
                std::fs::write(env.path(&file), y).unwrap();
                env.path(&file).display().to_string()
            }
            None => file,
        };
        let mut p = Proc(Some(
            env.cmd()
                .args(["run", "--config", &path, "x", "--", "true"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ));
        assert_eq!(p.wait(), 78, "{path}");
        let e = p.stderr();
        assert!(e.contains(says), "{path}: {e}");
    }
    let mut p = Proc(Some(
        env.cmd()
            .args([
                "run",
                "--config",
                env.path("fifo").to_str().unwrap(),
                "x",
                "--",
                "true",
            ])
            .spawn()
            .unwrap(),
    ));
    assert_eq!(
        p.wait(),
        0,
        "a FIFO without a writer reads as an empty configuration"
    );
    // A `policy simulate` scenario is read under the same bound.
    let mut p = Proc(Some(
        env.cmd()
            .args([
                "policy",
                "simulate",
                "--policy",
                "builtin:default",
                "--scenario",
                "/dev/zero",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    assert_eq!(p.wait(), 66);
    let e = p.stderr();
    assert!(
        e.contains("scenario /dev/zero") && e.contains("larger than 1 MiB"),
        "{e}"
    );
}

/// Item 12. Labels and host names are other users' text: printed escaped in `status` text,
/// progress lines and error messages, so nobody can forge lines or send terminal escapes.
#[test]
fn other_users_text_cannot_forge_lines_or_escape_sequences() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let evil = "v\n  held by: nobody\n\u{1b}[31m";
    // A forged holder (a live ticket saying "holding", listed in held/) with an evil host.
    let o = sh.run(Some(b), &["run", "T", "--", "true"]);
    assert!(o.status.success());
    std::fs::write(
        sh.path("t"),
        forged_ticket("000000888888", "T", 0, evil, true),
    )
    .unwrap();
    let o = shell(
        &sh,
        b,
        &format!(
            "cp {} T.lock/queue/000000888888 && ln T.lock/queue/000000888888 T.lock/held/0.000000888888",
            sh.path("t").display()
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let _forger = keep_locked(&sh, b, &["T.lock/queue/000000888888"]);
    // bob also waits, with an evil label.
    let label = format!("k={evil}");
    let w = sh.spawn(sh.cl(Some(b), &["run", "-q", "-l", &label, "T", "--", "true"]));
    wait_until("bob waits", || sh.tickets("T").len() == 2);
    let mut outputs = Vec::new();
    let o = sh.run(Some(a), &["status", "T"]);
    outputs.push(String::from_utf8_lossy(&o.stdout).into_owned());
    let mut c = sh.cl(Some(a), &["run", "-w", "0.6", "T", "--", "true"]);
    c.env("CACHELOCK_CONFIG", sh.path("progress.yaml"));
    std::fs::write(sh.path("progress.yaml"), "progress_interval: 0.2\n").unwrap();
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    outputs.push(stderr(&o));
    for text in &outputs {
        assert!(!text.contains('\u{1b}'), "a raw escape: {text}");
        assert!(
            !text
                .lines()
                .any(|l| l.trim_start().starts_with("held by: nobody")),
            "a forged line: {text}"
        );
        assert!(
            text.contains("\\n  held by: nobody\\n\\u{1b}[31m"),
            "shown escaped: {text}"
        );
    }
    drop(w);
}

/// The previous release (on-disk format 1), built by `make prev-release`.
fn previous_release() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/prev-release/cachelock");
    assert!(
        p.exists(),
        "{} is missing: the mixed-version test needs the previous release; run `make prev-release`",
        p.display()
    );
    p
}

/// Item 13. The previous release (format 1) and this one (format 2) lock the same kernel lock
/// files: contending on one lock directory they never overlap and both are served. A lock
/// written by a newer format is refused with a message saying to upgrade.
#[test]
fn previous_and_current_release_exclude_each_other() {
    let prev = previous_release();
    let env = Env::new();
    let log = env.path("mixed.log");
    let mut workers = Vec::new();
    for (i, binary) in [prev.to_str().unwrap(), bin(), prev.to_str().unwrap(), bin()]
        .iter()
        .enumerate()
    {
        let mut argv: Vec<String> = vec![
            binary.to_string(),
            "run".into(),
            "-q".into(),
            "mixed".into(),
            "--".into(),
        ];
        argv.extend(env.section(
            &log,
            &format!("{}{i}", if i % 2 == 0 { "old" } else { "new" }),
            0.005,
        ));
        workers.push((argv, None));
    }
    let v = crate::support::util::contend(&env, &log, Duration::from_secs(3), workers);
    assert!(overlaps(&v).is_empty(), "old and new overlapped");
    for kind in ["old", "new"] {
        assert!(
            v.iter().filter(|s| s.tag.starts_with(kind)).count() >= 3,
            "{kind} starved: {v:?}"
        );
    }
    let meta_d = env.lock_dir.join("mixed.lock/meta.d");
    // A counters file counts only under its owner's uid (the runner's own, here).
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    std::fs::write(meta_d.join(format!("{me}.4242.json")), "{\"format\": 3}").unwrap();
    let o = env.run(&["mixed", "--", "true"]);
    assert_eq!(o.status.code(), Some(74));
    assert!(stderr(&o).contains("newer cachelock"), "{}", stderr(&o));
}

/// Item 14. bob rewrites the world-writable `meta.json` (garbage, zeros, a 2 GiB sparse file, a
/// far-future arrival): alice's generations still only grow, and her tickets' arrivals stay
/// near the clock (aging goes on). Root lowering every counters file cannot make a new ticket
/// replace a live one.
#[test]
fn corrupt_counters_never_repeat_a_generation_or_replace_a_ticket() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let gens = sh.log("gens");
    let show = format!("echo $CACHELOCK_GENERATION >> {}", gens.display());
    let run = || {
        let o = sh.run(Some(a), &["run", "-q", "C", "--", "sh", "-c", &show]);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    run();
    run();
    let future = (crate::support::util::now_s() as u64 + 100 * 86_400) * 1000;
    for attack in [
        "printf 'garbage' > C.lock/meta.json".to_string(),
        "echo '{\"generation\":0,\"next_ticket\":0}' > C.lock/meta.json".to_string(),
        "truncate -s 2G C.lock/meta.json".to_string(),
        format!("echo '{{\"last_enqueued_at_ms\":{future}}}' > C.lock/meta.json"),
    ] {
        let o = shell(&sh, b, &attack);
        assert!(o.status.success(), "{attack}: {}", stderr(&o));
        run();
    }
    let g: Vec<u64> = std::fs::read_to_string(&gens)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(g.windows(2).all(|w| w[1] > w[0]), "generations {g:?}");

    // After the far-future poison: a waiter's arrival is near now.
    let log = sh.log("c.log");
    let go = sh.path("c.go");
    let h = holder(&sh, a, "C", &log, "holder", &go);
    wait_until("alice holds", || started(&go).exists());
    let mut w = holder(&sh, a, "C", &log, "waiter", &go);
    wait_until("alice waits", || sh.tickets("C").len() == 2);
    let t = sh.tickets("C");
    let ticket: serde_json::Value = serde_json::from_slice(
        &std::fs::read(sh.lock_dir.join(format!("C.lock/queue/{}", t[1]))).unwrap(),
    )
    .unwrap();
    let at = ticket["enqueued_at_ms"].as_u64().unwrap();
    assert!(
        at < future - 50 * 86_400_000,
        "arrival stamp {at} follows the poison"
    );

    // Root lowers every counters file: the next ticket number is the holder's.
    let base = sh.lock_dir.join("C.lock");
    let lowered = format!(
        "{{\"next_ticket\":{},\"generation\":0}}",
        t[0].parse::<u64>().unwrap()
    );
    for f in std::fs::read_dir(base.join("meta.d")).unwrap().flatten() {
        std::fs::write(f.path(), &lowered).unwrap();
    }
    std::fs::write(base.join("meta.json"), "{}").unwrap();
    let o = sh.run(Some(a), &["run", "-n", "C", "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let doc = sh.run(Some(a), &["status", "--json", "C"]);
    let doc: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    assert_eq!(
        doc["locks"][0]["holders"][0]["pid"].as_i64(),
        Some(h.pid() as i64),
        "{doc}"
    );
    assert_eq!(
        doc["locks"][0]["waiters"][0]["pid"].as_i64(),
        Some(w.pid() as i64),
        "{doc}"
    );
    std::fs::write(&go, "").unwrap();
    assert_eq!(w.wait(), 0);
    drop(h);
}

// ---- Round 2 (issue 18): root writing outside the cache, holders beside holders, one user's
// files stopping the others. The dockerd attacks run the real dockerd (as root: the runs the
// attacker targets).

/// A root-only directory `name` holding `secret` (what the attacker wants root to destroy).
fn root_only(sh: &Shared, name: &str) -> std::path::PathBuf {
    let d = sh.path(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(d.join("secret"), "root's\n").unwrap();
    d
}

/// Makes `p` (a file or link the test planted for the attacker) the attacker's own.
fn give(p: &Path, u: &User) {
    std::os::unix::fs::lchown(p, Some(u.uid), Some(u.gid)).unwrap();
}

/// Item 1. bob made the cache root first — the default used to be inside the world-writable
/// lock directory — and planted links where root's `cachelock dockerd` writes its usage
/// accounting (`.cachelock-usage.json.<pid>`, for every pid root's run may get): root used to
/// overwrite a root-only file through them. A cache root must now be root's (or the caller's)
/// and nobody else's, on a path nobody else can change, or it is refused before anything is
/// written (exit 73, saying how to fix it); the same for the drop-in's data roots.
#[test]
fn root_writes_nothing_through_a_cache_root_another_user_controls() {
    use crate::support::dockerd::Env as Dockerd;
    let sh = Shared::new();
    let b = bob();
    let env = Dockerd::new("  cache_max_size: 1K");
    let victim = root_only(&sh, "root-only").join("secret");
    let o = shell(
        &sh,
        b,
        "mkdir -m 777 bobs-cache && mkdir -m 755 bobs-parent",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cache = sh.path("bobs-cache");
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for k in 1..4000 {
        let pid = (last + k) % max;
        let link = cache.join(format!(".cachelock-usage.json.{pid}"));
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        give(&link, b);
    }
    // A root-owned cache root on a path bob can change (its parent is bob's).
    let inner = sh.path("bobs-parent/cache");
    std::fs::create_dir(&inner).unwrap();
    for root in [&cache, &inner] {
        let o = env
            .cmd()
            .args(["dockerd", "--cache-root", root.to_str().unwrap()])
            .args(["--cache-id", "x", "--", "true"])
            .output()
            .unwrap();
        let e = stderr(&o);
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "root's\n",
            "root wrote through bob's link: {e}"
        );
        assert_eq!(o.status.code(), Some(73), "{}: {e}", root.display());
        assert!(
            e.contains(&format!("uid {}", b.uid)) && e.contains("nobody else can write"),
            "{e}"
        );
        env.assert_clean();
    }
    // The drop-in: a data root whose parent bob controls.
    let o = env
        .cmd()
        .args(["earthly", "execute", "true"])
        .env(
            "EARTHLY_DOCKERD_DATA_ROOT",
            sh.path("bobs-cache/cache_x").to_str().unwrap(),
        )
        .env("EARTHLY_DOCKERD_CACHE_DATA", "true")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    env.assert_clean();
}

/// Item 1, the race. bob controls the cache root and watches a cached root of his with
/// inotify; the moment root's eviction removes its first entry, he swaps the directory for a
/// link to a root-only directory. The removal used to go on by path, through the link,
/// deleting root's files of the names bob listed. Now the cache root is refused before any
/// eviction, and every removal below an accepted one goes by descriptor, following no link
/// (the unit tests of `dockerd::root` and `dockerd::usage` play the link there).
#[test]
fn an_eviction_race_removes_nothing_outside_the_cache_root() {
    use crate::support::dockerd::Env as Dockerd;
    let sh = Shared::new();
    let b = bob();
    let env = Dockerd::new("  cache_max_size: 1K");
    let victim = root_only(&sh, "root-only");
    // bob's cache root, a cached root of his that root's runs would evict (it has a lock in
    // the lock directory), thousands of files to remove, and the names of root's files.
    let o = shell(&sh, b, "mkdir -m 777 evict evict/bobs");
    assert!(o.status.success(), "{}", stderr(&o));
    for i in 0..3000 {
        let f = sh.path(&format!("evict/bobs/junk{i}"));
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        give(&f, b);
    }
    std::fs::write(sh.path("evict/bobs/secret"), "bob's\n").unwrap();
    give(&sh.path("evict/bobs/secret"), b);
    let o = env
        .cmd()
        .args(["run", "bobs", "--", "true"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ready = sh.path("watching");
    let swapped = sh.path("swapped");
    let mut attacker = sh.as_user(Some(b), "sh");
    attacker
        .arg("-c")
        .arg(format!(
            "inotifywait -e delete --format x evict/bobs 2>{ready} | {{ read x; mv evict/bobs evict/bobs.old && ln -s {victim} evict/bobs && echo > {swapped}; }}",
            ready = ready.display(),
            victim = victim.display(),
            swapped = swapped.display()
        ))
        .current_dir(sh.path(""));
    let _attacker = sh.spawn(attacker);
    wait_until("bob watches", || {
        std::fs::read_to_string(&ready).is_ok_and(|t| t.contains("Watches established"))
    });
    let o = env
        .cmd()
        .args([
            "dockerd",
            "--cache-root",
            sh.path("evict").to_str().unwrap(),
        ])
        .args(["--cache-id", "own", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(victim.join("secret"))
            .ok()
            .as_deref(),
        Some("root's\n"),
        "root's file was removed through bob's link (swapped: {})",
        swapped.exists()
    );
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    env.assert_clean();
}

/// The config file of a lock `name` with `slots` slots, in the shared directory.
fn slots_config(sh: &Shared, name: &str, slots: u32) -> String {
    let p = sh.path(&format!("{name}.yaml"));
    std::fs::write(
        &p,
        format!("locks:\n  - match: '{name}'\n    slots: {slots}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    p.display().to_string()
}

/// Files named like holders' entries of slot 1 (`1.<ticket id>`), plus as many other names,
/// planted in `dir` as `u`'s: two for each number of `range`.
fn flood(dir: &Path, u: &User, range: std::ops::Range<usize>) {
    for i in range {
        for name in [
            format!("1.{:015}", 900_000_000_000_000 + i),
            format!("junk{i}"),
        ] {
            let f = dir.join(name);
            std::fs::write(&f, "").unwrap();
            give(&f, u);
        }
    }
}

/// Item 2. The `held/` index was read only to its first 1 024 entries: bob floods it, removes
/// (or had pre-created) a slot file of a lock with two slots, and a third process gets in
/// beside the two holders. Now names that cannot be a holder's entry cost nothing, entries
/// that are not a published ticket are not holders, and past the bounds the grant is refused
/// (exit 74) naming whose files flood it: never granted blind.
#[test]
fn a_flooded_held_index_lets_no_third_holder_into_two_slots() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let cfg = slots_config(&sh, "S", 2);
    // bob uses the lock first, and pre-creates the second slot's file: both are his.
    let o = sh.run(Some(b), &["run", "--config", &cfg, "S", "--", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = shell(&sh, b, "install -m 666 /dev/null S.lock/lock.1");
    assert!(o.status.success(), "{}", stderr(&o));
    let log = sh.log("s.log");
    let go = sh.path("s.go");
    let mut holders = Vec::new();
    for tag in ["a0", "a1"] {
        let mut args: Vec<String> = ["run", "-q", "--config", &cfg, "S", "--"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(sh.section_until(&log, tag, &go));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        holders.push(sh.spawn(sh.cl(Some(a), &refs)));
        wait_until("alice holds", || {
            std::fs::read_dir(sh.lock_dir.join("S.lock/held"))
                .map(|d| d.count() == holders.len())
                .unwrap_or(false)
        });
    }
    let held = sh.lock_dir.join("S.lock/held");
    let ran = sh.path("third");
    // 20 000 names (holders were read to the first 1 024), then 68 000 (past the bound).
    for (range, code) in [(0..10_000, 1), (10_000..34_000, 74)] {
        let n = range.end * 2;
        flood(&held, b, range);
        let o = shell(&sh, b, "rm -f S.lock/lock.1");
        assert!(o.status.success(), "{}", stderr(&o));
        let o = sh.run(
            Some(b),
            &[
                "run",
                "-n",
                "--config",
                &cfg,
                "S",
                "--",
                "touch",
                ran.to_str().unwrap(),
            ],
        );
        let e = stderr(&o);
        assert!(
            !ran.exists(),
            "a third holder ran beside two ({n} names): {e}"
        );
        assert_eq!(o.status.code(), Some(code), "{n} names: {e}");
        if code == 74 {
            assert!(
                e.contains("cannot see every holder") && e.contains(&format!("uid {}", b.uid)),
                "{e}"
            );
        }
    }
    std::fs::write(&go, "").unwrap();
    for mut h in holders {
        assert_eq!(h.wait(), 0, "{}", h.stderr());
    }
    assert!(
        overlaps(&read_log(&log)).len() <= 1,
        "two slots, two holders"
    );
}

/// Items 2 and 9: names another user plants in advance — the holder entries of alice's next
/// tickets (ticket ids are predictable), every name alice's counters file may take — used to
/// stop her (exit 74). They are passed over for names nobody can guess.
#[test]
fn planted_names_stop_no_other_users_request() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let o = sh.run(Some(b), &["run", "P", "--", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut plant = String::from("cd P.lock && ");
    for id in 1..40 {
        plant.push_str(&format!("touch held/0.{id:012} && "));
    }
    plant.push_str(&format!("touch meta.d/{}.json", a.uid));
    for k in 1..8 {
        plant.push_str(&format!(" meta.d/{}.{k}.json", a.uid));
    }
    let o = shell(&sh, b, &plant);
    assert!(o.status.success(), "{}", stderr(&o));
    let gens = sh.log("p.gens");
    let show = format!("echo $CACHELOCK_GENERATION >> {}", gens.display());
    for _ in 0..3 {
        let o = sh.run(Some(a), &["run", "-q", "P", "--", "sh", "-c", &show]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let g: Vec<u64> = std::fs::read_to_string(&gens)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(g.windows(2).all(|w| w[1] > w[0]), "generations {g:?}");
}

/// Item 9. One counters file of bob's at 2^64-1 (his own `meta.d/<uid>.json`, or the shared
/// `meta.json`) exhausted everyone's counters: alice and root failed with exit 74. A counter
/// is now taken as at most one increment per microsecond since 1970, so nobody is stopped and
/// generations still only grow.
#[test]
fn another_users_exhausted_counters_stop_nobody() {
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let gens = sh.log("x.gens");
    let show = format!("echo $CACHELOCK_GENERATION >> {}", gens.display());
    let o = sh.run(Some(b), &["run", "X", "--", "sh", "-c", &show]);
    assert!(o.status.success(), "{}", stderr(&o));
    let max = u64::MAX;
    for plant in [
        format!(
            "printf '{{\"next_ticket\":{max},\"generation\":{max}}}' > X.lock/meta.d/{}.json",
            b.uid
        ),
        format!("printf '{{\"next_ticket\":{max},\"generation\":{max}}}' > X.lock/meta.json"),
    ] {
        let o = shell(&sh, b, &plant);
        assert!(o.status.success(), "{plant}: {}", stderr(&o));
        for user in [Some(a), None] {
            let o = sh.run(user, &["run", "X", "--", "sh", "-c", &show]);
            assert!(o.status.success(), "{plant}: {}", stderr(&o));
        }
    }
    let g: Vec<u64> = std::fs::read_to_string(&gens)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(g.len(), 5);
    assert!(g.windows(2).all(|w| w[1] > w[0]), "generations {g:?}");
}

/// Item 7. bob holds the `meta.lock` of 20 locks: `status` waited 2 s for each (40 s here,
/// hours with many locks) and said nothing. It now waits 2 s in all and names each lock whose
/// counters it read without the lock.
#[test]
fn status_is_bounded_in_total_and_names_what_it_could_not_read() {
    let sh = Shared::new();
    let b = bob();
    let names: Vec<String> = (0..20).map(|i| format!("M{i}")).collect();
    for n in &names {
        let o = sh.run(Some(b), &["run", n, "--", "true"]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let files: Vec<String> = names
        .iter()
        .map(|n| format!("{n}.lock/meta.lock"))
        .collect();
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    let _bob = keep_locked(&sh, b, &refs);
    let o = sh.run(None, &["status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let locks = doc["locks"].as_array().unwrap();
    assert_eq!(locks.len(), 20, "{doc}");
    for l in locks {
        let u = l["unreadable"].as_array().unwrap();
        assert!(
            u.iter()
                .any(|u| u["ticket"] == "meta.lock" && u["owner_uid"] == b.uid),
            "{l}"
        );
    }
}

/// Item 10. A FIFO given as an image to load (`--load`, `EARTHLY_DOCKER_LOAD_FILES`) blocked
/// the run for ever in `open`, before any lock was taken. It is refused at once (exit 66),
/// saying what it is, without being opened for reading (the guard below would meet a reader).
#[test]
fn a_fifo_as_an_image_to_load_is_refused_without_blocking() {
    use crate::support::dockerd::Env as Dockerd;
    let env = Dockerd::new("");
    let fifo = env.path("image.tar");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    // If cachelock opens the FIFO for reading, this writer meets it and lets it go on (the
    // test then fails instead of hanging).
    let f2 = fifo.clone();
    let guard = std::thread::spawn(move || {
        let _ = std::fs::OpenOptions::new().write(true).open(&f2);
    });
    let dockerd = env
        .cmd()
        .args([
            "dockerd",
            "--cache-id",
            "f",
            "--load",
            fifo.to_str().unwrap(),
            "--",
            "true",
        ])
        .output()
        .unwrap();
    let earthly = env
        .cmd()
        .args(["earthly", "execute", "true"])
        .env("EARTHLY_DOCKERD_DATA_ROOT", env.path("dind/cache_f"))
        .env("EARTHLY_DOCKERD_CACHE_DATA", "true")
        .env("EARTHLY_DOCKER_LOAD_FILES", &fifo)
        .output()
        .unwrap();
    let met = guard.is_finished();
    // Let the guard go: a reader of our own.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    guard.join().unwrap();
    assert!(!met, "cachelock opened the FIFO for reading");
    for o in [dockerd, earthly] {
        assert_eq!(o.status.code(), Some(66), "{}", stderr(&o));
        assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    }
    assert!(env.lock_free("f"));
    env.assert_clean();
}

/// Item 3. Earthly's `get-compose-config` writes a fixed path under `/tmp`: bob made
/// `/tmp/earthly` first and put a link to a root-only file at `compose-config.yml`, and root
/// overwrote that file. The file is now written only into a directory the writer (or root)
/// owns and nobody else can write, through a fresh file renamed into place (a link there is
/// replaced, never followed); a directory that is taken is refused (exit 73) saying so. Each
/// run sees a private `/tmp` of the test's (a mount namespace).
#[test]
fn get_compose_config_writes_through_no_link_into_no_other_users_directory() {
    let sh = Shared::new();
    let b = bob();
    let tmp = sh.path("private-tmp");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Root's file, and its path as the runs (in the private /tmp) see it.
    let victim = root_only(&sh, "private-tmp/root-only").join("secret");
    let seen = "/tmp/root-only/secret";
    std::fs::write(
        tmp.join("compose.yml"),
        "services:\n  svc:\n    image: bb:1\n",
    )
    .unwrap();
    let in_private_tmp = |cmd: &mut Command| {
        let src = std::ffi::CString::new(tmp.to_str().unwrap()).unwrap();
        // SAFETY: only async-signal-safe system calls on values prepared before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, move || {
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        c"none".as_ptr(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        src.as_ptr(),
                        c"/tmp".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    };
    let get = || {
        let mut c = Command::new(bin());
        c.args(["earthly", "get-compose-config"])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CACHELOCK_CONFIG", "/dev/null")
            .env("EARTHLY_COMPOSE_FILES", "/tmp/compose.yml");
        in_private_tmp(&mut c);
        c.output().unwrap()
    };
    // bob's directory, with his link where root writes.
    let o = shell(
        &sh,
        b,
        &format!(
            "mkdir -m 755 private-tmp/earthly && ln -s {seen} private-tmp/earthly/compose-config.yml"
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = get();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("uid {}", b.uid)) && stderr(&o).contains("remove it"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    // Root's own directory with a link planted in it (it was writable by others): refused
    // too; once it is root's alone, the link is replaced, never followed.
    std::fs::remove_dir_all(tmp.join("earthly")).unwrap();
    std::fs::create_dir(tmp.join("earthly")).unwrap();
    std::fs::set_permissions(tmp.join("earthly"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = tmp.join("earthly/compose-config.yml");
    std::os::unix::fs::symlink(seen, &link).unwrap();
    give(&link, b);
    let o = get();
    assert_eq!(o.status.code(), Some(73), "{}", stderr(&o));
    std::fs::set_permissions(tmp.join("earthly"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = get();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's\n");
    let written = std::fs::read_to_string(&link).unwrap();
    assert!(written.contains("svc"), "{written}");
    assert!(!std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}

/// Item 11. bob planted files where alice's `-k` records its place (the key record's name is
/// predictable from her uid and the key, often a CI job id): her give-up could not be
/// remembered and her retry went to the back. A name another user took is passed over.
#[test]
fn a_planted_key_record_cannot_take_a_retrys_place() {
    use sha2::Digest;
    let sh = Shared::new();
    let (a, b) = (alice(), bob());
    let o = sh.run(Some(b), &["run", "K", "--", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let record = format!("{}.{:x}", a.uid, sha2::Sha256::digest(b"job-7"));
    let o = shell(
        &sh,
        b,
        &format!("cd K.lock/keys && echo '{{}}' > {record} && mkdir {record}.tmp"),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let log = sh.log("k.log");
    let go = sh.path("k.go");
    let h = holder(&sh, b, "K", &log, "holder", &go);
    wait_until("bob holds", || started(&go).exists());
    // alice gives up (keeping her place), bob queues, alice retries with the same key.
    let o = sh.run(
        Some(a),
        &["run", "-q", "-w", "0.05", "-k", "job-7", "K", "--", "true"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!stderr(&o).contains("could not remember"), "{}", stderr(&o));
    let _w = holder(&sh, b, "K", &log, "later", &go);
    wait_until("bob waits", || sh.tickets("K").len() == 2);
    let mut args: Vec<String> = ["run", "-q", "-k", "job-7", "K", "--"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(sh.section_until(&log, "retry", &go));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let _retry = sh.spawn(sh.cl(Some(a), &refs));
    wait_until("alice waits again", || sh.tickets("K").len() == 3);
    let o = sh.run(Some(a), &["status", "--json", "K"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let first = &doc["locks"][0]["waiters"][0];
    assert_eq!(first["uid"], a.uid, "the retry lost its place: {doc}");
    drop(h);
}

/// A lock held by `holder` with a waiter using `policy` (a test component) behind it, `-q`;
/// `churn` requests come and go meanwhile (each a change of the queue the waiter looks at and
/// asks its policy about); then the holder leaves. Returns the waiter's stderr.
fn waiter_behind(config: &str, churn: usize) -> String {
    let env = crate::support::util::Env::with_config(config);
    let log = env.path("w.log");
    let go = env.path("w.go");
    std::fs::write(&log, "").unwrap();
    let mut holder = env.spawn(&[
        "run",
        "-q",
        "W",
        "--",
        "sh",
        "-c",
        &format!(
            "touch {0}.started; while [ ! -e {0} ]; do sleep 0.01; done",
            go.display()
        ),
    ]);
    wait_until("the holder holds", || env.path("w.go.started").exists());
    let mut waiter = env.spawn(&["run", "-q", "--policy", "p", "W", "--", "true"]);
    // Read as it comes, so that a flood cannot fill the pipe and stop the waiter.
    let mut pipe = waiter.0.as_mut().unwrap().stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut s);
        s
    });
    env.wait_tickets("W", 2);
    for _ in 0..churn {
        let o = env.run(&["-n", "-q", "W", "--", "true"]);
        assert_eq!(o.status.code(), Some(1));
    }
    std::fs::write(&go, "").unwrap();
    assert_eq!(holder.wait(), 0);
    let code = waiter.wait();
    let err = reader.join().unwrap();
    assert_eq!(code, 0, "{err}");
    err
}

/// Item 11. A policy (another team's code) printing 1 MiB per call flooded stderr with every
/// evaluation, `-q` or not (~150 KB/s per waiter), and a trapping policy's own panic text was
/// repeated at every evaluation under `on_error: default` although cachelock's own warning is
/// given once. A policy's output is now shown once per distinct line, 16 KiB in all per
/// process, and a repeated fault's output is logged at debug level.
#[test]
fn a_policys_output_cannot_flood_a_quiet_waiters_stderr() {
    use crate::support::policy::test_policy;
    let absurd = format!(
        "policies:\n  p:\n    module: {}\n    config: {{mode: chatty}}\n    limits: {{min_interval_ms: 5, max_interval_ms: 50}}\n",
        test_policy("test-absurd").display()
    );
    let err = waiter_behind(&absurd, 40);
    assert!(err.len() < 24 * 1024, "{} bytes of stderr", err.len());
    assert_eq!(err.matches("dropped").count(), 1, "{err}");
    let trap = format!(
        "policies:\n  p:\n    module: {}\n    on_error: default\n",
        test_policy("test-trap").display()
    );
    let err = waiter_behind(&trap, 20);
    assert_eq!(err.matches("on-wait traps on purpose").count(), 1, "{err}");
    assert_eq!(err.matches("about to trap").count(), 1, "{err}");
}
