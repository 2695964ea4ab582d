# `cargo xtask package --test --systemd`: the package under a real systemd, booted with
# systemd-nspawn in a Debian tree that has systemd as init. Run as
#   bash package_systemd_test.sh ROOT V1_DEB V2_DEB ACCEPTOR PYTHON KEEPALIVE_CLIENT V1_IS_BUILT
# on the host. V1_IS_BUILT is 1 when V1 is the package under test (V2 is the same with a higher
# version), 0 when V1 is an older package (`--upgrade-from`): its own behaviour before the upgrade
# is then not checked, only that it runs and serves. The container shares the host's network namespace, so the clients (curl --ntlm and
# a pyspnego keep-alive login) run here, against ports picked at random; the backend (the test NTLM
# acceptor, keyed by its TCP connection as IIS does) runs in the container as a unit of its own.
set -euo pipefail
root=$1 v1=$2 v2=$3 acceptor=$4 python=$5 keepalive=$6 v1_is_built=$7
port=$((20000 + RANDOM % 20000)) backend=$((port + 1)) stuck_port=$((port + 2))
user='alice' password='Passw0rd!'
unit=ntlm-tag.service config=/etc/ntlm-tag/ntlm-tag.toml
console="$root.console"

fail() {
    echo "systemd test: $*" >&2
    echo "--- journalctl -u $unit (last 40 lines)" >&2
    inside journalctl -u "$unit" --no-pager -n 40 >&2 || true
    exit 1
}
elapsed() { echo "$(( ($(date +%s%N) - $1) / 1000000 )) ms"; }
elapsed_s() { echo "$(( ($(date +%s%N) - $1) / 1000000000 ))"; }
now() { date +%s%N; }

# What the postinst must do when upgrading from V1: hand over when V1 has the unit's hand-over
# helper, restart when it predates hand-overs through the unit.
# (The listing first: `grep -q` in a pipe would fail the pipe, under pipefail, by closing it early.)
listing=$(dpkg-deb -c "$v1")
if grep -q ' \./usr/lib/ntlm-tag/hand-over$' <<<"$listing"; then
    expect=hand-over
else
    expect=restart
fi
echo "upgrading from $(dpkg-deb -f "$v1" Version) to $(dpkg-deb -f "$v2" Version): the postinst must $expect"
cp "$v1" "$root/root/v1.deb"
cp "$v2" "$root/root/v2.deb"
install -m 755 "$acceptor" "$root/usr/local/bin/ntlm-acceptor"

echo "==> booting systemd in the tree (systemd-nspawn --boot; console in $console)"
started=$(now)
# Unified cgroup hierarchy whatever the host mounts (the gateway attaches to a cgroup v2); the
# capabilities nspawn drops by default but the unit's bounding set names, and bpf(2), which
# nspawn's own system call filter refuses otherwise; no machined here.
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn --boot --directory="$root" --register=no \
    --keep-unit --machine="ntlm-tag-test-$$" --console=passive \
    --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN --system-call-filter=bpf >"$console" 2>&1 &
nspawn=$!
# SIGTERM makes nspawn power the container off (systemd stops every unit), then it exits.
trap 'kill "$nspawn" 2>/dev/null; wait "$nspawn" 2>/dev/null || true' EXIT
leader=
for _ in $(seq 200); do
    leader=$(pgrep -P "$nspawn" || true)
    [ -n "$leader" ] && break
    kill -0 "$nspawn" 2>/dev/null || { cat "$console" >&2; exit 1; }
    sleep 0.05
done
[ -n "$leader" ] || { cat "$console" >&2; echo "systemd test: no container init" >&2; exit 1; }
inside() { nsenter --target "$leader" --all /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    DEBIAN_FRONTEND=noninteractive SYSTEMD_COLORS=0 "$@"; }
# Until systemd listens, systemctl cannot ask it anything (nothing, or `offline` before systemd has
# made /run/systemd/system); then --wait returns when the boot is done.
state=
for _ in $(seq 600); do
    state=$(inside timeout 120 systemctl is-system-running --wait 2>/dev/null || true)
    [ -n "$state" ] && [ "$state" != offline ] && break
    sleep 0.05
