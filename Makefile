# The two commands of the README: `make demo` runs the main job on embedded defaults,
# `make test` installs what the tests need and runs the whole suite. Both work on a machine
# that has only the Rust toolchain.

.PHONY: test setup build-setup demo prev-release

# What any build needs: the built-in policies are compiled for wasm32-wasip2 by build.rs.
build-setup:
	rustup target add wasm32-wasip2

# Everything the test suite needs on a fresh Debian machine (as root): the build's needs,
# Debian's dockerd and busybox-static (test images without a registry), and for the attack suite
# useradd (passwd) and setpriv, unshare, flock (util-linux).
setup: build-setup
	@if ! command -v dockerd >/dev/null || ! test -x /bin/busybox \
		|| ! command -v useradd >/dev/null || ! command -v setpriv >/dev/null; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io busybox-static passwd util-linux; \
	fi

# The previous release (on-disk format 1, the last commit before format 2), for the mixed-version
# test in tests/it/security.rs; built once, reusing this checkout's dependencies.
PREV_RELEASE := d185526
prev-release: build-setup
	.ci/prev-release $(PREV_RELEASE)

test: setup prev-release
	cargo test --no-fail-fast

demo: build-setup
	cargo run --release -- run demo -- sh -c 'echo "holding $$CACHELOCK_LOCK (ticket $$CACHELOCK_TICKET, generation $$CACHELOCK_GENERATION)"'
