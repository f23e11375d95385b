//! SIGKILL while holding, through the real binary: a killed holder (cachelock and its command)
//! frees the lock for the next waiter and leaves no ticket; a killed cachelock whose command
//! still runs keeps the lock until the command ends (the command inherited it) and the command
//! is told to stop. Events only: how fast the successor gets in is a benchmark figure
//! (`cargo bench --bench compare`), not a test threshold.

use crate::support::util::*;

/// A holder whose command notes `started` and then waits forever (or as `script` says).
fn holder(env: &Env, lock: &str, script: &str) -> Proc {
    env.spawn(&["run", "-q", lock, "--", "bash", "-c", script])
}

/// A waiter whose critical section logs `succ` to `log`, queued behind the holder.
fn successor(env: &Env, lock: &str, log: &std::path::Path) -> Proc {
    let mut args = vec!["run".to_string(), "-q".into(), lock.into(), "--".into()];
    args.extend(env.section(log, "succ", 0.0));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let p = env.spawn(&refs);
    env.wait_tickets(lock, 2);
    p
}

#[test]
fn killed_holder_frees_the_lock_and_leaves_no_ticket() {
    let env = Env::new();
    for round in 0..3 {
        let started = env.path(&format!("started{round}"));
        let mut h = holder(
            &env,
            "k",
            &format!("echo started > {}; exec sleep 30", started.display()),
        );
        wait_for_lines(&started, 1);
        let log = env.path(&format!("succ{round}.log"));
        let mut succ = successor(&env, "k", &log);
        h.signal_group(libc::SIGKILL);
        assert_eq!(succ.wait(), 0, "the successor took the freed lock");
        assert_eq!(read_log(&log).len(), 1);
        h.wait();
    }
    // The killed holders' tickets are gone (a scan removes a dead ticket; status scans too).
    let st = env.status_json(Some("k"));
    assert!(
        st["locks"][0]["holders"].as_array().unwrap().is_empty(),
        "status still shows a killed holder: {st}"
    );
    assert!(env.tickets("k").is_empty(), "{:?}", env.tickets("k"));
}

/// SIGKILL of cachelock alone while its command runs: the command gets SIGTERM (its
/// parent-death signal), traps it and goes on for a while; it still holds the lock it
/// inherited, so the successor enters only after the command left.
#[test]
fn killed_cachelock_keeps_the_lock_until_its_command_ends() {
    let env = Env::new();
    for round in 0..3 {
        let log = env.path(&format!("k{round}.log"));
        let started = env.path(&format!("kstarted{round}"));
        let term = env.path(&format!("term{round}"));
        let script = format!(
            r#"trap 'echo term > {term}' TERM; s=$EPOCHREALTIME; echo started > {started}
               while [ ! -e {term} ]; do read -t 0.02 <> {fifo}; done
               read -t 0.2 <> {fifo}; e=$EPOCHREALTIME; echo "holder $s $e" >> {log}"#,
            term = term.display(),
            started = started.display(),
            fifo = env.path("fifo").display(),
            log = log.display()
        );
        let mut h = holder(&env, "kc", &script);
        wait_for_lines(&started, 1);
        let mut succ = successor(&env, "kc", &log);
        h.signal(libc::SIGKILL); // cachelock only, not its command
        wait_for_lines(&term, 1);
        assert_eq!(succ.wait(), 0, "successor failed");
        let v = read_log(&log);
        let hold = v.iter().find(|s| s.tag == "holder").expect("holder logged");
        let s = v
            .iter()
            .find(|s| s.tag == "succ")
            .expect("successor logged");
        assert!(
            s.start >= hold.end,
            "successor entered {:.1} ms before the orphaned command left",
            (hold.end - s.start) * 1000.0
        );
        h.wait();
    }
}
