#!/usr/bin/env bash
# Checks of mixed-docker-executor on a cgroup v2 host, run inside the VM that
# scripts/cgroup2-vm.sh boots (as root, systemd as pid 1, unified hierarchy).
# Prints one line per check: `PASS name` or `FAIL name: detail`, and `INFO name: ...` for
# the numbers behind them. Every wait is bounded. Daemon logs go to $OUT (default
# /var/lib/cgroup2-vm), which the host reads back from the image.
#
# Expects: /usr/local/bin/mixed-docker-executor, /etc/mixed-docker-executor/runtimes.toml,
# /usr/local/share/mixed-docker-executor/mixed-docker-executor.service, curl, python3.
set -u

BIN=/usr/local/bin/mixed-docker-executor
ETC=/etc/mixed-docker-executor
UNIT_SRC=/usr/local/share/mixed-docker-executor/mixed-docker-executor.service
OUT=${OUT:-/var/lib/cgroup2-vm}
CG=/sys/fs/cgroup
mkdir -p "$OUT"

FAILS=0
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1: $2"; FAILS=$((FAILS + 1)); }
info() { echo "INFO $1: $2"; }
check() { # check NAME CONDITION-RESULT(0/1) DETAIL
    if [ "$2" = 0 ]; then pass "$1"; else fail "$1" "$3"; fi
}

# json FILE EXPR: evaluate a python expression on the JSON in FILE (as `j`); prints "" on error.
json() {
    python3 -c 'import json,sys
try:
    j = json.load(open(sys.argv[1]))
    v = eval(sys.argv[2])
    print(json.dumps(v) if isinstance(v, (dict, list)) else v)
except Exception as e:
    print("")' "$1" "$2"
}

# body_v1 CODE [LIMITS-JSON]: an /api/v1/execute request for python3.
body_v1() {
    python3 -c 'import json,sys
b = {"runtime": "python3", "code": sys.argv[1]}
if len(sys.argv) > 2 and sys.argv[2]:
    b["limits"] = json.loads(sys.argv[2])
print(json.dumps(b))' "$@"
}

# post PORT PATH BODY OUTFILE [MAXTIME]: POST JSON; prints the HTTP status.
post() {
    curl -s -o "$4" -w '%{http_code}' --max-time "${5:-60}" -X POST \
        -H 'Content-Type: application/json' --data-binary "$3" "http://127.0.0.1:$1$2" || echo 000
}

# execute PORT CODE LIMITS OUTFILE: run python code via /api/v1/execute.
execute() {
    post "$1" /api/v1/execute "$(body_v1 "$2" "$3")" "$4" 120 >/dev/null
}

# wait_health PORT SECONDS: until /health answers.
wait_health() {
    local i
    for i in $(seq 1 "$2"); do
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1/health" && return 0
        sleep 1
    done
    return 1
}

# wait_ready PORT SECONDS: until /ready says 200 (the default runtime can run).
wait_ready() {
    local i
    for i in $(seq 1 "$2"); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$1/ready")" = 200 ] && return 0
        sleep 1
    done
    return 1
}

# wait_gone PID SECONDS
wait_gone() {
    local i
    for i in $(seq 1 $(( $2 * 5 ))); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.2
    done
    return 1
}

# start_daemon NAME PORT [VAR=VALUE...]: start a daemon in the background; sets DPID.
start_daemon() {
    local name=$1 port=$2
    shift 2
    (cd "$ETC" && exec env MDE_SERVER__PORT="$port" "$@" "$BIN" --config "$ETC/config.toml") \
        > "$OUT/daemon-$name.log" 2>&1 &
    DPID=$!
}

# stop_daemon PID: SIGTERM and wait (bounded), SIGKILL as a last resort.
stop_daemon() {
    kill -TERM "$1" 2>/dev/null
    if ! wait_gone "$1" 40; then
        kill -KILL "$1" 2>/dev/null
        wait_gone "$1" 10
        return 1
    fi
    return 0
}

