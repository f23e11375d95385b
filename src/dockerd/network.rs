//! Network isolation between dockerd instances on one host.
//!
//! Two dockerd with default networking in one network namespace fight: both claim `docker0`,
//! and each one's start-up removes and recreates the shared `DOCKER*` iptables chains under
//! the other. The modes (config `dockerd.network`, see docs/dockerd.md):
//!
//! - `netns` (default for `cachelock dockerd`): dockerd runs in a network namespace of its own,
//!   where its default networking (docker0, iptables, port mappings, user networks) works
//!   unchanged, exactly as inside Earthly's build container. A veth "uplink" with a /30 from
//!   `dockerd.uplink_pool` (default 10.199.0.0/16) and one MASQUERADE rule give the namespace
//!   (pulls, containers) the host's outside connectivity. The namespace dies with its last
//!   process, taking the veth with it; the NAT rules are removed at stop, and a crashed run's
//!   rules are replaced by the next run that gets the same /30.
//! - `none`: no bridge, no iptables (`--bridge=none --iptables=false`); containers get loopback
//!   only, or the host's network with `--network host`. Nothing host-wide is touched.
//! - `default`: dockerd's own networking in the caller's namespace. Right inside a container
//!   that runs one dockerd (the Earthly drop-in's default); on a host, one instance at a time.

use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::error::{Error, Result};

/// How a dockerd instance is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Own network namespace with a NAT uplink.
    Netns,
    /// No bridge, no iptables.
    None,
    /// dockerd's own default networking in the caller's namespace.
    Default,
}

/// Default pool of uplink /30 networks (netns mode).
pub const DEFAULT_UPLINK_POOL: &str = "10.199.0.0/16";

impl Mode {
    /// Parses `netns`, `none` or `default`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "netns" => Ok(Self::Netns),
            "none" => Ok(Self::None),
            "default" => Ok(Self::Default),
            other => Err(Error::config(format!(
                "`dockerd.network: {other}` is not a network mode; use netns, none or default"
            ))),
        }
    }

    /// Extra dockerd flags for this mode.
    pub fn dockerd_args(self) -> Vec<String> {
        match self {
            Self::None => vec![
                "--bridge=none".into(),
                "--iptables=false".into(),
                "--ip-masq=false".into(),
            ],
            _ => Vec::new(),
        }
    }

    /// Makes `cmd` start in a new network namespace (netns mode).
    pub fn prepare(self, cmd: &mut Command) {
        if self == Self::Netns {
            // SAFETY: unshare is a raw system call, safe between fork and exec; it only
            // affects the child.
            unsafe {
                cmd.pre_exec(crate::sys::new_network_namespace);
            }
        }
    }
}

/// Parses `A.B.C.D/N`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let bad = || {
        Error::config(format!(
            "`dockerd.uplink_pool: {s}` is not an IPv4 network such as 10.199.0.0/16"
        ))
    };
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    if !(8..=30).contains(&prefix) {
        return Err(bad());
    }
    Ok((addr, prefix))
}

/// The host side of a netns instance's uplink; [`Uplink::remove`] undoes what was set up.
#[derive(Debug)]
pub struct Uplink {
    /// Host-side veth name.
    pub host_if: String,
    /// The /30 network.
    pub net: Ipv4Addr,
    removed: bool,
}

fn run(args: &[&str]) -> std::result::Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn nat_rules(host_if: &str, net: Ipv4Addr) -> Vec<Vec<String>> {
    let cidr = format!("{net}/30");
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        s(&[
            "-t",
            "nat",
            "POSTROUTING",
            "-s",
            &cidr,
            "!",
            "-o",
            host_if,
            "-j",
            "MASQUERADE",
        ]),
        s(&["-t", "filter", "FORWARD", "-i", host_if, "-j", "ACCEPT"]),
        s(&["-t", "filter", "FORWARD", "-o", host_if, "-j", "ACCEPT"]),
    ]
}

fn iptables(op: &str, rule: &[String]) -> std::result::Result<(), String> {
    // rule = [-t, table, CHAIN, spec...]
    let mut args = vec!["iptables", "-w", rule[0].as_str(), rule[1].as_str(), op];
    args.extend(rule[2..].iter().map(|s| s.as_str()));
    run(&args)
}