done
echo "systemd in the container: $state after $(elapsed "$started")"
[[ $state == running || $state == degraded ]] || { cat "$console" >&2; fail "boot: $state"; }
inside systemctl --version | head -1

echo "==> the backend: ntlm-acceptor on 127.0.0.1:$backend (NTLM keyed by its TCP connection)"
inside systemd-run --quiet --unit=ntlm-acceptor /usr/local/bin/ntlm-acceptor \
    --listen "127.0.0.1:$backend" --key connection --user "$user:$password"
for _ in $(seq 200); do
    curl -s -o /dev/null "http://127.0.0.1:$backend/" && break
    sleep 0.05
done

echo "==> apt-get install ./v1.deb: enabled and started; without a listener the start fails with 64"
inside apt-get install -y -qq --no-install-recommends /root/v1.deb >/dev/null
inside systemctl is-enabled "$unit" | grep -qx enabled || fail "not enabled"
if [ "$v1_is_built" = 1 ]; then
inside systemctl is-failed --quiet "$unit" || fail "the unconfigured start did not fail: $(inside systemctl show -p ActiveState -p SubState "$unit")"
shown=$(inside systemctl show -p ExecMainStatus -p Result -p NRestarts "$unit" | paste -sd' ')
echo "$shown"
# 64 is in RestartPreventExitStatus=: no restart loop on a configuration that cannot start.
[ "$shown" = "Result=exit-code NRestarts=0 ExecMainStatus=64" ] || fail "unconfigured: $shown"
inside journalctl -u "$unit" --no-pager -o cat | grep -m1 '`listen`' || fail "no \`listen\` in the journal"
else
    # An older package is only brought to a configured, serving state.
    inside systemctl stop "$unit" || true
fi

echo "==> configured: listen 127.0.0.1:$port, backend 127.0.0.1:$backend"
{ echo "listen = [\"127.0.0.1:$port\"]"; echo "backends = [\"127.0.0.1:$backend\"]"; cat "$root$config"; } >"$root/root/ntlm-tag.toml"
cp "$root/root/ntlm-tag.toml" "$root$config"
inside systemctl reset-failed "$unit"

echo "==> systemctl start returns when it serves (Type=notify, READY=1)"
started=$(now)
inside systemctl start "$unit" || fail "systemctl start failed"
echo "systemctl start returned after $(elapsed "$started")"
# No waiting: READY=1 promises a bound listener and an attached program.
code=$(curl -s -o /dev/null -w '%{http_code}' --ntlm -u "$user:$password" "http://127.0.0.1:$port/")
[ "$code" = 200 ] || fail "curl --ntlm right after the start: $code"
echo "curl --ntlm -u $user through the gateway: $code"
pid=$(inside systemctl show -p MainPID --value "$unit")
echo "main process: $pid"

if [ "$v1_is_built" = 1 ]; then
echo "==> systemctl status shows the STATUS= line"
status=$(inside systemctl status --no-pager "$unit" || true)
grep -E '^ +Status: "serving [0-9]+ connection\(s\), 1/1 backends up' <<<"$status" || fail "no status line: $status"

echo "==> the sandbox, as the kernel sees the main process"
proc=$(inside cat "/proc/$pid/status")
service_uid=$(inside id -u ntlm-tag)
field() { awk -v k="$1:" '$1 == k { print $2 }' <<<"$proc"; }
grep -E '^(Uid|CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' <<<"$proc" | paste -sd' ' | tr -s '\t ' ' '
[ "$(field Uid)" = "$service_uid" ] || fail "uid $(field Uid), not ntlm-tag ($service_uid)"
# This kernel (5.19+) lets the service user look up its maps: no capability is kept.
for cap in CapEff CapPrm CapBnd CapAmb; do
    [ "$(field $cap)" = 0000000000000000 ] || fail "$cap $(field $cap)"
done
[ "$(field NoNewPrivs)" = 1 ] || fail "NoNewPrivs $(field NoNewPrivs)"
[ "$(field Seccomp)" = 2 ] || fail "Seccomp $(field Seccomp) (SystemCallFilter not applied)"
exposure=$(inside systemd-analyze security --no-pager "$unit" | tail -1)
echo "systemd-analyze security (online): $exposure"
# The ceiling `cargo xtask lint` holds the offline rating to.
level=$(grep -oE '[0-9]+\.[0-9]+' <<<"$exposure")
awk -v l="$level" 'BEGIN { exit !(l <= 3.0) }' || fail "exposure $level above 3.0"

