#!/usr/bin/env bash
# Run the daemon on a real cgroup v2 host: a Debian 12 VM under qemu (TCG), booted from a
# debootstrap rootfs, that runs scripts/cgroup2-vm-checks.sh at boot and powers off.
#
#   scripts/cgroup2-vm.sh                 # kernel 6.1 (bookworm)
#   scripts/cgroup2-vm.sh --kernel 6.12   # kernel 6.12 (bookworm-backports)
#   options: --timeout SECONDS (whole VM run, default 1500), --memory MiB (default 2048)
#
# As root, on a Debian bookworm host (see shared CGROUP2-VM.md for why it works this way).
# Caches under target/vm/: qemu/ (unpacked bookworm qemu), rootfs-6.1/, rootfs-6.12/.
# Every run copies in the daemon binary fresh (target/release if built, else target/debug),
# runtimes.toml, the checks script and deploy/systemd/mixed-docker-executor.service, builds a
# new image, boots it, prints the checks' PASS/FAIL lines, and exits 1 if any FAIL (2 when
# the VM produced no results). Logs of the run land in target/vm/run-KERNEL/.
# Never runs cargo: build the binary first.
set -euo pipefail

KERNEL=6.1
VM_TIMEOUT=1500
VM_MEMORY=2048
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel) KERNEL="$2"; shift 2 ;;
        --timeout) VM_TIMEOUT="$2"; shift 2 ;;
        --memory) VM_MEMORY="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 64 ;;
    esac
done
case "$KERNEL" in
    6.1|6.12) ;;
    *) echo "--kernel must be 6.1 or 6.12" >&2; exit 64 ;;
esac

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VM="$REPO/target/vm"
QEMU_DIR="$VM/qemu"
ROOTFS="$VM/rootfs-$KERNEL"
RUN="$VM/run-$KERNEL"
IMG="$RUN/vm.img"
START=$(date +%s)

log() { echo "[cgroup2-vm $(( $(date +%s) - START ))s] $*" >&2; }
die() { log "error: $*"; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mkfs -d need it)"
mkdir -p "$VM" "$RUN"

# --- host tools ---------------------------------------------------------------------------
need_pkgs=()
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || need_pkgs+=(e2fsprogs)
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    log "installing ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# The Debian mirror the host's apt uses (deb822 .sources or one-line .list entries).
mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(awk '
            /^[[:space:]]*#/ { next }
            /^URIs:/ { u = $2 }
            /^Suites:/ && u != "" { for (i = 2; i <= NF; i++) if ($i == "bookworm") { print u; exit } }
            /^[[:space:]]*$/ { u = "" }
            /^deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { if ($(i+1) == "bookworm") { print $i; exit } break } }
        ' "$f")
        if [ -n "$uri" ]; then echo "${uri%/}"; return; fi
    done
    echo "http://deb.debian.org/debian"
}
MIRROR=$(mirror)
log "mirror: $MIRROR"