# What a daemon leaves: mde-* cgroups, slot launchers, slot-uid processes, mounts, work roots.
leftovers() {
    local l=""
    local cgs
    cgs=$(find "$CG" -mindepth 1 -type d -name 'mde-*' 2>/dev/null | sed "s|^$CG||" | tr '\n' ' ')
    [ -n "$cgs" ] && l="$l cgroups:[$cgs]"
    local procs
    procs=$(ps -eo pid=,uid=,args= | awk '$2 >= 61000 && $2 < 61100 || /__slot-launcher|__stage-exec/ && !/awk/ { printf "%s(%s) ", $1, $3 }')
    [ -n "$procs" ] && l="$l procs:[$procs]"
    local mounts
    mounts=$(awk '$2 ~ /\/mde-/ { printf "%s ", $2 }' /proc/mounts)
    [ -n "$mounts" ] && l="$l mounts:[$mounts]"
    local roots
    roots=$(ls -d /tmp/mde-* 2>/dev/null | tr '\n' ' ')
    [ -n "$roots" ] && l="$l workroots:[$roots]"
    echo "$l"
}

slot_cgroups() {
    find "$CG" -mindepth 2 -type d -name 'slot-*' 2>/dev/null | sed "s|^$CG||" | sort
}

info kernel "$(uname -r)"
info cgroup "$(stat -fc %T $CG) controllers=[$(cat $CG/cgroup.controllers)] root.subtree_control=[$(cat $CG/cgroup.subtree_control)] self=$(sed -n 's/^0:://p' /proc/self/cgroup)"
info mount "$(awk '$2 == "/sys/fs/cgroup" { print $3, $4 }' /proc/mounts)"
info binary "$("$BIN" --version 2>&1 | head -1) $(stat -c %s "$BIN") bytes"

# ---------------------------------------------------------------------------------------------
# 1. start-up and /health
start_daemon main 8101 MDE_EXECUTION__MAX_CONCURRENT=2
MAIN=$DPID
if wait_health 8101 90; then
    curl -s --max-time 10 http://127.0.0.1:8101/health > "$OUT/health-main.json"
    mem=$(json "$OUT/health-main.json" 'j["memory_enforcement"]')
    info health "$(cat "$OUT/health-main.json")"
    json "$OUT/health-main.json" '"\n".join(j["warnings"])' | while read -r w; do
        [ -n "$w" ] && info health-warning "$w"
    done
    check daemon-health-v2 "$([ "$mem" = "memory cgroup (v2)" ]; echo $?)" "memory_enforcement is '$mem'"
    info slot-cgroups "$(slot_cgroups | tr '\n' ' ')"
else
    fail daemon-health-v2 "no /health within 90 s; log: $(tail -5 "$OUT/daemon-main.log" | tr '\n' ' ')"
fi
wait_ready 8101 120 || fail daemon-ready "/ready not 200 within 120 s: $(curl -s --max-time 5 http://127.0.0.1:8101/ready)"

# 2. hello world, the original contract
code=$(post 8101 /submit_code '{"code": "print(\"Hello from FastAPI!\")"}' "$OUT/hello.json")
st=$(json "$OUT/hello.json" 'j["status"]')
outp=$(json "$OUT/hello.json" 'j["output"]')
check submit-code-hello "$([ "$code" = 200 ] && [ "$st" = success ] && [ "$outp" = "Hello from FastAPI!" ]; echo $?)" \
    "HTTP $code: $(head -c 400 "$OUT/hello.json")"

# 3. memory bomb under 64 MiB
execute 8101 'a = []
while True:
    a.append(bytearray(b"x" * (1 << 20)))' '{"memory_bytes": 67108864, "wall_time_ms": 20000}' "$OUT/membomb.json"
st=$(json "$OUT/membomb.json" 'j["run"]["status"]')
peak=$(json "$OUT/membomb.json" 'j["run"].get("peak_memory_bytes")')
check memory-bomb-64MiB "$([ "$st" = memory_limit ]; echo $?)" "run.status '$st': $(head -c 400 "$OUT/membomb.json")"
info memory-bomb-64MiB "status=$st peak_memory_bytes=$peak"

# 4. CPU limit: a spinner with 1 s of CPU
execute 8101 'while True: pass' '{"cpu_time_ms": 1000, "wall_time_ms": 30000}' "$OUT/spin.json"
st=$(json "$OUT/spin.json" 'j["run"]["status"]')
lim=$(json "$OUT/spin.json" 'j["run"].get("limit")')
cpu=$(json "$OUT/spin.json" 'j["run"].get("cpu_time_ms")')
wall=$(json "$OUT/spin.json" 'j["run"].get("wall_time_ms")')
check cpu-limit-1s "$([ "$st" = timeout ] && [ "$lim" = cpu_time ]; echo $?)" \
    "status '$st' limit '$lim': $(head -c 400 "$OUT/spin.json")"