echo "==> the sock_ops program is attached in the unit's cgroup"
tree=$(inside bpftool cgroup tree /sys/fs/cgroup)
grep -A1 "/system.slice/$unit" <<<"$tree" | grep -B1 sock_ops || fail "no sock_ops program under $unit: $tree"
inside journalctl -u "$unit" --no-pager -o cat | grep -m1 'sock_ops program attached' || fail "no attach line"

echo "==> systemctl reload: a good file is applied"
sed -i 's/^# balance = "least-conn"/balance = "hash"/' "$root$config"
started=$(now)
inside systemctl reload "$unit" || fail "reload of a good file failed"
echo "reload applied in $(elapsed "$started")"
inside journalctl -u "$unit" --no-pager -o cat | grep -m1 'configuration reloaded' || fail "no reload line"

echo "==> systemctl reload: a bad file is refused with the gateway's reason, and it keeps serving"
cp "$root$config" "$root/root/good.toml"
sed -i 's/^balance = "hash"/balance = "round-robin"/' "$root$config"
set +e
out=$(inside systemctl reload "$unit" 2>&1); code=$?
set -e
[ "$code" != 0 ] || fail "reload of a bad file succeeded"
echo "systemctl reload exited $code: $out"
status=$(inside systemctl status --no-pager "$unit" || true)
grep -E 'last reload refused: .*balance' <<<"$status" || fail "no refusal in the status: $status"
inside systemctl is-active --quiet "$unit" || fail "not active after a refused reload"
[ "$(inside systemctl show -p MainPID --value "$unit")" = "$pid" ] || fail "the main process changed"
code=$(curl -s -o /dev/null -w '%{http_code}' --ntlm -u "$user:$password" "http://127.0.0.1:$port/")
[ "$code" = 200 ] || fail "after the refused reload: $code"
cp "$root/root/good.toml" "$root$config"
fi

echo "==> apt-get install ./v2.deb while a logged-in NTLM connection is open"
coproc login { "$python" "$keepalive" 127.0.0.1 "$port" / "$user" "$password" --source 127.0.0.1; }
read -r -t 20 first <&"${login[0]}" || fail "the keep-alive login said nothing"
echo "logged in: $first"
grep -q '"status": 200' <<<"$first" || fail "login: $first"
client_port=$(sed -E 's/.*"local_port": ([0-9]+).*/\1/' <<<"$first")
started=$(now)
# --force-confold: the configuration is the operator's (a conffile edited above), as on a real upgrade.
out=$(inside apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold /root/v2.deb 2>&1) || fail "apt-get install v2: $out"
echo "apt-get install v2 took $(elapsed "$started")"
grep -E '^ntlm-tag: ' <<<"$out" || fail "the postinst said nothing about the service: $out"
inside dpkg-query -W -f='${Version}\n' ntlm-tag
new_pid=$(inside systemctl show -p MainPID --value "$unit")
[ "$new_pid" != "$pid" ] || fail "the main process is still $pid"
echo "main process: $pid -> $new_pid"
inside systemctl is-active --quiet "$unit" || fail "not active after the upgrade"
# The main process runs the installed file, not the replaced one.
[ "$(inside stat -Lc %i "/proc/$new_pid/exe")" = "$(inside stat -c %i /usr/sbin/ntlm-tag)" ] ||
    fail "the main process does not run the installed binary: $(inside readlink "/proc/$new_pid/exe")"
echo "the main process runs the installed /usr/sbin/ntlm-tag"
to_login=${login[1]}
if [ "$expect" = hand-over ]; then
    grep -q 'handed over to the new binary without a restart' <<<"$out" || fail "no hand-over: $out"
    inside test -d "/proc/$pid" || fail "the old process $pid is gone: its connections were dropped"
    echo "" >&"${login[1]}"
    read -r -t 20 second <&"${login[0]}" || fail "no answer on the logged-in connection after the upgrade"
    echo "the logged-in connection after the upgrade: $second"
    grep -q '"status": 200' <<<"$second" || fail "after the upgrade: $second"
    grep -q "\"local_port\": $client_port" <<<"$second" || fail "not the same connection: $second"
