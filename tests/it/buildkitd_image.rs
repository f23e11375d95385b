//! The buildkitd images of packaging/buildkitd: each Dockerfile, built by the tests' own real
//! dockerd on a local stand-in for `earthly/buildkitd` / `earthbuild/buildkitd` (no registry is
//! reachable: the base is `docker import`ed from a busybox-static root holding the stock
//! wrapper, as the other dockerd tests make their images), then used as Earthly and EarthBuild
//! use it: the wrapper is taken out of the image and bind-mounted into a build container
//! (here one holding dockerd, containerd, runc and the docker CLI, copied from the host with
//! their libraries), which runs it with the variables (Earthly) or flags (EarthBuild) they
//! pass. The drop-in starts dockerd inside the container, loads the image tarball, keeps the
//! cached root, and runs the command against its own daemon.
//!
//! The build container gets every capability the host's bounding set holds rather than
//! `--privileged` (this machine's bounding set lacks CAP_SYS_RESOURCE, which `--privileged`
//! asks for); its cgroups are then read-only, so the command inspects the inner daemon
//! (`docker info`, `docker images`) instead of starting containers in it.

use std::path::Path;
use std::process::Command;

use crate::support::dockerd::*;
use crate::support::util::static_binary;

/// Capability names by number (linux/capability.h), for `--cap-drop`.
const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// `docker run` options for a build container that may run dockerd: every capability this
/// process may hand on, no seccomp or AppArmor filter, unmasked /proc and /sys.
fn dind_options() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let mut opts = String::from(
        "--cap-add ALL --security-opt seccomp=unconfined --security-opt apparmor=unconfined --security-opt systempaths=unconfined",
    );
    for (i, name) in CAPS.iter().enumerate() {
        if bounding & (1 << i) == 0 {
            opts.push_str(&format!(" --cap-drop {name}"));
        }
    }
    opts
}

/// A root with busybox and `links` to it.
fn busybox_root(dir: &Path, links: &[&str]) {
    for d in ["bin", "etc", "tmp", "usr/bin", "usr/sbin"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for l in links {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(l)).unwrap();
    }
}

/// Copies the host's `program` into `root` at the same path, with the libraries it loads.
fn copy_with_libraries(root: &Path, program: &str) {
    let dest = |p: &str| root.join(p.trim_start_matches('/'));
    std::fs::create_dir_all(dest(program).parent().unwrap()).unwrap();
    std::fs::copy(program, dest(program)).unwrap();
    let ldd = Command::new("ldd").arg(program).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        std::fs::create_dir_all(dest(lib).parent().unwrap()).unwrap();
        std::fs::copy(lib, dest(lib)).unwrap();
    }
}

