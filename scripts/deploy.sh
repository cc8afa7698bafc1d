#!/usr/bin/env bash
# scripts/deploy.sh: upgrade a running `uload edge` in place to a new binary,
# without refusing or failing a request, and roll back to the old binary when
# the new one does not come up healthy.
#
# Usage:
#   scripts/deploy.sh (--pid PID | --pid-file FILE) --new BINARY --config FILE [options]
#
#   --pid PID            the running edge
#   --pid-file FILE      file holding its pid; rewritten with the pid that
#                        serves when this script ends (new, or rolled back)
#   --new BINARY         the uload binary to deploy
#   --config FILE        the uload.yaml both edges read (passed as --config)
#   --listen HOST:PORT   where /health is checked (default: ULOAD_EDGE_LISTEN of
#                        the running edge, else edge.listen of FILE)
#   --upgrade-sock PATH  default: upgrade_sock of the running edge's Pingora
#                        conf: its ULOAD_EDGE_PINGORA_CONF, else the one FILE's
#                        edge.pingora_conf names (Pingora's default without one)
#   --health-timeout S   seconds the new edge has to answer 200 to /health
#                        itself 3 times, with no other answer from it in
#                        between (default 30)
#   --rollback-timeout S the same for the rolled-back edge (default: the
#                        larger of --health-timeout and 30)
#   --log FILE           append the new edge's stdout and stderr here (default:
#                        wherever the running edge's stderr goes, a file, a
#                        pipe or a terminal; if that is a socket, as the
#                        journal is under systemd, the journal when this
#                        script's own stderr is it (ExecReload=), else
#                        /dev/null)
#   DEPLOY_DEBUG=1       (environment) print every /health probe
#
# The new edge runs as `BINARY edge -u --config FILE` in its own session (not
# daemonized: Pingora writes its pid_file only with -d, so --pid-file is
# where the serving pid is kept), in the running edge's working directory,
# with the running edge's ULOAD_* and RUST_LOG environment variables (read
# from /proc/PID/environ; the caller's own are dropped), so that the
# overrides it was started with still apply. Needs Linux (/proc), bash, python3 (3.9+: socket.send_fds), flock,
# and preferably ss (iproute2). Run it as the edge's user or root; as root,
# the new edge (and a rolled-back one) runs as the running edge's user, group
# and supplementary groups, and the upgrade socket is handed to that user.
#
# Under systemd, run it as the unit's ExecReload= (with NotifyAccess=all):
# the new edge then starts inside the unit, and the script tells systemd the
# new main pid (systemd-notify MAINPID=) when NOTIFY_SOCKET is set. Run from
# a shell against conf/systemd/uload-edge.service as shipped (Type=simple,
# Restart=always), systemd would see its main process exit and start a
# second edge, which cannot bind the address the new one holds. (Not
# exercised by the tests: they run without systemd.)
#
# Exit status:
#   0  deployed: the new binary serves; its pid is the last line of stdout
#      (`pid=N`) and is written to --pid-file
#   1  usage or environment error; nothing was changed
#   2  the new binary failed (could not be started, exited, or no 200 from
#      its own /health in time);
#      rolled back: the old binary serves again, as a new process (`pid=N`,
#      written to --pid-file)
#   3  the pre-flight check failed: `BINARY check-config FILE` for the new
#      binary, or for the old one (a rollback must be able to start it on
#      FILE), run as the edges run (the running edge's user, directory and
#      environment); nothing was changed, the running edge still serves
#   4  the hand-over or the rollback failed: the edge may not be serving.
#      Needs a human (the messages say which step failed).
#
# How Pingora 0.9 hands the listening sockets over (pingora-core 0.9.1,
# src/server/mod.rs, bootstrap_services.rs, transfer_fd/mod.rs):
#   - A process started with -u binds upgrade_sock in Server::bootstrap(),
#     which uload's edge::build calls after it has loaded the link table, and
#     waits about 6 s (5 retries, 1 s apart) for one connection carrying the
#     listening fds (SCM_RIGHTS, plus their addresses as text). Without one it
#     exits 1. Inherited fds whose address no service claims are closed.
#   - A running edge gives its fds away only on SIGQUIT, and only once: it
#     connects to upgrade_sock (retrying for about 5 s), sends, keeps
#     accepting for CLOSE_TIMEOUT (5 s, hard-coded), stops accepting, waits
#     grace_period_seconds, gives the runtimes graceful_shutdown_timeout_seconds
#     and exits. SIGQUIT cannot be taken back: the edge exits whether or not
#     the send worked, and later SIGQUITs are swallowed by tokio's handler.
#   - So sockets only move old -> new, once per process. "Roll back by
#     starting the old binary with -u and sending SIGQUIT to the new one"
#     works only while the new process is alive and still holds every socket.
#     A new binary that exits after taking them, or that closes one it does
#     not claim (say, a changed listen address), leaves them with the
#     draining old process, which cannot give them away again; a fresh bind
#     fails (Pingora sets SO_REUSEADDR, not SO_REUSEPORT) until the old one
#     closes them, and connections in between are refused.
#
# The order this script uses, and why:
#   0. Keep hold of the running binary for the rollback: its path, if the
#      file there is still the one running (same inode), else a copy of
#      /proc/PID/exe (the file was replaced or deleted). One deploy at a time
#      (flock on UPGRADE_SOCK.deploy.lock).
#   1. Pre-flight: `BINARY check-config FILE`, and the same with the old
#      binary (the rollback's). A binary that cannot run, or that refuses
#      the config, is stopped before anything changes (exit 3).
#   2. A keeper (the small Python helper below) listens on upgrade_sock in
#      place of a new edge; SIGQUIT to the running edge; it sends its fds to
#      the keeper, which holds copies of them until this script ends. The
#      running edge keeps serving 5 s more, then drains and exits by itself.
#   3. `BINARY edge -u` starts; the keeper sends it the same message.
#   4. Health: /health on the listen address must be answered 200 by the new
#      process itself (the accepted connection is found with `ss -e`, or in
#      /proc/net/tcp, and in /proc/PID/fd) 3 times, with no other answer from
#      it in between, within --health-timeout; the new process must stay
#      alive and keep the listening socket (Pingora closes inherited sockets
#      no service claims, e.g. when the new config listens elsewhere: that
#      fails at once). Answers from the draining old edge do not count.
#      Then exit 0.
#   5. Otherwise roll back: SIGTERM the new process (it stops accepting and
#      finishes what it started), start the saved old binary with -u, the
#      keeper sends it the fds again, same health check, exit 2.
#   Because the keeper holds the listening sockets from step 2 until the end,
#   they are never closed: while no process accepts (after the old edge's
#   5 s, until the new or the rolled-back edge has loaded its table),
#   connections wait in the kernel's accept queue instead of being refused.
#   Pre-flight failures never reach step 2.
set -euo pipefail