else
    grep -q 'predates hand-overs through the unit; restarting the service' <<<"$out" || fail "no restart: $out"
    inside test ! -d "/proc/$pid" || fail "the old process $pid still runs after the restart"
    echo "restarted: the old process $pid is gone, and with it the logged-in connection"
fi
code=$(curl -s -o /dev/null -w '%{http_code}' --ntlm -u "$user:$password" "http://127.0.0.1:$port/")
[ "$code" = 200 ] || fail "a new connection after the upgrade: $code"
echo "a new connection after the upgrade: $code"
new_proc=$(inside cat "/proc/$new_pid/status")
grep -E '^(Uid|CapEff|CapBnd|NoNewPrivs|Seccomp):' <<<"$new_proc" | paste -sd' ' | tr -s '\t ' ' '
grep -qE '^Seccomp:\s+2$' <<<"$new_proc" || fail "the new process runs without the unit's seccomp filter"
grep -qE '^CapBnd:\s+0+$' <<<"$new_proc" || fail "the new process keeps a bounding set"
exec {to_login}>&-
wait "$login_PID" || true
for _ in $(seq 200); do inside test -d "/proc/$pid" || break; sleep 0.05; done
inside test ! -d "/proc/$pid" || fail "the old process did not exit after its last connection closed"
echo "the old process exited after its last connection closed"

echo "==> a hand-over whose new process hangs (its certificate a FIFO) fails the reload in bounded time"
cp "$root$config" "$root/root/good.toml"
inside mkfifo -m 644 /etc/ntlm-tag/stuck.pem
sed -i "s|^listen = .*|listen = [\"127.0.0.1:$port\", { address = \"127.0.0.1:$stuck_port\", tls = [{ cert = \"/etc/ntlm-tag/stuck.pem\", key = \"/etc/ntlm-tag/stuck.pem\" }] }]|" "$root$config"
grep -q stuck.pem "$root$config" || fail "the stuck listener is not in the configuration"
before=$(inside systemctl show -p MainPID --value "$unit")
timeout_s=$(( $(inside systemctl show -p TimeoutStartUSec --value "$unit" | sed -E 's/^([0-9]+)min ?/\1*60+/; s/s$//; s/\+$//') ))
inside touch /run/ntlm-tag/hand-over
started=$(now)
set +e
out=$(inside systemctl reload "$unit" 2>&1); code=$?
set -e
took=$(elapsed_s "$started")
echo "systemctl reload exited $code after $took s (TimeoutStartSec=$timeout_s s): $out"
[ "$code" != 0 ] || fail "the reload of a hand-over that hangs succeeded"
[ "$took" -lt "$timeout_s" ] || fail "the reload took $took s, not less than TimeoutStartSec=$timeout_s s"
journal=$(inside journalctl -u "$unit" --no-pager -o cat)
grep -m1 'not ready to take over within --ready-timeout (60 s), stuck reading the configuration' <<<"$journal" ||
    fail "the new process did not say what it was stuck on: $journal"
grep -m1 'hand-over refused: `ntlm-tag upgrade` exited 75' <<<"$journal" || fail "the hand-over did not say it was refused: $journal"
grep -q 'Reload operation timed out' <<<"$journal" && fail "systemd timed the reload out: $journal"
procs=$(inside sh -c "cat \$(find /sys/fs/cgroup/system.slice/$unit -name cgroup.procs)" | sort -u | paste -sd' ')
[ "$procs" = "$before" ] || fail "processes in the unit's cgroup: $procs (expected only the main process $before)"
echo "the unit's cgroup holds only the main process $before"
[ "$(inside systemctl show -p MainPID --value "$unit")" = "$before" ] || fail "the main process changed"
inside systemctl is-active --quiet "$unit" || fail "not active after the stuck hand-over"
code=$(curl -s -o /dev/null -w '%{http_code}' --ntlm -u "$user:$password" "http://127.0.0.1:$port/")
[ "$code" = 200 ] || fail "after the stuck hand-over: $code"
echo "the service serves on: curl --ntlm $code"
cp "$root/root/good.toml" "$root$config"
inside rm /etc/ntlm-tag/stuck.pem
inside touch /run/ntlm-tag/hand-over
inside systemctl reload "$unit" || fail "the hand-over after the stuck one failed"
after=$(inside systemctl show -p MainPID --value "$unit")
[ "$after" != "$before" ] || fail "the hand-over after the stuck one did not change the main process"
code=$(curl -s -o /dev/null -w '%{http_code}' --ntlm -u "$user:$password" "http://127.0.0.1:$port/")
[ "$code" = 200 ] || fail "after the next hand-over: $code"
echo "the next hand-over: main process $before -> $after; curl --ntlm: $code"

