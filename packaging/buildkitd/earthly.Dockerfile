# Earthly's buildkitd image with cachelock in place of its dockerd-wrapper.sh: every
# `WITH DOCKER` of the builds it runs goes through cachelock's drop-in (docs/dockerd.md).
# From the repository's top directory:
#
#   make static
#   docker build -f packaging/buildkitd/earthly.Dockerfile -t buildkitd-cachelock .
#   earthly config global.buildkit_image buildkitd-cachelock   # or EARTHLY_BUILDKIT_IMAGE
#
# Earthly bind-mounts the wrapper into the build containers (whatever their distribution),
# so it must be the static binary, as a real file under this name.
ARG BUILDKITD_IMAGE=earthly/buildkitd:v0.8.16
FROM ${BUILDKITD_IMAGE}
ARG CACHELOCK_BINARY=target/x86_64-unknown-linux-musl/release/cachelock
COPY ${CACHELOCK_BINARY} /var/earthly/dockerd-wrapper.sh
