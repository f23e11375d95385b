//! dockerd lifecycle for `cachelock dockerd`.