echo "==> systemctl stop right after a hand-over: the new main process drains, nothing is killed"
# The hand-over is done when the old process has gone (it had nothing to drain) and systemd names
# the new one as the main process. With nothing else left in the unit, a main process that systemd
# does not take for its own child gets SIGKILL right after SIGTERM on a stop.
for _ in $(seq 200); do inside test -d "/proc/$before" || break; sleep 0.05; done
inside test ! -d "/proc/$before" || fail "the old process $before did not exit after the hand-over"
[ "$(inside systemctl show -p MainPID --value "$unit")" = "$after" ] || fail "systemd's main process is not $after"
cursor=$(inside journalctl -n 0 --show-cursor --no-pager | sed -n 's/^-- cursor: //p')
started=$(now)
inside systemctl stop "$unit"
echo "systemctl stop took $(elapsed "$started")"
shown=$(inside systemctl show -p Result -p ExecMainPID -p ExecMainCode -p ExecMainStatus "$unit" | paste -sd' ')
echo "$shown"
# ExecMainCode=1: CLD_EXITED (2 would be CLD_KILLED).
[ "$shown" = "Result=success ExecMainPID=$after ExecMainCode=1 ExecMainStatus=0" ] || fail "stop after a hand-over: $shown"
journal=$(inside journalctl -u "$unit" --no-pager -o cat)
grep "Supervising process $after which is not our child" <<<"$journal" &&
    fail "systemd took the new main process $after for one it cannot wait for"
inside journalctl -u "$unit" --after-cursor "$cursor" --no-pager -o cat | grep -m1 'stopping: no new connections, draining' ||
    fail "the new main process did not drain"
inside systemctl start "$unit" || fail "the start after the stop failed"

echo "==> a refused hand-over falls back to a restart (the upgrade socket removed)"
inside rm /run/ntlm-tag/upgrade.sock
before=$(inside systemctl show -p MainPID --value "$unit")
out=$(inside apt-get install -y --reinstall --no-install-recommends -o Dpkg::Options::=--force-confold /root/v2.deb 2>&1) || fail "apt-get install --reinstall: $out"
grep -E '^ntlm-tag: ' <<<"$out" || fail "the postinst said nothing about the service: $out"
grep -q 'hand-over was refused' <<<"$out" || fail "no fallback: $out"
after=$(inside systemctl show -p MainPID --value "$unit")
[ "$after" != "$before" ] && inside systemctl is-active --quiet "$unit" || fail "not restarted: $before -> $after"
code=$(curl -s -o /dev/null -w '%{http_code}' --ntlm -u "$user:$password" "http://127.0.0.1:$port/")
[ "$code" = 200 ] || fail "after the restart: $code"
echo "restarted: main process $before -> $after; curl --ntlm: $code"

echo "==> systemctl stop drains and exits 0"
started=$(now)
inside systemctl stop "$unit"
echo "systemctl stop took $(elapsed "$started")"
inside systemctl show -p Result -p ExecMainStatus "$unit" | paste -sd' '
inside systemctl show -p Result --value "$unit" | grep -qx success || fail "stop result"
journal=$(inside journalctl -u "$unit" --no-pager -o cat)
grep -m1 'stopping: no new connections, draining' <<<"$journal" || fail "no drain line"
echo "journalctl -u $unit: $(wc -l <<<"$journal") lines"
echo "==> systemd test passed"
