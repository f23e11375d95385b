# The two commands of the README: `make demo` runs the main job on embedded defaults,
# `make test` installs what the tests need and runs the whole suite. Both work on a machine
# that has only the Rust toolchain.

.PHONY: test setup build-setup demo

# What any build needs: the built-in policies are compiled for wasm32-wasip2 by build.rs, and
# the etcd client (cargo feature `etcd`, on by default) compiles etcd's protobufs with protoc
# and the well-known types of libprotobuf-dev.
build-setup:
	rustup target add wasm32-wasip2
	@if ! command -v protoc >/dev/null || ! test -f /usr/include/google/protobuf/descriptor.proto; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y protobuf-compiler libprotobuf-dev; \
	fi

# Everything the test suite needs on a fresh Debian machine (as root): the build's needs,
# Debian's dockerd and busybox-static (test images without a registry), etcd 3.4 and etcdctl
# (the tests run their own clusters; the package's own service is kept from starting), and
# openssl (self-signed certificates of the TLS cluster).
setup: build-setup
	@if ! command -v dockerd >/dev/null || ! test -x /bin/busybox || ! command -v etcd >/dev/null \
		|| ! command -v etcdctl >/dev/null || ! command -v openssl >/dev/null; then \
		apt-get update; \
		if test -e /usr/sbin/policy-rc.d; then keep=1; else keep=0; printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io busybox-static etcd-server etcd-client openssl; \
		status=$$?; if test $$keep = 0; then rm -f /usr/sbin/policy-rc.d; fi; exit $$status; \
	fi

test: setup
	cargo test --no-fail-fast

demo: build-setup
	cargo run --release -- run demo -- sh -c 'echo "holding $$CACHELOCK_LOCK (ticket $$CACHELOCK_TICKET, generation $$CACHELOCK_GENERATION)"'