info cpu-limit-1s "status=$st limit=$lim cpu_time_ms=$cpu wall_time_ms=$wall"

# 5. fork limit: processes 10
execute 8101 'import os, time
n = 0
try:
    for i in range(40):
        if os.fork() == 0:
            time.sleep(2)
            os._exit(0)
        n += 1
    print("forked", n)
except OSError as e:
    print("refused", n, e.errno)' '{"processes": 10, "wall_time_ms": 20000}' "$OUT/fork.json"
o=$(json "$OUT/fork.json" 'j["run"]["stdout"].strip()')
n=$(echo "$o" | awk '$1 == "refused" { print $2 }')
check fork-limit-10 "$([ -n "$n" ] && [ "$n" -le 9 ]; echo $?)" "stdout '$o': $(head -c 400 "$OUT/fork.json")"
info fork-limit-10 "$o"

# 6. two concurrent runs
cpids=""
for k in 1 2; do
    execute 8101 "import time
time.sleep(1.5)
print('run $k')" '{"wall_time_ms": 30000}' "$OUT/concurrent-$k.json" &
    cpids="$cpids $!"
done
for j in $cpids; do wait "$j"; done
s1=$(json "$OUT/concurrent-1.json" 'j["run"]["status"]')
s2=$(json "$OUT/concurrent-2.json" 'j["run"]["status"]')
w1=$(json "$OUT/concurrent-1.json" 'j["run"]["wall_time_ms"]')
w2=$(json "$OUT/concurrent-2.json" 'j["run"]["wall_time_ms"]')
check two-concurrent-runs "$([ "$s1" = ok ] && [ "$s2" = ok ]; echo $?)" \
    "statuses '$s1' '$s2': $(head -c 200 "$OUT/concurrent-1.json") | $(head -c 200 "$OUT/concurrent-2.json")"
info two-concurrent-runs "wall_time_ms $w1 and $w2"

# 7. cleanup after SIGTERM
if stop_daemon "$MAIN"; then
    sleep 1
    l=$(leftovers)
    check cleanup-after-sigterm "$([ -z "$l" ]; echo $?)" "left:$l"
else
    fail cleanup-after-sigterm "the daemon did not exit within 40 s of SIGTERM; left:$(leftovers)"
fi

# ---------------------------------------------------------------------------------------------
# 8. per-run peak memory in one slot: small, 150 MiB, small
start_daemon peak 8102 MDE_EXECUTION__MAX_CONCURRENT=1
PEAK=$DPID
if wait_ready 8102 120; then
    small='print(sum(range(1000)))'
    big='b = b"x" * (150 << 20)
print(len(b))'
    execute 8102 "$small" '{"wall_time_ms": 20000}' "$OUT/peak-1.json"
    execute 8102 "$big" '{"memory_bytes": 268435456, "wall_time_ms": 30000}' "$OUT/peak-2.json"
    execute 8102 "$small" '{"wall_time_ms": 20000}' "$OUT/peak-3.json"
    p1=$(json "$OUT/peak-1.json" 'j["run"].get("peak_memory_bytes")')
    p2=$(json "$OUT/peak-2.json" 'j["run"].get("peak_memory_bytes")')
    p3=$(json "$OUT/peak-3.json" 'j["run"].get("peak_memory_bytes")')
    s2=$(json "$OUT/peak-2.json" 'j["run"]["status"]')
    f=$(find "$CG" -path '*mde-*/slot-0/memory.peak' | head -1)
    resettable=no
    [ -n "$f" ] && (echo 0 > "$f") 2>/dev/null && resettable=yes
    info per-run-peak "peak_memory_bytes: small=$p1 big=$p2 (status $s2) small-after=$p3; writing memory.peak (reset) accepted: $resettable"
    # 6.12's reset is per open file: only reads through the descriptor that wrote see it.
    [ -n "$f" ] && info memory.peak-semantics "$(python3 -c 'import os,sys
f = sys.argv[1]
fresh = open(f).read().strip()
fd = os.open(f, os.O_RDWR)
try:
    os.write(fd, b"reset")
    same = os.pread(fd, 64, 0).decode().strip()
except OSError as e:
    same = "write refused: " + e.strerror
