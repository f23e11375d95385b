# The two commands of the README: `make demo` runs the main job on embedded defaults,
# `make test` installs what the tests need and runs the whole suite. Both work on a machine
# that has only the Rust toolchain. `make static` builds the statically linked binary for
# Earthly's Alpine-based buildkitd image; `make deb` the Debian package of it.

.PHONY: test setup build-setup demo static static-dev prev-release deb

MUSL := x86_64-unknown-linux-musl
# Debian packages any build needs: the etcd client (cargo feature `etcd`, on by default)
# compiles etcd's protobufs with protoc and the well-known types of libprotobuf-dev.
BUILD_PACKAGES := protobuf-compiler libprotobuf-dev
# Debian packages the tests use: dockerd and busybox-static (test images without a registry),
# the registry and docker-compose of the Earthly drop-in tests, musl-tools for the static build,
# etcd 3.4 and etcdctl (the etcd backend's clusters), openssl (their self-signed certificates,
# and the independent signer of the policy-signature tests), apache2-utils (htpasswd: the
# policy registries' basic auth), skopeo (an independent OCI client reading pushed policies),
# for the attack suite useradd (passwd) and setpriv, unshare, flock (util-linux); for the
# Debian package's tests mmdebstrap (a clean root from Debian packages) and lintian; bindfs
# (a FUSE mount: the lock directory on a filesystem inotify cannot watch, for `doctor`);
# inotifywait (inotify-tools: an attacker that acts on the instant a file is touched); for
# the observability tests a real Prometheus (and promtool), headless Chromium driven by
# Selenium (Debian's /usr/bin/python3) and tmux.
TEST_PACKAGES := docker.io busybox-static docker-registry docker-compose musl-tools \
	etcd-server etcd-client openssl apache2-utils skopeo passwd util-linux mmdebstrap lintian bindfs \
	inotify-tools prometheus chromium chromium-driver python3-selenium tmux
# Policy compilers the tests use: componentize-py and componentize-js (the Python and
# JavaScript policy tests; the versions `cachelock policy new --lang python|js` names).
COMPONENTIZE_PY_VERSION = 0.25.1
COMPONENTIZE_JS_VERSION = 0.23.0

# Installs the Debian packages in $(1) that are missing, with one `apt-get update`. etcd's
# package would start its own service: a temporary policy-rc.d keeps every service from
# starting (the tests run their own daemons).
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update || exit 1; \
		if test -e /usr/sbin/policy-rc.d; then keep=1; else keep=0; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; \
		status=$$?; if test $$keep = 0; then rm -f /usr/sbin/policy-rc.d; fi; exit $$status; \
	fi
endef

# What any build needs (as root on a fresh Debian machine): the wasm target of the built-in
# policies (build.rs compiles them) and the packages above.
build-setup:
	rustup target add wasm32-wasip2
	$(call apt_install,$(BUILD_PACKAGES))

# Everything the test suite needs: the build's needs, the musl target for the static binary,
# the test packages and the policy compilers.
setup:
	rustup target add wasm32-wasip2 $(MUSL)
	$(call apt_install,$(BUILD_PACKAGES) $(TEST_PACKAGES))
	@if ! componentize-py --version 2>/dev/null | grep -qx 'componentize-py $(COMPONENTIZE_PY_VERSION)'; then \
		python3 -m pip install --quiet 'componentize-py==$(COMPONENTIZE_PY_VERSION)'; \
	fi
	@if ! componentize-js --version 2>/dev/null | grep -qx '$(COMPONENTIZE_JS_VERSION)'; then \
		npm install --global --no-audit --no-fund '@bytecodealliance/componentize-js@$(COMPONENTIZE_JS_VERSION)'; \
	fi

# The static binary the README installs in a buildkitd image: linked at a fixed address
# (`.cargo/config.toml`) with mimalloc (src/main.rs), whose C code musl-gcc (musl-tools)
# compiles.
static: setup
	cargo build --release --target $(MUSL) --bin cachelock
	@echo "target/$(MUSL)/release/cachelock"

# The Debian package (packaging/deb/build): the static release binary, stripped, as
# /usr/bin/cachelock, its man page and completions, an example configuration (a conffile of
# comments) and tmpfiles.d entries. dpkg-deb builds it; strip comes with binutils.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
deb: static
	$(call apt_install,binutils)
	packaging/deb/build target/$(MUSL)/release/cachelock $(VERSION) target/deb

# The same static linking (a property of the musl target, not of the profile) in the dev
# profile with unoptimised dependencies: the cheapest build for the test that runs it in a
# busybox-only root (measured here: 223 s of CPU instead of 594 s with optimised dependencies).
static-dev: setup
	cargo build --target $(MUSL) --bin cachelock --config 'profile.dev.package."*".opt-level=0'

# The previous release (on-disk format 1, the last commit before format 2), for the mixed-version
# test in tests/it/security.rs; built once, reusing this checkout's dependencies.
PREV_RELEASE := 38e09b9
prev-release: build-setup
	.ci/prev-release $(PREV_RELEASE)

test: setup static-dev prev-release
	cargo test --no-fail-fast

demo: build-setup
	cargo run --release -- run demo -- sh -c 'echo "holding $$CACHELOCK_LOCK (ticket $$CACHELOCK_TICKET, generation $$CACHELOCK_GENERATION)"'
