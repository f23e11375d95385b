//! What cachelock prints: logging set-up here; progress lines and status rendering in
//! their own modules, so that user-facing text is found where it is printed.

pub mod progress;
pub mod status;

/// Logs go to stderr. `CACHELOCK_LOG` takes a tracing filter (e.g. `cachelock=debug`);
/// otherwise `-v` raises the level from warnings to debug (`-vv`: trace).
pub fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("CACHELOCK_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            EnvFilter::new(match verbose {
                0 => "warn",
                1 => "cachelock=debug,info",
                _ => "trace",
            })
        });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
