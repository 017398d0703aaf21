# mixed-docker-executor: the daemon plus the toolchains of the runtimes in runtimes.toml.
#
# Build:  docker build -t mixed-docker-executor .                      # full: every runtime
#         docker build --target slim -t mixed-docker-executor:slim .    # python3 only
# Run (see docker/README.md for what each flag is for and what is lost without it):
#
#   docker run --rm -p 8000:8000 \
#     --security-opt seccomp=docker/seccomp-bwrap.json \
#     --security-opt apparmor=unconfined \
#     --security-opt systempaths=unconfined \
#     --cap-add SYS_ADMIN \
#     --cgroupns=host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
#     --stop-timeout 30 \
#     -v "$(pwd)/host_code:/srv/mixed-docker-executor/host_code:ro" \
#     mixed-docker-executor
#
# Development only, no isolation at all (the daemon warns in its log and in /health):
#
#   docker run --rm -p 8000:8000 -e MDE_SANDBOX__BACKEND=process mixed-docker-executor
#
# Built and run with podman (runc) as docker/README.md says; the same flags work with docker.

# ---------------------------------------------------------------------------------------
# Build stage: the official Rust image (Debian bookworm, current stable Rust; the crate
# needs edition 2024, and naked functions, i.e. Rust >= 1.88, newer than Debian's rustc).
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
    && cp target/release/mixed-docker-executor target/release/libmixed_docker_executor.so /

# ---------------------------------------------------------------------------------------
# `slim`: the daemon, bubblewrap and python3 (the default runtime) only. The other
# runtimes of runtimes.toml are listed as unavailable (not installed) in
# /api/v1/runtimes, and requests for them get 422 runtime_unavailable.
# ---------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bubblewrap \
        ca-certificates \
        python3 \
    && rm -rf /var/lib/apt/lists/*

# The binary keeps its name: the per-slot launchers re-execute it by that name.
COPY --from=build /mixed-docker-executor /usr/local/bin/mixed-docker-executor
# The fork-server library python's zygotes load; the daemon looks for it next to itself.
COPY --from=build /libmixed_docker_executor.so /usr/local/bin/libmixed_docker_executor.so
COPY runtimes.toml /etc/mixed-docker-executor/runtimes.toml
# The operator's files live outside every path the sandbox binds (/usr, a few files of
# /etc, the runtimes' own `ro_binds`): not /usr/src/app as in the original service, where
# every submission could list and read them. host_code is usually a bind mount over this
# copy of the examples; tests/container_setup.rs checks a file there is invisible to a run.
COPY host_code/ /srv/mixed-docker-executor/host_code/
WORKDIR /srv/mixed-docker-executor

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
# --privileged would grant all of this and much more; it is not needed. Without them the
# daemon refuses to start and names the missing permission and the flag that grants it.

EXPOSE 8000

# No curl in the slim image: python3 (installed for the python runtime) does the request.
# urlopen raises on a non-2xx answer or a refused connection, so the exit code says it all.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# SIGTERM (docker stop) starts the drain: /ready turns 503, new submissions get 503
# shutting_down with Retry-After, in-flight executions get MDE_SERVER__SHUTDOWN_GRACE_SECONDS
# (15 by default), then what is left is killed and the daemon removes its slot cgroups and
# tmpfs mounts. Docker's default stop timeout is 10 s, hence --stop-timeout 30.
STOPSIGNAL SIGTERM
CMD ["mixed-docker-executor"]

# ---------------------------------------------------------------------------------------
# `full` (the default target): slim plus the toolchains of every runtime in runtimes.toml,
# from Debian bookworm's packages.
# ---------------------------------------------------------------------------------------
FROM slim AS full

# The slim image drops /usr/share/man; openjdk's postinst registers man pages with
# update-alternatives and fails without the directory.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
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