# --- qemu: bookworm's packages, unpacked, never installed ------------------------------------
QEMU_BIN="$QEMU_DIR/root/usr/bin/qemu-system-x86_64"
qemu_env() {
    LD_LIBRARY_PATH="$QEMU_DIR/root/usr/lib/x86_64-linux-gnu:$QEMU_DIR/root/lib/x86_64-linux-gnu" "$@"
}
fetch_qemu() {
    log "fetching qemu (bookworm packages, unpacked into $QEMU_DIR)"
    rm -rf "$QEMU_DIR"
    mkdir -p "$QEMU_DIR/debs" "$QEMU_DIR/root"
    apt-get update -qq || true
    # The packages, and every library they depend on that the host lacks (transitively).
    local queue=(qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu)
    local -A seen=()
    local want=() p dep
    while [ ${#queue[@]} -gt 0 ]; do
        p=${queue[0]}; queue=("${queue[@]:1}")
        [ -n "${seen[$p]:-}" ] && continue
        seen[$p]=1
        case "$p" in
            qemu-system-x86|qemu-system-common|qemu-system-data|seabios|ipxe-qemu) ;;
            *) if dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
                   continue
               fi ;;
        esac
        want+=("$p")
        while read -r dep; do
            [ -n "$dep" ] && queue+=("$dep")
        done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                    --no-replaces --no-enhances "$p" 2>/dev/null |
                 awk '/^  (\|)?Depends: [^<]/ { print $2 }' | sed 's/:any$//')
    done
    log "downloading ${#want[@]} packages: ${want[*]}"
    (cd "$QEMU_DIR/debs" && apt-get download "${want[@]}" >/dev/null)
    for deb in "$QEMU_DIR"/debs/*.deb; do
        dpkg -x "$deb" "$QEMU_DIR/root"
    done
    local missing
    missing=$(qemu_env ldd "$QEMU_BIN" | grep 'not found' || true)
    [ -z "$missing" ] || die "qemu libraries missing: $missing"
    qemu_env "$QEMU_BIN" --version | head -1 > "$QEMU_DIR/.done"
}
[ -s "$QEMU_DIR/.done" ] && [ -x "$QEMU_BIN" ] || fetch_qemu
log "qemu: $(cat "$QEMU_DIR/.done")"

# --- root filesystem ----------------------------------------------------------------------
INCLUDE=systemd,systemd-sysv,linux-image-amd64,bubblewrap,python3,procps,curl,ca-certificates,e2fsprogs,psmisc
configure_rootfs() {
    local r="$1"
    echo cgroup2-vm > "$r/etc/hostname"
    printf '127.0.0.1 localhost cgroup2-vm\n::1 localhost\n' > "$r/etc/hosts"
    echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' > "$r/etc/fstab"
    # Boot fast and quietly: nothing here needs the network, timers or a login prompt.
    local u
    for u in systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
             man-db.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
             dpkg-db-backup.timer logrotate.timer serial-getty@ttyS0.service \
             getty@tty1.service systemd-networkd-wait-online.service; do
        ln -sf /dev/null "$r/etc/systemd/system/$u"
    done
    mkdir -p "$r/etc/systemd/system/multi-user.target.wants"
    cat > "$r/etc/systemd/system/cgroup2-vm-checks.service" <<'EOF'
[Unit]
Description=cgroup v2 checks of mixed-docker-executor (then power off)
After=multi-user.target
Wants=multi-user.target

[Service]
Type=oneshot
TimeoutStartSec=1200
# The checks run daemons whose submissions are OOM-killed on purpose; with systemd's default
# (stop) the first such kill in this unit's cgroup tree would stop the checks themselves.
OOMPolicy=continue
StandardOutput=journal+console
StandardError=journal+console
ExecStart=/bin/sh -c 'mkdir -p /var/lib/cgroup2-vm; /usr/local/sbin/cgroup2-vm-checks > /var/lib/cgroup2-vm/results.txt 2> /var/lib/cgroup2-vm/checks-stderr.txt; echo "exit=$$?" >> /var/lib/cgroup2-vm/results.txt; sync; echo ===RESULTS===; cat /var/lib/cgroup2-vm/results.txt; echo ===END==='
ExecStopPost=/bin/sh -c 'sync; systemctl --no-block poweroff'

[Install]
WantedBy=multi-user.target
EOF
    ln -sf /etc/systemd/system/cgroup2-vm-checks.service \
        "$r/etc/systemd/system/multi-user.target.wants/cgroup2-vm-checks.service"
}
build_rootfs_61() {
    local r="$VM/rootfs-6.1"
    log "debootstrap bookworm into $r (a few minutes)"
    rm -rf "$r.partial"
    debootstrap --include="$INCLUDE" bookworm "$r.partial" "$MIRROR" > "$VM/debootstrap-6.1.log" 2>&1 ||
        die "debootstrap failed: see $VM/debootstrap-6.1.log"
    configure_rootfs "$r.partial"
    rm -f "$r.partial"/var/cache/apt/archives/*.deb
    rm -rf "$r"
    mv "$r.partial" "$r"
    touch "$r/.mde-rootfs-done"
}
build_rootfs_612() {
    local r="$VM/rootfs-6.12"
    log "copying rootfs-6.1 and installing the bookworm-backports kernel into $r"
    rm -rf "$r.partial"
    cp -a "$VM/rootfs-6.1" "$r.partial"
    rm -f "$r.partial/.mde-rootfs-done"
    echo "deb $MIRROR bookworm-backports main" > "$r.partial/etc/apt/sources.list.d/backports.list"
    cp /etc/resolv.conf "$r.partial/etc/resolv.conf" 2>/dev/null || true
    mount -t proc proc "$r.partial/proc"
    local rc=0
    chroot "$r.partial" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports linux-image-amd64' \
        > "$VM/backports-6.12.log" 2>&1 || rc=$?
    umount "$r.partial/proc"
    [ $rc = 0 ] || die "installing the backports kernel failed: see $VM/backports-6.12.log"
    rm -f "$r.partial"/var/cache/apt/archives/*.deb
    rm -rf "$r"
    mv "$r.partial" "$r"
    touch "$r/.mde-rootfs-done"
}
[ -e "$VM/rootfs-6.1/.mde-rootfs-done" ] || build_rootfs_61
if [ "$KERNEL" = 6.12 ] && [ ! -e "$VM/rootfs-6.12/.mde-rootfs-done" ]; then build_rootfs_612; fi

VMLINUZ=$(ls "$ROOTFS"/boot/vmlinuz-"$KERNEL".* 2>/dev/null | sort -V | tail -1 || true)
[ -n "$VMLINUZ" ] || die "no vmlinuz-$KERNEL.* in $ROOTFS/boot"
KVER=${VMLINUZ##*/vmlinuz-}
INITRD="$ROOTFS/boot/initrd.img-$KVER"
[ -r "$INITRD" ] || die "no $INITRD"
log "kernel $KVER"