/// Builds `dockerfile` (packaging/buildkitd/...) on a stand-in base holding the stock wrapper
/// at `wrapper`, takes the wrapper back out of the image as Earthly's bind mount does, and
/// runs `call` (a `/bin/sh -c` line naming the wrapper) in a build container with the wrapper
/// mounted, dockerd inside, the data roots on a volume and the image tarball at /load/bb.tar.
/// Returns the output of the whole session.
fn build_and_run(env: &Env, dockerfile: &str, wrapper: &str, call: &str) -> std::process::Output {
    let base = env.path("base");
    busybox_root(&base, &["sh", "true"]);
    let stock = base.join(wrapper.trim_start_matches('/'));
    std::fs::create_dir_all(stock.parent().unwrap()).unwrap();
    std::fs::write(
        &stock,
        "#!/bin/sh\necho the stock wrapper ran >&2\nexit 3\n",
    )
    .unwrap();
    let build = env.path("build");
    busybox_root(
        &build,
        &[
            "sh", "echo", "cat", "ls", "mkdir", "rm", "true", "sed", "grep",
        ],
    );
    for p in [
        "/usr/sbin/dockerd",
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/usr/bin/docker",
    ] {
        copy_with_libraries(&build, p);
    }
    // The drop-in's settings in the build container: one dockerd, no host networking needed.
    std::fs::write(
        build.join("etc/cachelock.yaml"),
        "dockerd:\n  network: none\n",
    )
    .unwrap();
    let context = env.path("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::copy(static_binary(), context.join("cachelock")).unwrap();
    let dind = env.path("dind");
    std::fs::create_dir_all(&dind).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = format!(
        r#"set -e
tar -C {base} -c . | docker import - cl-test/buildkitd:base >/dev/null
tar -C {build} -c . | docker import - cl-test/build:1 >/dev/null
DOCKER_BUILDKIT=0 docker build -q -f {dockerfile} --build-arg BUILDKITD_IMAGE=cl-test/buildkitd:base \
    --build-arg CACHELOCK_BINARY=cachelock -t cl-test/buildkitd:cachelock {context} >/dev/null 2>&1
id=$(docker create cl-test/buildkitd:cachelock /bin/true)
docker cp "$id:{wrapper}" {out}/wrapper
docker rm "$id" >/dev/null
docker run --rm --network none {opts} -v {out}/wrapper:{wrapper}:ro -v {dind}:/var/earthly/dind \
    -v {tar}:/load/bb.tar:ro -e PATH=/usr/sbin:/usr/bin:/bin -e CACHELOCK_CONFIG=/etc/cachelock.yaml \
    cl-test/build:1 /bin/sh -c {call}"#,
        base = base.display(),
        build = build.display(),
        dockerfile = repo.join("packaging/buildkitd").join(dockerfile).display(),
        context = context.display(),
        out = env.dir.path().display(),
        opts = dind_options(),
        dind = dind.display(),
        tar = image_tar().display(),
        call = sh_quote(call),
    );
    let o = env.dockerd(&[], &script);
    // What the image holds under the wrapper's name is the static binary, byte for byte.
    if o.status.success() {
        let copied = std::fs::read(env.path("wrapper")).unwrap();
        assert!(
            copied == std::fs::read(static_binary()).unwrap(),
            "the image's wrapper is not cachelock"
        );
    }
    o
}

/// The command a build runs inside `WITH DOCKER`: it sees its own dockerd, with the loaded
/// image and the cached data root.
const INSIDE: &str = "docker info -f 'root={{.DockerRootDir}}' && docker images --format 'image={{.Repository}}:{{.Tag}}' && echo with-docker=$EARTHLY_WITH_DOCKER";

#[test]
fn the_earthly_image_runs_the_drop_in_with_earthlys_variables() {
    let env = Env::new("  network: none");
    // Earthly's line (earthfile2llb): VAR="value"... <wrapper> execute /bin/sh -c '<RUN>'.
    let call = format!(
        "EARTHLY_DOCKERD_DATA_ROOT=\"/var/earthly/dind/cache_app\" EARTHLY_DOCKERD_CACHE_DATA=\"true\" EARTHLY_DOCKER_LOAD_FILES=\"/load/bb.tar\" EARTHLY_IMAGES_WITH_DIGESTS=\"\" EARTHLY_START_COMPOSE=\"false\" EARTHLY_COMPOSE_FILES=\"\" EARTHLY_COMPOSE_SERVICES=\"\" /var/earthly/dockerd-wrapper.sh execute /bin/sh -c {}",
        sh_quote(INSIDE)
    );
    let o = build_and_run(
        &env,
        "earthly.Dockerfile",
        "/var/earthly/dockerd-wrapper.sh",
        &call,
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("root=/var/earthly/dind/cache_app\n"),
        "{}",
        text(&o)
    );
    assert!(out.contains("image=bb:1\n"), "{}", text(&o));
    assert!(out.contains("with-docker=1\n"), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cached data root /var/earthly/dind/cache_app"),
        "{}",
        text(&o)
    );
    assert!(!err.contains("stock wrapper"), "{}", text(&o));
    // The cached root stays on the volume, with cachelock's queue beside Earthly's lock file.
    assert!(
        env.path("dind/cache_app/.cachelock").is_dir(),
        "{}",
        text(&o)
    );
    assert!(
        env.path("dind/cache_app/.earthly-docker-lock").exists(),
        "{}",
        text(&o)
    );
    env.assert_clean();
}

#[test]
fn the_earthbuild_image_runs_the_drop_in_with_earthbuilds_flags() {
    let env = Env::new("  network: none");
    // EarthBuild's line: <wrapper> execute --flag='value'... -- /bin/sh -c '<RUN>'.
    let call = format!(
        "/var/earthbuild/dockerd-wrapper.sh execute --data-root='/var/earthly/dind/cache_eb' --cache-data --load-file='/load/bb.tar' -- /bin/sh -c {}",
        sh_quote(&INSIDE.replace("EARTHLY_WITH_DOCKER", "EARTH_WITH_DOCKER"))
    );
    let o = build_and_run(
        &env,
        "earthbuild.Dockerfile",
        "/var/earthbuild/dockerd-wrapper.sh",
        &call,
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("root=/var/earthly/dind/cache_eb\n"),
        "{}",
        text(&o)
    );
    assert!(out.contains("image=bb:1\n"), "{}", text(&o));
    assert!(out.contains("with-docker=1\n"), "{}", text(&o));
    assert!(
        env.path("dind/cache_eb/.cachelock").is_dir(),
        "{}",
        text(&o)
    );
    env.assert_clean();
}