print("fresh open reads", fresh, "| after writing reset, the same fd reads", same, "| a new open reads", open(f).read().strip())' "$f" 2>&1)"
    ok=1
    if [ -n "$p2" ] && [ -n "$p3" ] && [ "$s2" = ok ] && [ "$p2" -ge $((140 << 20)) ] && [ "$p3" -lt $((100 << 20)) ]; then ok=0; fi
    check per-run-peak-memory "$ok" "third run's peak_memory_bytes=$p3 after a 150 MiB run (peak $p2, status $s2); first run $p1"
else
    fail per-run-peak-memory "daemon not ready within 120 s: $(tail -5 "$OUT/daemon-peak.log" | tr '\n' ' ')"
fi

# ---------------------------------------------------------------------------------------------
# 9. SIGKILL, then a new daemon sweeps the old one's leftovers
OLD_CG=$(find "$CG" -mindepth 1 -maxdepth 3 -type d -name 'mde-*' | head -1)
kill -KILL "$PEAK"
wait_gone "$PEAK" 10
sleep 1
info after-sigkill "left:$(leftovers)"
start_daemon sweep 8103 MDE_EXECUTION__MAX_CONCURRENT=1
SWEEP=$DPID
if wait_health 8103 90; then
    sleep 1
    stale=""
    [ -n "$OLD_CG" ] && [ -d "$OLD_CG" ] && stale="$stale old cgroup ${OLD_CG#$CG} still there;"
    ls -d /tmp/mde-* 2>/dev/null | while read -r d; do
        [ "$(cat "$d/owner.pid" 2>/dev/null)" = "$SWEEP" ] || echo "$d"
    done > "$OUT/stale-roots"
    [ -s "$OUT/stale-roots" ] && stale="$stale old work roots: $(tr '\n' ' ' < "$OUT/stale-roots");"
    oldprocs=$(ps -eo pid=,ppid=,args= | awk -v new="$SWEEP" '/__slot-launcher/ && !/awk/ && $2 != new { print $1 }' | tr '\n' ' ')
    [ -n "$oldprocs" ] && stale="$stale old launchers: $oldprocs;"
    check sweep-after-sigkill "$([ -z "$stale" ]; echo $?)" "$stale (old cgroup was ${OLD_CG#$CG})"
    if stop_daemon "$SWEEP"; then
        sleep 1
        l=$(leftovers)
        check cleanup-after-restart-sigterm "$([ -z "$l" ]; echo $?)" "left:$l"
    else
        fail cleanup-after-restart-sigterm "no exit within 40 s of SIGTERM"
    fi
else
    fail sweep-after-sigkill "new daemon gave no /health within 90 s: $(tail -5 "$OUT/daemon-sweep.log" | tr '\n' ' ')"
    kill -KILL "$SWEEP" 2>/dev/null
fi
l=$(leftovers)
if [ -n "$l" ]; then
    info residue "before the nested test:$l"
    find "$CG" -mindepth 1 -depth -type d -name 'mde-*' -exec sh -c 'echo 1 > "$1/cgroup.kill"; sleep 0.2; find "$1" -depth -type d -exec rmdir {} \;' _ {} \; 2>/dev/null
fi