# --- this run's files ---------------------------------------------------------------------
BIN="$REPO/target/release/mixed-docker-executor"
[ -x "$BIN" ] || BIN="$REPO/target/debug/mixed-docker-executor"
[ -x "$BIN" ] || die "no daemon binary: build it first (cargo build --release)"
log "daemon binary: $BIN ($(stat -c '%y' "$BIN" | cut -d. -f1))"
install -D -m 0755 "$BIN" "$ROOTFS/usr/local/bin/mixed-docker-executor"
install -D -m 0644 "$REPO/runtimes.toml" "$ROOTFS/etc/mixed-docker-executor/runtimes.toml"
[ -e "$ROOTFS/etc/mixed-docker-executor/config.toml" ] ||
    printf '# Settings for mixed-docker-executor (README "Configuration"); MDE_* variables win.\n' \
        > "$ROOTFS/etc/mixed-docker-executor/config.toml"
install -D -m 0755 "$REPO/scripts/cgroup2-vm-checks.sh" "$ROOTFS/usr/local/sbin/cgroup2-vm-checks"
install -D -m 0644 "$REPO/deploy/systemd/mixed-docker-executor.service" \
    "$ROOTFS/usr/local/share/mixed-docker-executor/mixed-docker-executor.service"
# What the last run installed or left must not leak into this one.
rm -rf "$ROOTFS/var/lib/cgroup2-vm" "$ROOTFS/etc/systemd/system/mixed-docker-executor.service"

log "making the image"
rm -f "$IMG"
mkfs.ext4 -q -F -L root -d "$ROOTFS" "$IMG" 6G >/dev/null

# --- boot -----------------------------------------------------------------------------------
log "booting (TCG, timeout ${VM_TIMEOUT}s); console: $RUN/console.log"
rc=0
qemu_env timeout --kill-after=10 "$VM_TIMEOUT" "$QEMU_BIN" \
    -L "$QEMU_DIR/root/usr/share/qemu" -L "$QEMU_DIR/root/usr/share/seabios" \
    -accel tcg -m "$VM_MEMORY" -smp 2 \
    -kernel "$VMLINUZ" -initrd "$INITRD" \
    -append "root=/dev/vda rw console=ttyS0 systemd.unified_cgroup_hierarchy=1 systemd.show_status=0" \
    -drive file="$IMG",format=raw,if=virtio -nographic -nic none -no-reboot \
    < /dev/null > "$RUN/console.log" 2>&1 || rc=$?
[ $rc = 0 ] || log "qemu exited with $rc (124: the timeout)"

# --- results --------------------------------------------------------------------------------
rm -rf "$RUN/out"
mkdir -p "$RUN/out"
debugfs -R "rdump /var/lib/cgroup2-vm $RUN/out" "$IMG" >/dev/null 2>&1 || true
RESULTS="$RUN/out/cgroup2-vm/results.txt"
if [ ! -s "$RESULTS" ]; then
    # Fall back to what reached the serial console.
    sed -n '/===RESULTS===/,/===END===/p' "$RUN/console.log" | sed '1d;$d' | tr -d '\r' > "$RUN/results.txt"
    RESULTS="$RUN/results.txt"
fi
log "done in $(( $(date +%s) - START ))s; logs in $RUN/out/cgroup2-vm/"
if [ ! -s "$RESULTS" ]; then
    log "no results: the VM did not finish the checks (tail of the console follows)"
    tail -40 "$RUN/console.log" >&2
    exit 2
fi
echo "== kernel $KVER, binary $(basename "$(dirname "$BIN")") =="
cat "$RESULTS"
if grep -q '^FAIL' "$RESULTS"; then exit 1; fi
grep -q '^PASS' "$RESULTS" || exit 2
exit 0
