# EarthBuild's buildkitd image (the community fork of Earthly) with cachelock in place of its
# dockerd-wrapper.sh: every `WITH DOCKER` of the builds it runs goes through cachelock's drop-in
# (docs/dockerd.md). From the repository's top directory:
#
#   make static
#   docker build -f packaging/buildkitd/earthbuild.Dockerfile -t buildkitd-cachelock .
#   earth config global.buildkit_image buildkitd-cachelock
#
# EarthBuild bind-mounts the wrapper into the build containers (whatever their distribution),
# so it must be the static binary, as a real file under this name.
ARG BUILDKITD_IMAGE=earthbuild/buildkitd:v0.8.17
FROM ${BUILDKITD_IMAGE}
ARG CACHELOCK_BINARY=target/x86_64-unknown-linux-musl/release/cachelock
COPY ${CACHELOCK_BINARY} /var/earthbuild/dockerd-wrapper.sh
