//! The daemon.json each dockerd is started with: defaults, then the user's daemon.json, then the
//! configuration's `dockerd.daemon_json`, merged the way Earthly's wrapper merges them (objects
//! merged key by key, arrays concatenated, anything else replaced).

use std::net::Ipv4Addr;
use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// Keys cachelock passes as dockerd flags; dockerd refuses a key given both ways, so they are
/// dropped from the merged file (with a warning).
pub const FLAG_KEYS: [&str; 5] = ["data-root", "exec-root", "pidfile", "hosts", "graph"];

/// Merges `over` into `base`: objects key by key, arrays concatenated, other values replaced.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) => b.extend(o),
        (b, o) => *b = o,
    }
}

/// Removes repeated values from every top-level array (merging concatenates arrays, so a
/// registry listed by the user and by the contract would appear twice).
pub fn dedup_arrays(doc: &mut Value) {
    if let Value::Object(m) = doc {
        for v in m.values_mut() {
            if let Value::Array(a) = v {
                let mut seen = Vec::new();
                a.retain(|x| {
                    let dup = seen.contains(x);
                    if !dup {
                        seen.push(x.clone());
                    }
                    !dup
                });
            }
        }
    }
}

/// Reads a user's daemon.json; a file that is not a JSON object is a configuration error (78).
pub fn read_user_file(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(format!(
            "cannot read daemon.json {}: {e}; fix the path in `dockerd.daemon_json_file`",
            path.display()
        ))
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        Error::config(format!(
            "daemon.json {} is not valid JSON: {e}; fix the file or point `dockerd.daemon_json_file` elsewhere",
            path.display()
        ))
    })?;
    if !v.is_object() {
        return Err(Error::config(format!(
            "daemon.json {} must be a JSON object ({{...}})",
            path.display()
        )));
    }
    Ok(v)
}

/// IPv4 networks (address, prefix length) routed on this host, from `/proc/net/route`.
pub fn host_routes() -> Vec<(Ipv4Addr, u8)> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            // /proc/net/route is little-endian; the default route (mask 0) overlaps everything
            // and is not a network to avoid.
            (mask != 0).then(|| (Ipv4Addr::from(dest.swap_bytes()), mask.count_ones() as u8))
        })
        .collect()
}

/// Whether two IPv4 networks overlap.
pub fn overlaps(a: (Ipv4Addr, u8), b: (Ipv4Addr, u8)) -> bool {
    let p = a.1.min(b.1);
    let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
    u32::from(a.0) & mask == u32::from(b.0) & mask
}

/// Default `bip` and `default-address-pools`: Earthly's (`172.20.0.1/16`; pools `172.21.0.0/16`
/// and `172.22.0.0/16` in /24s) when free, else the next free /16s of 172.20–172.31, so that
/// containers never shadow a network the host routes (its own docker0 included).
pub fn defaults(routes: &[(Ipv4Addr, u8)]) -> Value {
    let free: Vec<u8> = (20..=31u8)
        .filter(|n| {
            !routes
                .iter()
                .any(|r| overlaps(*r, (Ipv4Addr::new(172, *n, 0, 0), 16)))
        })
        .collect();
    let pick = |i: usize, fallback: u8| free.get(i).copied().unwrap_or(fallback);
    let (b, p1, p2) = (pick(0, 20), pick(1, 21), pick(2, 22));
    json!({
        "bip": format!("172.{b}.0.1/16"),
        "default-address-pools": [
            {"base": format!("172.{p1}.0.0/16"), "size": 24},
            {"base": format!("172.{p2}.0.0/16"), "size": 24},
        ],
    })
}

/// The final daemon.json: defaults ← user file ← configured settings ← `forced`, without the
/// keys passed as flags. Returns the document and the names of dropped keys.
pub fn build(
    defaults: Value,
    user: Option<Value>,
    configured: Option<Value>,
    forced: Value,
) -> (Value, Vec<String>) {
    let mut doc = defaults;
    for layer in [user, configured, Some(forced)].into_iter().flatten() {
        merge(&mut doc, layer);
    }
    let mut dropped = Vec::new();
    if let Value::Object(m) = &mut doc {
        for k in FLAG_KEYS {
            if m.remove(k).is_some() {
                dropped.push(k.to_string());
            }
        }
    }
    (doc, dropped)
}

/// An empty JSON object.
pub fn empty() -> Value {
    Value::Object(Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_merge_arrays_concatenate_scalars_replace() {
        let mut a = json!({"a": {"x": 1, "y": [1]}, "b": "k", "c": [1, 2]});
        merge(
            &mut a,
            json!({"a": {"y": [2], "z": true}, "b": "n", "c": [3]}),
        );
        assert_eq!(
            a,
            json!({"a": {"x": 1, "y": [1, 2], "z": true}, "b": "n", "c": [1, 2, 3]})
        );
    }

    #[test]
    fn defaults_avoid_host_networks() {
        let d = defaults(&[]);
        assert_eq!(d["bip"], "172.20.0.1/16");
        let d = defaults(&[
            (Ipv4Addr::new(172, 20, 0, 0), 16),
            (Ipv4Addr::new(172, 16, 0, 0), 12),
        ]);
        // 172.16.0.0/12 covers all of 172.16-31: nothing free, Earthly's values stay.
        assert_eq!(d["bip"], "172.20.0.1/16");
        let d = defaults(&[
            (Ipv4Addr::new(172, 20, 0, 0), 16),
            (Ipv4Addr::new(172, 22, 5, 0), 24),
        ]);
        assert_eq!(d["bip"], "172.21.0.1/16");
        assert_eq!(d["default-address-pools"][0]["base"], "172.23.0.0/16");
    }

    #[test]
    fn flag_keys_are_dropped() {
        let (doc, dropped) = build(
            defaults(&[]),
            Some(json!({"data-root": "/x", "insecure-registries": ["a"]})),
            Some(json!({"insecure-registries": ["b"]})),
            json!({}),
        );
        assert_eq!(dropped, vec!["data-root".to_string()]);
        assert_eq!(doc["insecure-registries"], json!(["a", "b"]));
    }

    #[test]
    fn dedup_keeps_first_of_each() {
        let mut d = json!({"insecure-registries": ["a", "b", "a"], "bip": "x"});
        dedup_arrays(&mut d);
        assert_eq!(d["insecure-registries"], json!(["a", "b"]));
    }

    #[test]
    fn routes_parse() {
        // Whatever the host has, parsing must not panic and prefixes stay in range.
        assert!(host_routes().iter().all(|r| r.1 <= 32));
    }
}