/// Removes uplink rules whose host interface no longer exists: what a SIGKILLed wrapper left
/// (its namespace, and with it the veth, is gone once its dockerd exited). An instance creates
/// its interface before its rules and removes its rules before its interface, so live
/// instances' rules are never touched.
pub fn sweep_stale_rules() {
    for (table, chain) in [("nat", "POSTROUTING"), ("filter", "FORWARD")] {
        let Ok(out) = Command::new("iptables")
            .args(["-w", "-t", table, "-S", chain])
            .stdin(Stdio::null())
            .output()
        else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let iface = words
                .windows(2)
                .find(|w| (w[0] == "-o" || w[0] == "-i") && w[1].starts_with("clup"))
                .map(|w| w[1]);
            let Some(iface) = iface else { continue };
            if words.first() != Some(&"-A")
                || std::path::Path::new("/sys/class/net").join(iface).exists()
            {
                continue;
            }
            let mut args = vec!["iptables", "-w", "-t", table, "-D"];
            args.extend(&words[1..]);
            let _ = run(&args);
        }
    }
}

impl Uplink {
    /// Connects the network namespace of `pid` to the host: a veth pair with a free /30 from
    /// `pool`, a default route, and NAT. `pid` must already be in its new namespace.
    pub fn setup(pid: u32, pool: (Ipv4Addr, u8)) -> std::result::Result<Self, String> {
        let count = 1u32 << (32 - pool.1 - 2);
        let base = u32::from(pool.0) & (u32::MAX << (32 - pool.1));
        let start = pid % count;
        let pid_s = pid.to_string();
        sweep_stale_rules();
        for k in 0..count.min(4096) {
            let i = (start + k) % count;
            let host_if = format!("clup{i}");
            // Creating the interface is the atomic claim of index i between concurrent wrappers.
            match run(&[
                "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns",
                &pid_s,
            ]) {
                Ok(()) => {}
                Err(e) if e.contains("File exists") => continue,
                Err(e) => return Err(e),
            }
            let net = Ipv4Addr::from(base + 4 * i);
            let mut up = Uplink {
                host_if: host_if.clone(),
                net,
                removed: false,
            };
            let gw = Ipv4Addr::from(u32::from(net) + 1).to_string();
            let me = Ipv4Addr::from(u32::from(net) + 2).to_string();
            let ns = |a: &[&str]| {
                let mut v = vec!["nsenter", "-t", pid_s.as_str(), "-n"];
                v.extend_from_slice(a);
                run(&v)
            };
            let result = (|| {
                run(&["ip", "addr", "add", &format!("{gw}/30"), "dev", &host_if])?;
                run(&["ip", "link", "set", &host_if, "up"])?;
                ns(&["ip", "link", "set", "lo", "up"])?;
                ns(&["ip", "addr", "add", &format!("{me}/30"), "dev", "eth0"])?;
                ns(&["ip", "link", "set", "eth0", "up"])?;
                ns(&["ip", "route", "add", "default", "via", &gw])?;
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                    .map_err(|e| format!("cannot enable IPv4 forwarding: {e}"))?;
                for rule in nat_rules(&host_if, net) {
                    // A crashed run with the same /30 may have left its rules: never duplicate.
                    while iptables("-D", &rule).is_ok() {}
                    iptables("-A", &rule)?;
                }
                Ok::<(), String>(())
            })();
            return match result {
                Ok(()) => Ok(up),
                Err(e) => {
                    up.remove();
                    Err(e)
                }
            };
        }
        Err(format!(
            "no free uplink network in {}/{}; widen `dockerd.uplink_pool`",
            pool.0, pool.1
        ))
    }

    /// Removes the NAT rules and the veth pair (idempotent).
    pub fn remove(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;
        for rule in nat_rules(&self.host_if, self.net) {
            while iptables("-D", &rule).is_ok() {}
        }
        let _ = run(&["ip", "link", "del", &self.host_if]);
        sweep_stale_rules();
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_pools() {
        assert_eq!(Mode::parse("netns").unwrap(), Mode::Netns);
        assert_eq!(Mode::parse("bridgez").unwrap_err().exit_code(), 78);
        assert_eq!(
            parse_cidr("10.199.0.0/16").unwrap(),
            (Ipv4Addr::new(10, 199, 0, 0), 16)
        );
        assert!(parse_cidr("10.199.0.0").is_err());
        assert!(Mode::None
            .dockerd_args()
            .contains(&"--iptables=false".to_string()));
    }
}