t0="${EPOCHREALTIME/[.,]/}"
# Messages go to stderr, with the seconds since the start.
say() {
  local us=$(( ${EPOCHREALTIME/[.,]/} - t0 ))
  printf 'deploy: [%d.%02ds] %s\n' $((us / 1000000)) $((us % 1000000 / 10000)) "$*" >&2
}
die() { say "$*"; exit 1; }

pid="" pid_file="" new="" config="" listen="" sock="" health_timeout=30 rollback_timeout="" log=""
while [ $# -gt 0 ]; do
  case "$1" in
    --pid) pid="${2:?}"; shift 2 ;;
    --pid-file) pid_file="${2:?}"; shift 2 ;;
    --new) new="${2:?}"; shift 2 ;;
    --config) config="${2:?}"; shift 2 ;;
    --listen) listen="${2:?}"; shift 2 ;;
    --upgrade-sock) sock="${2:?}"; shift 2 ;;
    --health-timeout) health_timeout="${2:?}"; shift 2 ;;
    --rollback-timeout) rollback_timeout="${2:?}"; shift 2 ;;
    --log) log="${2:?}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
[ -n "$new" ] && [ -n "$config" ] || die "--new and --config are required (see --help)"
if [ -z "$pid" ]; then
  [ -n "$pid_file" ] || die "--pid or --pid-file is required"
  pid="$(tr -dc 0-9 <"$pid_file")" || die "cannot read $pid_file"