# ---------------------------------------------------------------------------------------------
# 10. a private cgroup namespace (as Docker and Kubernetes give on v2): the daemon is at the
# root of its namespace, in a cgroup whose parent delegates the memory controller. The
# host's cgroup2 mount must go first: the kernel refuses the same superblock mounted again
# on the root of its own mount (EBUSY).
NEST=$CG/nestcg
mkdir -p "$NEST"
info nested-setup "root subtree_control=[$(cat $CG/cgroup.subtree_control)] nestcg controllers=[$(cat $NEST/cgroup.controllers)]"
( cd "$ETC" && exec sh -c '
    echo 0 > /sys/fs/cgroup/nestcg/cgroup.procs || exit 90
    exec unshare --cgroup --mount sh -c "
        umount -l /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup || exit 91
        exec env MDE_SERVER__PORT=8104 MDE_EXECUTION__MAX_CONCURRENT=1 /usr/local/bin/mixed-docker-executor --config /etc/mixed-docker-executor/config.toml"
' ) > "$OUT/daemon-nested.log" 2>&1 &
NESTED=$!
if wait_health 8104 90; then
    curl -s --max-time 10 http://127.0.0.1:8104/health > "$OUT/health-nested.json"
    mem=$(json "$OUT/health-nested.json" 'j["memory_enforcement"]')
    info nested-health "$(cat "$OUT/health-nested.json")"
    info nested-cgroups "daemon's cgroup (host view): $(sed -n 's/^0:://p' /proc/$NESTED/cgroup); under it: $(find $NEST -mindepth 1 -type d | sed "s|^$CG||" | tr '\n' ' '); nestcg subtree_control=[$(cat $NEST/cgroup.subtree_control)], enabling +memory there: $( (echo +memory > $NEST/cgroup.subtree_control) 2>&1 | sed 's/.*: //' ; [ -n "$(cat $NEST/cgroup.subtree_control)" ] && echo ok)"
    check nested-cgroupns-health-v2 "$([ "$mem" = "memory cgroup (v2)" ]; echo $?)" "memory_enforcement is '$mem'"
    wait_ready 8104 120
    execute 8104 'a = []
while True:
    a.append(bytearray(b"x" * (1 << 20)))' '{"memory_bytes": 67108864, "wall_time_ms": 20000}' "$OUT/nested-membomb.json"
    st=$(json "$OUT/nested-membomb.json" 'j["run"]["status"]')
    check nested-cgroupns-memory-bomb "$([ "$st" = memory_limit ]; echo $?)" \
        "run.status '$st': $(head -c 300 "$OUT/nested-membomb.json")"
    if stop_daemon "$NESTED"; then
        sleep 1
        # The daemon's own leaf (`daemon/`, where it moved itself to nest its slots) stays,
        # empty: a process cannot remove the cgroup it is in, and the next daemon reuses it.
        left=$(find "$NEST" -mindepth 1 -type d ! -path "$NEST/daemon" | sed "s|^$CG||" | tr '\n' ' ')
        if [ -s "$NEST/daemon/cgroup.procs" ]; then left="$left $NEST/daemon (not empty)"; fi
        l=$(leftovers)
        check nested-cgroupns-cleanup "$([ -z "$left$l" ]; echo $?)" "left: $left $l"
    else
        fail nested-cgroupns-cleanup "no exit within 40 s of SIGTERM"
    fi
else
    fail nested-cgroupns-health-v2 "no /health within 90 s: $(tail -5 "$OUT/daemon-nested.log" | tr '\n' ' ')"
    kill -KILL "$NESTED" 2>/dev/null
fi
rmdir "$NEST" 2>/dev/null

# ---------------------------------------------------------------------------------------------
# 11. the systemd unit
UNIT=mixed-docker-executor.service
install -m 0644 "$UNIT_SRC" /etc/systemd/system/$UNIT
printf 'MDE_EXECUTION__MAX_CONCURRENT=2\n' > /etc/default/mixed-docker-executor
systemctl daemon-reload
info unit-verify "$(systemd-analyze verify /etc/systemd/system/$UNIT 2>&1 | tr '\n' ' ')"
if timeout 60 systemctl start $UNIT && wait_ready 8000 120; then
    main=$(systemctl show -p MainPID --value $UNIT)
    info unit "MainPID=$main cgroup=$(sed -n 's/^0:://p' /proc/$main/cgroup) ControlGroup=$(systemctl show -p ControlGroup --value $UNIT)"
    curl -s --max-time 10 http://127.0.0.1:8000/health > "$OUT/health-unit.json"
    info unit-health "$(json "$OUT/health-unit.json" 'j["memory_enforcement"] + " | warnings: " + "; ".join(j["warnings"])')"
    slots=$(slot_cgroups)
    info unit-slot-cgroups "$(echo "$slots" | tr '\n' ' ')"
    outside=$(echo "$slots" | grep -v "^/system.slice/$UNIT/" || true)
    check unit-slots-under-service "$([ -n "$slots" ] && [ -z "$outside" ]; echo $?)" \
        "slot cgroups not under /system.slice/$UNIT/: $(echo "${outside:-none found}" | tr '\n' ' ')"
    code=$(post 8000 /submit_code '{"code": "print(\"Hello from FastAPI!\")"}' "$OUT/unit-hello.json")
    st=$(json "$OUT/unit-hello.json" 'j["status"]')
    check unit-hello "$([ "$code" = 200 ] && [ "$st" = success ]; echo $?)" "HTTP $code: $(head -c 300 "$OUT/unit-hello.json")"
    execute 8000 'a = []
while True:
    a.append(bytearray(b"x" * (1 << 20)))' '{"memory_bytes": 67108864, "wall_time_ms": 20000}' "$OUT/unit-membomb.json"
    st=$(json "$OUT/unit-membomb.json" 'j["run"]["status"]')
    check unit-memory-bomb "$([ "$st" = memory_limit ]; echo $?)" "run.status '$st': $(head -c 300 "$OUT/unit-membomb.json")"
    # SIGKILL the daemon: systemd kills the rest of the unit (KillMode=mixed), restarts it
    # (Restart=on-failure), and the new daemon must come up clean inside the unit.
    old_cg=$(echo "$slots" | head -1 | xargs dirname)
    systemctl kill -s KILL --kill-whom=main $UNIT
    newmain=""
    for i in $(seq 1 60); do
        newmain=$(systemctl show -p MainPID --value $UNIT)
        [ "$(systemctl show -p ActiveState --value $UNIT)" = active ] && [ -n "$newmain" ] && [ "$newmain" != 0 ] && [ "$newmain" != "$main" ] && break
        sleep 1
    done
    if [ -n "$newmain" ] && [ "$newmain" != "$main" ] && wait_ready 8000 120; then
        slots2=$(slot_cgroups)
        info unit-restart "MainPID $main -> $newmain, NRestarts=$(systemctl show -p NRestarts --value $UNIT), slots: $(echo "$slots2" | tr '\n' ' ')"
        bad=""
        [ -d "$CG$old_cg" ] && bad="$bad old $old_cg still there;"
        echo "$slots2" | grep -qv "^/system.slice/$UNIT/" && bad="$bad slots outside the unit;"
        [ "$(echo "$slots2" | grep -c .)" = 2 ] || bad="$bad $(echo "$slots2" | grep -c .) slot cgroups, not 2;"
        code=$(post 8000 /submit_code '{"code": "print(1)"}' "$OUT/unit-hello2.json")
        [ "$code" = 200 ] || bad="$bad hello after restart: HTTP $code;"
        check unit-restart-after-sigkill "$([ -z "$bad" ]; echo $?)" "$bad"
    else
        fail unit-restart-after-sigkill "not restarted and ready: $(systemctl status --no-pager $UNIT 2>&1 | tail -8 | tr '\n' ' ')"
    fi
    t0=$(date +%s)
    timeout 60 systemctl stop $UNIT
    t1=$(date +%s)
    sleep 1
    l=$(leftovers)
    state=$(systemctl show -p ActiveState --value $UNIT)
    result=$(systemctl show -p Result --value $UNIT)
    info unit-stop "took $((t1 - t0)) s, ActiveState=$state Result=$result"
    check unit-stop-cleanup "$([ -z "$l" ] && [ "$state" = inactive ]; echo $?)" "state $state result $result; left:$l"
else
    fail unit-start "$(systemctl status --no-pager $UNIT 2>&1 | tail -15 | tr '\n' ' ')"
    timeout 60 systemctl stop $UNIT
fi
journalctl -u $UNIT --no-pager > "$OUT/daemon-unit.log" 2>&1

# For comparison (not a check): the same unit with a plain ExecStart, as a unit without the
# move into a leaf would run the daemon. Where do the slots go, and does stop clean them?
mkdir -p /etc/systemd/system/$UNIT.d
printf '[Service]\nExecStart=\nExecStart=/usr/local/bin/mixed-docker-executor --config /etc/mixed-docker-executor/config.toml\n' \
    > /etc/systemd/system/$UNIT.d/plain.conf
systemctl daemon-reload
if timeout 60 systemctl start $UNIT && wait_ready 8000 120; then
    info unit-plain-execstart "daemon in $(sed -n 's/^0:://p' /proc/$(systemctl show -p MainPID --value $UNIT)/cgroup); slots: $(slot_cgroups | tr '\n' ' ')"
    timeout 60 systemctl stop $UNIT
    sleep 1
    info unit-plain-execstart "after systemctl stop, left:$(leftovers)"
else
    info unit-plain-execstart "did not start: $(systemctl status --no-pager $UNIT 2>&1 | tail -5 | tr '\n' ' ')"
    timeout 60 systemctl stop $UNIT
fi
rm -rf /etc/systemd/system/$UNIT.d
systemctl daemon-reload

info summary "$FAILS failed"
exit 0
