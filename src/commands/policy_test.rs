//! `cachelock policy test [FILE|DIR]...`: runs table-driven policy tests (`*.test.yaml`, see
//! `policy::suite`) and prints `N passed, N failed`; exit 1 when a case fails, 65 for a test
//! file that cannot be parsed, 66 when there is none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cachelock::config::Loaded;
use cachelock::error::{Error, Kind, Result};
use cachelock::policy::suite::{self, Suite};
use cachelock::policy::{self, spec, Policy};

/// Directories never searched for tests (build output, dependencies).
const SKIP_DIRS: &[&str] = &["target", "node_modules", "__pycache__"];
/// How deep a directory is searched.
const MAX_DEPTH: usize = 6;

fn is_test_file(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".test.yaml") || n.ends_with(".test.yml"))
}

fn collect(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir()
            && depth < MAX_DEPTH
            && !name.starts_with('.')
            && !SKIP_DIRS.contains(&name.as_str())
        {
            collect(&p, depth + 1, out);
        } else if ft.is_file() && is_test_file(&p) {
            out.push(p);
        }
    }
}

/// Runs every test file named or found; the exit code.
pub fn run(loaded: &Loaded, paths: &[PathBuf]) -> Result<i32> {
    let roots = if paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        paths.to_vec()
    };
    let mut files = Vec::new();
    for r in &roots {
        if r.is_dir() {
            collect(r, 0, &mut files);
        } else if r.exists() {
            files.push(r.clone());
        } else {
            return Err(Error::new(
                Kind::NoInput,
                format!("{} does not exist", r.display()),
            ));
        }
    }
    if files.is_empty() {
        return Err(Error::new(
            Kind::NoInput,
            format!(
                "no policy tests (*.test.yaml) in {}",
                roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let (mut passed, mut failed) = (0usize, 0usize);
    for f in &files {
        let text = cachelock::config::read_text(f)
            .map_err(|e| Error::new(Kind::NoInput, format!("cannot read {}: {e}", f.display())))?;
        let s = Suite::parse(&text)
            .map_err(|m| Error::new(Kind::DataErr, format!("{}: {m}", f.display())))?;
        let name = policy_name(&s.policy, f);
        println!("{} ({name}):", f.display());
        // One instance per distinct configuration; every case of it reuses the instance, as
        // one waiting process reuses its policy for every decision.
        let mut loaded_policies: BTreeMap<
            Vec<(String, String)>,
            std::result::Result<policy::host::WasmPolicy, String>,
        > = BTreeMap::new();
        for c in &s.cases {
            let cfg = s.config_of(c);
            let p = loaded_policies.entry(cfg.clone()).or_insert_with(|| {
                policy::load_now(loaded, &name, &cfg)
                    .map(|(_, p)| p)
                    .map_err(|e| e.message)
            });
            let r = match p {
                Ok(p) => suite::run_case(&s, c, p as &mut dyn Policy),
                Err(load) => match &c.expect.error {
                    Some(want) if load.contains(want.as_str()) => Ok(()),
                    _ => Err(format!("the policy cannot be loaded: {load}")),
                },
            };
            match r {
                Ok(()) => {
                    passed += 1;
                    println!("  ok    {}", c.name);
                }
                Err(why) => {
                    failed += 1;
                    println!("  FAIL  {}\n  {}", c.name, why.replace('\n', "\n  "));
                }
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed > 0 { 1 } else { 0 })
}

/// The test file's `policy:`: a path is relative to the test file; anything else (a configured
/// name, builtin:NAME, oci://) as written.
fn policy_name(p: &str, file: &Path) -> String {
    if spec::looks_like_file(p) && Path::new(p).is_relative() {
        file.parent()
            .unwrap_or(Path::new("."))
            .join(p)
            .to_string_lossy()
            .into_owned()
    } else {
        p.to_string()
    }
}