fi
[[ "$pid" =~ ^[0-9]+$ ]] || die "not a pid: '$pid'"
[[ "$health_timeout" =~ ^[0-9]+$ ]] || die "--health-timeout: not a number of seconds"
rollback_timeout="${rollback_timeout:-$(( health_timeout > 30 ? health_timeout : 30 ))}"
[[ "$rollback_timeout" =~ ^[0-9]+$ ]] || die "--rollback-timeout: not a number of seconds"
[ -x "$new" ] || die "$new is not an executable file"
[ -r "$config" ] || die "cannot read $config"
command -v python3 >/dev/null || die "python3 is needed"
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
new="$(cd "$(dirname "$new")" && pwd)/$(basename "$new")"

# alive PID: running and not a zombie (an exited child of, say, a test
# harness stays a zombie until reaped).
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}
alive "$pid" || die "no running process $pid"

# --- what the running edge uses --------------------------------------------
# A `key: value` line of a YAML file; with a section, only inside it.
yaml_get() { # FILE KEY [SECTION]
  awk -v key="$2" -v sec="${3:-}" '
    /^[^ \t#]/ { cur = $1; sub(/:.*/, "", cur) }
    {
      line = $0; sub(/#.*/, "", line)
      indented = (line ~ /^[ \t]/)
      if ((sec == "" && !indented) || (sec != "" && cur == sec && indented)) {
        if (match(line, "^[ \t]*" key ":[ \t]*")) {
          v = substr(line, RLENGTH + 1); gsub(/^[ \t"'\'']+|[ \t"'\'']+$/, "", v); print v; exit
        }
      }
    }' "$1"
}
old_env="$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -E '^(ULOAD_[A-Z0-9_]*|RUST_LOG)=' || true)"
old_cwd="$(readlink "/proc/$pid/cwd")" || die "cannot read /proc/$pid/cwd (run as the edge's user or root)"
# The running edge's user, group and supplementary groups: run as root, this
# script starts the new (and a rolled-back) edge as that user, and gives it
# the upgrade socket the running edge must connect to.
EDGE_IDS="$(awk '/^Uid:/ {u = $2} /^Gid:/ {g = $2} /^Groups:/ {$1 = ""; gs = $0} END {print u, g, gs}' "/proc/$pid/status")" \
  || die "cannot read /proc/$pid/status"
export EDGE_IDS
if [ -z "$listen" ]; then
  listen="$(printf '%s\n' "$old_env" | sed -n 's/^ULOAD_EDGE_LISTEN=//p')"
  [ -n "$listen" ] || listen="$(yaml_get "$config" listen edge)"
  [ -n "$listen" ] || listen=127.0.0.1:8080
fi
# The running edge's Pingora conf (its upgrade socket, grace periods): named
# by its ULOAD_EDGE_PINGORA_CONF if it has one, else by the config file.
pconf="$(printf '%s\n' "$old_env" | sed -n 's/^ULOAD_EDGE_PINGORA_CONF=//p')"
[ -n "$pconf" ] || pconf="$(yaml_get "$config" pingora_conf edge)"
pconf="${pconf:-pingora.yaml}"
case "$pconf" in /*) ;; *) pconf="$(dirname "$config")/$pconf" ;; esac
grace=300 drain=5
if [ -r "$pconf" ]; then
  [ -n "$sock" ] || sock="$(yaml_get "$pconf" upgrade_sock)"
  g="$(yaml_get "$pconf" grace_period_seconds)"; [ -n "$g" ] && grace="$g"
  d="$(yaml_get "$pconf" graceful_shutdown_timeout_seconds)"; [ -n "$d" ] && drain="$d"
fi
sock="${sock:-/tmp/pingora_upgrade.sock}"
# Without --log, the new edge (and a rolled-back one) writes where the
# running edge's stderr goes: reopened through /proc now, while it runs, so
# a file (even one rotated away), a pipe or a terminal all work. A socket
# cannot be reopened so: that is the journal under systemd, and when this
# script's own stderr is the journal too (ExecReload=: $JOURNAL_STREAM
# names it), the new edge gets that. Otherwise /dev/null, and a line saying
# so: the caller's stderr (an ssh session, a CI step) would be held open by
# the new edge for as long as it runs. ("&N": the helper's inherited fd N.)
if [ -n "$log" ]; then
  log_where="$log"
elif { exec {edge_err}>>"/proc/$pid/fd/2"; } 2>/dev/null; then
  log="&$edge_err"
  log_where="the running edge's stderr ($(readlink "/proc/$pid/fd/2" 2>/dev/null || echo '?'))"
elif [ -n "${JOURNAL_STREAM:-}" ] &&
  [ "$(stat -L -c %d:%i "/proc/$$/fd/2" 2>/dev/null || true)" = "$JOURNAL_STREAM" ]; then
  log="&2"
  log_where="the journal"
else
  log=/dev/null
  log_where="/dev/null"
  say "the running edge's stderr cannot be reopened ($(readlink "/proc/$pid/fd/2" 2>/dev/null || echo '?')): the new edge's output goes to /dev/null; --log FILE keeps it"
fi

finish() {
  local rc=$?
  if [ -n "$keeper_pid" ]; then
    # EOF on its stdin: the keeper exits and closes its copies of the sockets.
    [ -n "${KEEPER[1]:-}" ] && eval "exec ${KEEPER[1]}>&-"
    wait "$keeper_pid" 2>/dev/null || true
  fi
  case "$rc:$old_bin" in
    2:"$state"/*) # the rolled-back edge runs from this copy
      rm -f "$state/helper.py" "$state/env"
      say "the old binary runs from $old_bin: keep that file" ;;
    *) rm -rf "$state" ;;
  esac
  exit "$rc"
}

old_bin="" keeper_pid=""
state="$(mktemp -d "${TMPDIR:-/tmp}/uload-deploy.XXXXXX")"
trap finish EXIT
exec 9>"$sock.deploy.lock"
flock -n 9 || die "another deploy holds $sock.deploy.lock"
# The rollback runs the old binary from where it was, if the file there is
# still the one running (same inode); else from a copy in the state dir.
old_bin="$(readlink "/proc/$pid/exe")"
if ! [ "/proc/$pid/exe" -ef "$old_bin" ]; then
  old_bin="$state/uload.old"
  cp "/proc/$pid/exe" "$old_bin" || die "cannot copy /proc/$pid/exe"
fi
# Run as root for an edge running as another user, the pre-flight and the
# edges run as that user, so it must reach the rollback's copy of the old
# binary: the state dir can be passed through (not listed) by anyone and the
# copy run by anyone, while the saved environment of the running edge stays
# readable by the caller alone.
( umask 077; printf '%s\n' "$old_env" | sed '/^$/d' >"$state/env" )
chmod 0711 "$state"
[ "$old_bin" = "$state/uload.old" ] && chmod 0755 "$old_bin"

cat >"$state/helper.py" <<'PY'
"""deploy.sh's helper: keeper (holds and relays Pingora's listening fds),
spawn (starts a detached edge), healthy (waits for 200s from one pid)."""
import os, re, socket, subprocess, sys, time


def out(line):
    print(line, flush=True)


def edge_ids():
    # (uid, gid, groups) of the running edge when this runs as root and the
    # edge does not: new edges run as it, and it must reach the socket.
    ids = [int(x) for x in os.environ.get("EDGE_IDS", "").split()]
    if os.geteuid() != 0 or len(ids) < 2 or ids[0] == 0:
        return None
    return ids[0], ids[1], ids[2:]


def keeper(path, timeout):
    # Listen where a new edge would, take the running edge's fds, then hand
    # the same message to every edge started afterwards, on request.
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    ids = edge_ids()
    if ids:
        os.chown(path, ids[0], ids[1])
    srv.listen(1)
    srv.settimeout(timeout)
    out("listening")
    try:
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        msg, fds, _, _ = socket.recv_fds(conn, 4096, 64)
        conn.close()
    except OSError as e:
        out(f"error receiving the fds: {e}")
        return 1
    finally:
        srv.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    if not fds:
        out("error no fds received")
        return 1
    out(f"received {len(fds)} fds for {msg.decode(errors='replace')}")
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "send":
            break
        deadline, target = time.monotonic() + float(words[1]), words[2]
        while True:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                c.connect(path)
                c.settimeout(max(1.0, deadline - time.monotonic()))
                socket.send_fds(c, [msg], fds)
                c.close()
                out("sent")
                break
            except (FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
                c.close()
                if state_of(target) in ("gone", "Z", "X"):
                    out(f"error pid {target} exited before taking the sockets")
                    break
                if time.monotonic() > deadline:
                    out(f"error nobody listens on {path}: {e}")
                    break
                time.sleep(0.01)
            except OSError as e:
                c.close()
                out(f"error sending: {e}")
                break
    return 0


def as_the_edge(log, cwd, env_file, argv, **popen):
    # argv as the running edge would run it: its user and groups (when this
    # runs as root for an edge that does not), its working directory, and
    # its ULOAD_* and RUST_LOG, not the caller's (a ULOAD_DATA_DIR exported
    # in the operator's shell made a new edge serve another data dir).
    # Output to log; None, and a line saying why, if it cannot be started.
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("ULOAD_") or k == "RUST_LOG")}
    with open(env_file) as f:
        for line in f:
            k, sep, v = line.rstrip("\n").partition("=")
            if sep:
                env[k] = v
    ids = edge_ids()
    if ids:
        popen.update(user=ids[0], group=ids[1], extra_groups=ids[2])
    # "&N": this helper's inherited fd N (its stdout carries the pid).
    with (open(os.dup(int(log[1:])), "ab", buffering=0) if log.startswith("&")
          else open(log, "ab", buffering=0)) as out_f:
        try:
            return subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out_f, stderr=out_f, **popen)
        except OSError as e:
            who = f" as uid {ids[0]}" if ids else ""
            print(f"cannot run {argv[0]}{who}: {e}", file=sys.stderr, flush=True)
            return None


def spawn(log, cwd, env_file, argv):
    p = as_the_edge(log, cwd, env_file, argv, start_new_session=True)
    if p is None:
        return 1
    out(p.pid)
    return 0


def run(log, cwd, env_file, timeout, argv):
    # The pre-flight: argv's exit status, run exactly as an edge would be.
    p = as_the_edge(log, cwd, env_file, argv)
    if p is None:
        return 126
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        print(f"{argv[0]} took more than {timeout} s", file=sys.stderr, flush=True)
        return 124


def state_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def socket_fds(pid):
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return out


def tcp_sockets(state, sport=None, dport=None):
    """{`socket:[inode]`: local port} of the TCP sockets in `state`
    ("listening" or "established"), only those on local port `sport` (and
    peer port `dport`) when given. Asks the kernel through `ss` (sock_diag,
    filtered in the kernel); /proc/net/tcp is the fallback, slow when tens
    of thousands of sockets exist."""
    cmd = ["ss", "-Htne", "state", state]
    if sport is not None:
        cmd.append(f"( sport = :{sport}" + (f" and dport = :{dport}" if dport else "") + " )")
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
        if res.returncode == 0:
            found = {}
            for line in res.stdout.splitlines():
                # Recv-Q Send-Q Local:Port Peer:Port ... ino:N ...
                cols, ino = line.split(), re.search(r"\bino:(\d+)", line)
                if ino and len(cols) > 2:
                    found[f"socket:[{ino.group(1)}]"] = int(cols[2].rsplit(":", 1)[1])
            return found
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    code = "0A" if state == "listening" else "01"
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for row in f:
                    cols = row.split()
                    local = int(cols[1].rsplit(":", 1)[1], 16)
                    peer = int(cols[2].rsplit(":", 1)[1], 16)
                    if cols[3] == code and sport in (None, local) and dport in (None, peer):
                        found[f"socket:[{cols[9]}]"] = local
        except OSError:
            pass
    return found


def listening_ports(pid):
    """Local ports of the listening TCP sockets `pid` holds."""
    fds = socket_fds(pid)
    return {port for ino, port in tcp_sockets("listening").items() if ino in fds}


def owner(server_port, client_port, pid):
    """Does `pid` hold the server side of this connection?"""
    return bool(tcp_sockets("established", server_port, client_port).keys() & socket_fds(pid))


def probe(host, port, pid):
    """Status of one GET /health, and whether `pid` answered it."""
    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: uload-deploy\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return 0, False
            data += chunk
        status = int(data.split(b" ", 2)[1])
        # The connection is kept alive: its server side is still open.
        return status, owner(port, s.getsockname()[1], pid)


def healthy(listen, pid, timeout, need):
    host, _, port = listen.rpartition(":")
    host, port = host.strip("[]"), int(port)
    deadline = time.monotonic() + timeout
    ok, last, held = 0, "no answer yet", False
    while time.monotonic() < deadline:
        if state_of(pid) in ("gone", "Z", "X"):
            out(f"exited ({last})")
            return 2
        # Pingora closes inherited sockets no service claims (say, the new
        # binary's config listens elsewhere): that edge will never serve
        # here. Seen either as the socket gone after it was held, or as
        # listening sockets held without it: an edge started with -u binds
        # nothing before it has the inherited sockets, so one listening on
        # other ports only has closed ours, however soon after taking it
        # (sooner than this loop's first look, on a busy machine).
        ports = listening_ports(pid)
        holds = port in ports
        if not holds and (held or ports):
            others = ", ".join(str(p) for p in sorted(ports)) or "none"
            out(f"closed the socket listening on port {port} "
                f"(listening on: {others})")
            return 3
        held = held or holds
        try:
            status, mine = probe(host, port, pid)
            last = f"last /health: {status}, {'from' if mine else 'not from'} pid {pid}"
            if os.environ.get("DEPLOY_DEBUG"):
                print(f"{time.time():.3f} {last}", file=sys.stderr)
            # Answers from another edge neither count nor reset; a non-200
            # from this one resets.
            if mine:
                ok = ok + 1 if status == 200 else 0
            if ok >= need:
                out("healthy")
                return 0
        except (OSError, ValueError, IndexError) as e:
            # A slow answer on a busy machine is not a failure; a process
            # that never answers runs into the deadline.
            last = f"last /health: {e}"
            if os.environ.get("DEPLOY_DEBUG"):
                print(f"{time.time():.3f} {last}", file=sys.stderr)
        time.sleep(0.02)
    out(f"timeout ({last})")
    return 1


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "keeper":
        sys.exit(keeper(sys.argv[2], float(sys.argv[3])))
    if cmd == "spawn":
        sys.exit(spawn(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
    if cmd == "run":
        sys.exit(run(sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6:]))
    if cmd == "healthy":
        sys.exit(healthy(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])))
    sys.exit(f"unknown command {cmd}")
PY


write_pid() {
  if [ -n "$pid_file" ]; then
    echo "$1" >"$pid_file.tmp.$$" && mv -f "$pid_file.tmp.$$" "$pid_file"
  fi
  # Run by systemd (ExecReload= with NotifyAccess=all): the unit follows the
  # new main process.
  if [ -n "${NOTIFY_SOCKET:-}" ] && command -v systemd-notify >/dev/null; then
    systemd-notify "MAINPID=$1" || say "systemd-notify MAINPID=$1 failed"
  fi
  echo "pid=$1"
}

# start_edge BINARY: prints the pid of `BINARY edge -u --config CONFIG`.
start_edge() {
  python3 "$state/helper.py" spawn "$log" "$old_cwd" "$state/env" \
    "$1" edge -u --config "$config"
}

# handover PID TIMEOUT: the keeper sends the fds to the edge PID is; then
# /health.
handover() {
  local line
  echo "send 10 $1" >&"${KEEPER[1]}"
  read -r -t 15 line <&"${KEEPER[0]}" || line="error: no answer from the keeper"
  if [ "$line" != sent ]; then
    say "sending the sockets to pid $1: $line"
    return 1
  fi
  say "pid $1 has the listening sockets; waiting for its own /health"
  if line="$(python3 "$state/helper.py" healthy "$listen" "$1" "$2" 3)"; then
    say "pid $1 answers /health on $listen"
    return 0
  fi
  say "pid $1 is not healthy: $line"
  return 1
}

# stop PID: SIGTERM (graceful), then SIGKILL if it outlives its grace period.
stop() {
  kill -TERM "$1" 2>/dev/null || return 0
  local limit=$(( (grace < 60 ? grace : 60) + drain + 5 )) start=$SECONDS
  while alive "$1" && [ $((SECONDS - start)) -lt "$limit" ]; do sleep 0.05; done
  if alive "$1"; then
    say "pid $1 still running ${limit}s after SIGTERM; SIGKILL"
    kill -KILL "$1" 2>/dev/null || true
  fi
}

say "edge pid $pid on $listen; upgrade socket $sock; new binary $new"

# 1. Pre-flight: the new binary must take the config, and so must the old
# one, which a rollback would start on it (a key only the new release knows
# would leave no edge at all after a failed deploy: change such a config in
# a second deploy, once the new binary serves).
# Both run as the edges would: as the running edge's user (when this runs as
# root), in its directory, with its environment; so a binary or a config
# that user cannot read fails here, not after the hand-over.
for b in "$new" "$old_bin"; do
  if ! python3 "$state/helper.py" run "$log" "$old_cwd" "$state/env" 30 "$b" check-config "$config"; then
    say "pre-flight failed: $b check-config $config (output in $log_where); nothing changed, pid $pid still serves"
    exit 3
  fi
done

# 2. The keeper takes the listening sockets from the running edge.
coproc KEEPER { exec python3 "$state/helper.py" keeper "$sock" 15; }
keeper_pid=$KEEPER_PID
read -r -t 10 line <&"${KEEPER[0]}" || line="error: the keeper did not start"
[ "$line" = listening ] || { say "$line"; exit 1; }
kill -QUIT "$pid" || { say "cannot signal $pid"; exit 1; }
read -r -t 20 line <&"${KEEPER[0]}" || line="error: no fds from pid $pid"
if [ "${line%% *}" != received ]; then
  say "$line"
  say "pid $pid got SIGQUIT but did not hand its sockets over; it is shutting down: start an edge now"
  exit 4
fi
say "keeper $line from pid $pid (which drains and exits by itself)"

# 3. and 4. The new edge. From here on the old edge is draining: whatever
# fails must end in the rollback, never in an early exit.
new_pid=""
if new_pid="$(start_edge "$new")"; then
  say "started the new edge: pid $new_pid"
  if handover "$new_pid" "$health_timeout"; then
    write_pid "$new_pid"
    say "deployed: pid $new_pid serves ($new)"
    exit 0
  fi
else
  new_pid=""
  say "could not start the new edge ($new)"
fi

# 5. Rollback.
say "rolling back to the old binary"
stopper=""
if [ -n "$new_pid" ]; then
  stop "$new_pid" &
  stopper=$!
fi
back_pid=""
if back_pid="$(start_edge "$old_bin")"; then
  say "started the old binary again: pid $back_pid"
  if handover "$back_pid" "$rollback_timeout"; then
    [ -z "$stopper" ] || wait "$stopper" || true
    write_pid "$back_pid"
    say "rolled back: pid $back_pid serves the old binary"
    exit 2
  fi
fi
[ -z "$stopper" ] || wait "$stopper" || true
say "ROLLBACK FAILED: the old binary ($old_bin) did not come back healthy either; the edge may be down"
exit 4
