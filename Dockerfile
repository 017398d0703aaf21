# mixed-docker-executor: the daemon plus the toolchains of the runtimes in runtimes.toml.
#
# Build:  docker build -t mixed-docker-executor .
# Run (see docker/README.md for what each flag is for and what is lost without it):
#
#   docker run --rm -p 8000:8000 \
#     --security-opt seccomp=docker/seccomp-bwrap.json \
#     --security-opt apparmor=unconfined \
#     --security-opt systempaths=unconfined \
#     --cap-add SYS_ADMIN \
#     --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
#     --stop-timeout 20 \
#     -v "$(pwd)/host_code:/usr/src/app/host_code" \
#     mixed-docker-executor
#
# Development only, no isolation at all (the daemon warns in its log and in /health):
#
#   docker run --rm -p 8000:8000 -e MDE_SANDBOX__BACKEND=process mixed-docker-executor
#
# Written without a Docker engine to build or run it: see docker/README.md.

# ---------------------------------------------------------------------------------------
# Build stage: the official Rust image (Debian bookworm, current stable Rust; the crate
# needs edition 2024, i.e. Rust >= 1.85, newer than Debian's rustc).
# ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /build

# Dependencies first, against placeholder sources, so that editing src/ does not rebuild
# every crate from crates.io. The placeholders are removed before the real build.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# COPY keeps the build context's modification times, which can be older than the
# placeholder build: touch the crate roots so cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/mixed-docker-executor /mixed-docker-executor

# ---------------------------------------------------------------------------------------
# Runtime stage: bubblewrap and the toolchains, from Debian bookworm's packages.
# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim

# The slim image drops /usr/share/man; openjdk's postinst registers man pages with
# update-alternatives and fails without the directory.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bubblewrap \
        ca-certificates \
        python3 \
        nodejs \
        bash \
        perl \
        ruby \
        php-cli \
        lua5.4 \
        gcc \
        g++ \
        libc6-dev \
        default-jdk-headless \
        rustc \
        golang-go \
    && rm -rf /var/lib/apt/lists/*

# The binary keeps its name: the per-slot launchers re-execute it by that name.
COPY --from=build /mixed-docker-executor /usr/local/bin/mixed-docker-executor
COPY runtimes.toml /etc/mixed-docker-executor/runtimes.toml
# As in the original service, code lives in /usr/src/app/host_code (usually a bind mount
# over this copy of the examples).
COPY host_code/ /usr/src/app/host_code/
WORKDIR /usr/src/app

# Listen on every interface of the container (the daemon's own default is 127.0.0.1),
# and read the runtimes file installed above (it is reloaded on SIGHUP or when it changes).
ENV MDE_SERVER__HOST=0.0.0.0 \
    MDE_RUNTIMES__FILE=/etc/mixed-docker-executor/runtimes.toml

# No USER line: the daemon runs as root inside the container on purpose. It never runs
# submissions as root: each execution slot runs as its own unprivileged uid (61000 + N,
# MDE_SANDBOX__UID_BASE), inside bubblewrap's user, pid, net, mount, ipc, uts and cgroup
# namespaces with every capability dropped. Root is what lets the daemon
#   - setuid()/setgid() to those per-slot uids (so one submission cannot signal, ptrace or
#     read another's files),
#   - mount a size-limited tmpfs per slot for /box and /tmp (needs CAP_SYS_ADMIN too:
#     --cap-add SYS_ADMIN),
#   - create per-slot memory cgroups (needs a writable cgroup hierarchy:
#     --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw).
# Run as non-root, it still starts but shares one uid across slots, limits memory by
# RLIMIT_AS only and does not size the work dir; /health lists each of these as a warning.
#
# bubblewrap additionally needs, from Docker: a seccomp profile that allows unshare,
# clone with namespace flags, mount, umount2, pivot_root and sethostname
# (--security-opt seccomp=docker/seccomp-bwrap.json), no docker-default AppArmor profile,
# which denies mount (--security-opt apparmor=unconfined), and an unmasked /proc, or the
# kernel refuses the sandbox's own /proc mount (--security-opt systempaths=unconfined).
# --privileged would grant all of this and much more; it is not needed.

EXPOSE 8000

# No curl in the slim image: python3 (installed for the python runtime) does the request.
# urlopen raises on a non-2xx answer or a refused connection, so the exit code says it all.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# SIGTERM (docker stop) starts a graceful shutdown: in-flight executions get up to
# MDE_SERVER__SHUTDOWN_GRACE_SECONDS (15 by default), then the daemon removes its slot
# cgroups and tmpfs mounts. Docker's default stop timeout is 10 s, hence --stop-timeout 20.
CMD ["mixed-docker-executor"]
