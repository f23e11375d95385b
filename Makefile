# The two commands of the README: `make demo` runs the main job on embedded defaults,
# `make test` installs what the tests need and runs the whole suite.

.PHONY: test setup demo

# Everything the test suite needs on a fresh Debian machine (as root): the wasm target for the
# built-in and test policies, componentize-py and componentize-js (the Python and JavaScript
# policy tests; the versions `cachelock policy new --lang python|js` names), Debian's dockerd and
# busybox-static (test images without a registry).
COMPONENTIZE_PY_VERSION = 0.25.1
COMPONENTIZE_JS_VERSION = 0.23.0
setup:
	rustup target add wasm32-wasip2
	@if ! componentize-py --version 2>/dev/null | grep -qx 'componentize-py $(COMPONENTIZE_PY_VERSION)'; then \
		python3 -m pip install --quiet 'componentize-py==$(COMPONENTIZE_PY_VERSION)'; \
	fi
	@if ! componentize-js --version 2>/dev/null | grep -qx '$(COMPONENTIZE_JS_VERSION)'; then \
		npm install --global --no-audit --no-fund '@bytecodealliance/componentize-js@$(COMPONENTIZE_JS_VERSION)'; \
	fi
	@if ! command -v dockerd >/dev/null || ! test -x /bin/busybox; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io busybox-static; \
	fi

test: setup
	cargo test --no-fail-fast

demo:
	cargo run --release -- run demo -- sh -c 'echo "holding $$CACHELOCK_LOCK (ticket $$CACHELOCK_TICKET, generation $$CACHELOCK_GENERATION)"'
