"""The checks that run inside the booted container of tests/test_deb_systemd.py.

Run by a oneshot unit with Debian's /usr/bin/python3 (standard library only: the package
under test is not installed yet when this starts, and is purged before it ends). Reads
``/edge-agent-test/params.json``, runs the checks in order, stops at the first failure, and
rewrites ``/edge-agent-test/out/results.json`` after every check so that the host sees how
far it got even if the container is killed. Each check is timed with the monotonic clock;
every wait polls with a deadline and fails with what did not happen.

It is copied alone into the container, so it cannot import the repository's harness
(``testing/``): its :func:`wait_for`, MQTT client calls (mosquitto_pub/_sub/_rr) and spec
builder are its own on purpose. It never launches a broker: the container's mosquitto is
started by its Debian package under systemd (tests/test_harness.py allows this file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

BASE = Path("/edge-agent-test")
OUT = BASE / "out"
UNIT = "edge-agent.service"
CONFIG = Path("/etc/edge-agent/agent.toml")
STATE = Path("/var/lib/edge-agent")
PREFIX = "edge"
# The root has no "localhost" in /etc/hosts; the agent's default config says 127.0.0.1 too.
BROKER = "127.0.0.1"
T = TypeVar("T")


class CheckFailed(Exception):
    pass


def sh(cmd: str | list[str], *, check: bool = True, timeout: float = 60) -> str:
    """Run a command; its stdout (stderr folded in). Raises CheckFailed on a non-zero exit."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise CheckFailed(f"{' '.join(argv)}: exit {result.returncode}\n{result.stdout[-3000:]}")
    return result.stdout


def wait_for(predicate: Callable[[], T | None], timeout: float, message: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise CheckFailed(f"{message} (within {timeout:g} s)")
        time.sleep(0.05)  # polling interval, not synchronisation


def expect(condition: object, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def show(*props: str) -> dict[str, str]:
    text = sh(["systemctl", "show", UNIT, *[f"--property={p}" for p in props]])
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def main_pid() -> int:
    return int(show("MainPID")["MainPID"])


def active_with_new_pid(old: int) -> int | None:
    s = show("MainPID", "ActiveState", "SubState")
    pid = int(s["MainPID"])
    if s["ActiveState"] == "active" and s["SubState"] == "running" and pid not in (0, old):
        return pid
    return None


def pid1_notifications(since_cursor: str) -> list[tuple[int, str]]:
    """PID 1's debug lines about the unit, as (pid, message) pairs in journal order."""
    text = sh(
        ["journalctl", "-o", "json", "--no-pager", f"--after-cursor={since_cursor}", "_PID=1"]
    )
    lines = []
    for raw in text.splitlines():
        entry = json.loads(raw)
        message = entry.get("MESSAGE")
        if isinstance(message, str) and message.startswith(f"{UNIT}:"):
            lines.append((int(entry.get("__MONOTONIC_TIMESTAMP", 0)), message))
    return lines


def journal_cursor() -> str:
    text = sh(["journalctl", "-n", "0", "--show-cursor", "--no-pager"])
    match = re.search(r"-- cursor: (\S+)", text)
    if not match:
        raise CheckFailed(f"no journal cursor in {text!r}")
    return match.group(1)


@contextlib.contextmanager
def pid1_debug() -> Iterator[None]:
    """PID 1 at debug level, so it logs each notification it gets; only for a moment,
    to keep the journal (and its rate limits) out of the way of everything else."""
    sh("systemd-analyze log-level debug")
    try:
        yield
    finally:
        sh("systemd-analyze log-level info")


def journal_sync() -> None:
    sh(["journalctl", "--sync"])


# ---------------------------------------------------------------------------- MQTT


def mqtt_wait(
    topic: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """The first JSON message on ``topic`` (retained ones included) that matches.

    Reads the pipe with ``os.read`` and splits lines itself: a retained message and a live
    one often come in one read, and ``select`` on a buffered file would not see the second.
    """
    proc = subprocess.Popen(
        ["mosquitto_sub", "-h", BROKER, "-t", topic, "-q", "1", "-F", "%p", "-V", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                seen.append(line)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and predicate(message):
                    return message
    finally:
        proc.kill()
        proc.wait(10)
    raise CheckFailed(f"no matching message on {topic} within {timeout:g} s; saw {seen[-5:]}")


def wait_online(node: str, timeout: float) -> dict[str, Any]:
    """The node's status once it says online (the retained one, or the next)."""
    topic = f"{PREFIX}/nodes/{node}/status"
    return mqtt_wait(topic, lambda m: m.get("status") == "online", timeout)


def publish(topic: str, payload: dict[str, Any] | str, *, retain: bool = False) -> None:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    argv = ["mosquitto_pub", "-h", BROKER, "-t", topic, "-q", "1", "-V", "5", "-m", data]
    sh(argv + (["-r"] if retain else []))


def invoke(node: str, fid: str, payload: Any, *, timeout: float = 15) -> dict[str, Any]:
    """One request/response over MQTT 5 (mosquitto_rr sets the Response Topic)."""
    rid = uuid.uuid4().hex
    request = {"request_id": rid, "function_id": fid, "payload": payload}
    out = sh(
        [
            "mosquitto_rr",
            "-h",
            BROKER,
            "-t",
            f"{PREFIX}/nodes/{node}/invoke",
            "-e",
            f"test/replies/{rid}",
            "-q",
            "1",
            "-W",
            str(int(timeout)),
            "-m",
            json.dumps(request),
        ],
        timeout=timeout + 10,
    )
    reply = json.loads(out.strip().splitlines()[-1])
    expect(reply.get("request_id") == rid, f"reply for another request: {reply}")
    return dict(reply)


def source_spec(fid: str, source: str, version: str = "1") -> dict[str, Any]:
    return {
        "id": fid,
        "name": fid,
        "version": version,
        "entrypoint": f"mod_{fid}:handler",
        "code": {
            "format": "source",
            "data": source,
            "sha256": hashlib.sha256(source.encode()).hexdigest(),
        },
        "memory_mb": 64,
        "timeout_seconds": 5,
    }


PROBE_SOURCE = """\
import os


def handler(event):
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    with open("/proc/self/cgroup") as f:
        cgroup = f.read()
    try:
        open("/etc/edge-agent-probe", "w").close()
        etc_writable = True
    except OSError:
        etc_writable = False
    return {
        "event": event,
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cgroup": cgroup,
        "no_new_privs": status["NoNewPrivs"].strip(),
        "seccomp": status["Seccomp"].strip(),
        "cap_eff": status["CapEff"].strip(),
        "cap_prm": status["CapPrm"].strip(),
        "cap_amb": status["CapAmb"].strip(),
        "etc_writable": etc_writable,
    }
"""

FAIL_SOURCE = """\
def handler(event):
    raise ValueError("deliberate failure for the journal check")
"""


# ---------------------------------------------------------------------------- checks


class Guest:
    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.node = params["node_id"]
        self.results: dict[str, Any] = {"checks": [], "facts": {}, "done": False}
        self.facts: dict[str, Any] = self.results["facts"]
        self.state_topic = f"{PREFIX}/nodes/{self.node}/functions/{{}}/state"

    def save(self) -> None:
        tmp = OUT / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2))
        tmp.rename(OUT / "results.json")

    def run(self) -> None:
        checks: list[tuple[str, Callable[[], str]]] = [
            ("install", self.check_install),
            ("ready_after_notify", self.check_ready_after_notify),
            ("status_online", self.check_status_online),
            ("deploy_and_invoke", self.check_deploy_and_invoke),
            ("journal_fields", self.check_journal_fields),
            ("worker_sandbox", self.check_worker_sandbox),
            ("kill9_restart", self.check_kill9_restart),
            ("watchdog_restart", self.check_watchdog_restart),
            ("reload", self.check_reload),
            ("signed_deploy", self.check_signed_deploy),
            ("security_score", self.check_security_score),
            ("upgrade_keeps_state", self.check_upgrade),
            ("purge", self.check_purge),
            ("provisioned_install", self.check_provisioned_install),
            ("purge_again", self.check_purge),
        ]
        for name, check in checks:
            started = time.monotonic()
            entry: dict[str, Any] = {"name": name}
            try:
                entry["detail"] = check()
                entry["ok"] = True
            except Exception as exc:
                entry["ok"] = False
                entry["error"] = (
                    str(exc)
                    if isinstance(exc, CheckFailed)
                    else "".join(traceback.format_exception(exc))
                )
            entry["seconds"] = round(time.monotonic() - started, 3)
            self.results["checks"].append(entry)
            self.save()
            if not entry["ok"]:
                break
        else:
            self.results["done"] = True
            self.save()

    # -- install: enabled, not started (no broker configured yet), config from the host name

    def check_install(self) -> str:
        started = time.monotonic()
        out = sh(
            ["apt-get", "install", "-y", "--no-install-recommends", self.params["deb_v1"]],
            timeout=180,
        )
        self.facts["install_seconds"] = round(time.monotonic() - started, 3)
        (OUT / "apt-install.log").write_text(out)
        expect("set the broker" in out, f"postinst did not explain the next step:\n{out[-2000:]}")
        expect(
            sh(["systemctl", "is-enabled", UNIT], check=False).strip() == "enabled",
            "the unit is not enabled after install",
        )
        state = sh(["systemctl", "is-active", UNIT], check=False).strip()
        expect(state == "inactive", f"the unit should wait for a broker, but is {state}")
        text = CONFIG.read_text()
        expect(
            re.search(rf'^id = "{re.escape(self.node)}"$', text, re.M),
            f"node.id is not {self.node!r} (from the host name {os.uname().nodename!r})",
        )
        st = CONFIG.stat()
        group = sh(["getent", "group", "edge-agent"]).split(":")
        expect(
            (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, int(group[2]), 0o640),
            f"agent.toml is {st.st_uid}:{st.st_gid} {oct(st.st_mode)}",
        )
        d = CONFIG.parent.stat()
        expect((d.st_uid, d.st_mode & 0o7777) == (0, 0o750), "/etc/edge-agent is not root 0750")
        passwd = sh(["getent", "passwd", "edge-agent"]).strip()
        expect(passwd.endswith(":/:/usr/sbin/nologin"), f"odd system user: {passwd}")
        verify = subprocess.run(
            ["systemd-analyze", "verify", f"/usr/lib/systemd/system/{UNIT}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        )
        expect(
            (verify.returncode, verify.stdout, verify.stderr) == (0, "", ""),
            f"systemd-analyze verify on the installed unit:\n{verify.stdout}{verify.stderr}",
        )
        version = sh(["edge-agent", "--version"]).strip()
        sh(["edgectl", "--version"])
        pycs = list(Path("/opt/edge-agent/lib").rglob("*.pyc"))
        expect(len(pycs) > 100, f"postinst compiled only {len(pycs)} .pyc files")
        return (
            f"{version}; node.id {self.node}; enabled, inactive; unit verifies clean; "
            f"{len(pycs)} .pyc compiled"
        )

    # -- active only after READY=1; STATUS= in systemctl status

    def check_ready_after_notify(self) -> str:
        dropin = Path(f"/etc/systemd/system/{UNIT}.d/test.conf")
        dropin.parent.mkdir(parents=True, exist_ok=True)
        dropin.write_text(f"[Service]\nWatchdogSec={self.params['watchdog_sec']}\n")
        sh("systemctl daemon-reload")
        cursor = journal_cursor()
        started = time.monotonic()
        with pid1_debug():
            sh(["systemctl", "start", UNIT])  # Type=notify: returns once READY=1 arrived
        self.facts["start_to_active_seconds"] = round(time.monotonic() - started, 3)
        pid = main_pid()
        journal_sync()
        lines = pid1_notifications(cursor)
        ready = [
            ts for ts, m in lines if f"notification message from PID {pid}" in m and "READY=1" in m
        ]
        running = [ts for ts, m in lines if "Changed start -> running" in m]
        expect(ready, f"PID 1 logged no READY=1 from {pid}: {lines[-20:]}")
        expect(running, f"PID 1 never moved the unit to running: {lines[-20:]}")
        expect(ready[0] <= running[0], "the unit became active before READY=1")
        s = show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "Type")
        gap_ms = (
            int(s["ActiveEnterTimestampMonotonic"]) - int(s["ExecMainStartTimestampMonotonic"])
        ) / 1000
        expect(s["Type"] == "notify", f"Type={s['Type']}")
        status = wait_for(
            lambda: (
                m.group(1)
                if (m := re.search(r'Status: "([^"]*connected[^"]*)"', self.status_text()))
                else None
            ),
            15,
            "systemctl status shows no STATUS= line from the agent",
        )
        return f"exec -> active {gap_ms:.0f} ms, READY=1 before 'running'; Status: {status!r}"

    def status_text(self) -> str:
        return sh(["systemctl", "status", "--no-pager", UNIT], check=False)

    # -- the broker sees the node online

    def check_status_online(self) -> str:
        topic = f"{PREFIX}/nodes/{self.node}/status"
        message = wait_online(self.node, 15)
        expect(message.get("node_id") == self.node, f"status of another node: {message}")
        return f"retained {topic}: online, agent_version {message.get('agent_version')}"

    # -- deploy a retained fleet spec, invoke it

    def check_deploy_and_invoke(self) -> str:
        for fid, source in (("probe", PROBE_SOURCE), ("fail", FAIL_SOURCE)):
            publish(f"{PREFIX}/fleet/functions/{fid}", source_spec(fid, source), retain=True)
        started = time.monotonic()
        for fid in ("probe", "fail"):
            mqtt_wait(self.state_topic.format(fid), lambda m: m.get("state") == "active", 30)
        self.facts["deploy_seconds"] = round(time.monotonic() - started, 3)
        started = time.monotonic()
        reply = invoke(self.node, "probe", {"n": 1})
        self.facts["invoke_seconds"] = round(time.monotonic() - started, 3)
        expect(reply.get("ok") is True, f"invoke failed: {reply}")
        expect(reply["result"]["event"] == {"n": 1}, f"wrong result: {reply}")
        self.probe = reply["result"]
        return f"both functions active; invoke ok in {reply.get('duration_ms')} ms"

    # -- FUNCTION_ID and REQUEST_ID in the journal

    def check_journal_fields(self) -> str:
        reply = invoke(self.node, "fail", {})
        expect(reply.get("ok") is False, f"the failing function succeeded: {reply}")
        rid = reply["request_id"]

        def entry() -> dict[str, Any] | None:
            journal_sync()
            text = sh(["journalctl", "-o", "json", "--no-pager", f"REQUEST_ID={rid}"])
            for raw in text.splitlines():
                e = json.loads(raw)
                if e.get("FUNCTION_ID") == "fail":
                    return dict(e)
            return None

        found = wait_for(entry, 10, f"no journal entry with REQUEST_ID={rid} FUNCTION_ID=fail")
        (OUT / "journal-entry.json").write_text(json.dumps(found, indent=2))
        return (
            f"FUNCTION_ID={found['FUNCTION_ID']} REQUEST_ID={found['REQUEST_ID']} "
            f"SYSLOG_IDENTIFIER={found.get('SYSLOG_IDENTIFIER')}: {found.get('MESSAGE')!r}"
        )

    # -- workers inside the unit's sandbox

    def check_worker_sandbox(self) -> str:
        """Every worker is in the unit's cgroup, sandbox and mount namespace, never root;
        the handler's own process (which runs user code) has no capability at all.

        Works for both isolation modes: workers under the agent's uid (today's default)
        and a uid per function (runtime.function_uids, which needs CAP_SETUID/CAP_SETGID/
        CAP_KILL in the unit). A prestarted worker that has not loaded a function yet may
        still hold the agent's ambient capabilities: it runs no user code until it drops
        them, so capabilities are asserted on the handler's process and only recorded for
        the others.
        """
        pid = main_pid()
        cgroup = show("ControlGroup")["ControlGroup"]
        agent_uid = int(sh(["id", "-u", "edge-agent"]))

        def in_unit(p: str) -> bool:
            try:
                text = Path(f"/proc/{p}/cgroup").read_text()
            except OSError:
                return False
            return any(line.endswith(f":{cgroup}") for line in text.splitlines())

        procs = [p for p in os.listdir("/proc") if p.isdigit() and in_unit(p)]
        workers = [int(p) for p in procs if int(p) != pid]
        expect(workers, f"no worker processes in {cgroup} besides the agent {pid}")
        own_mnt = os.readlink(f"/proc/{pid}/ns/mnt")
        expect(own_mnt != os.readlink("/proc/1/ns/mnt"), "the agent shares PID 1's mount ns")
        seen: dict[int, dict[str, str]] = {}
        for w in workers:
            status = dict(
                line.split(":", 1) for line in Path(f"/proc/{w}/status").read_text().splitlines()
            )
            uids = {int(u) for u in status["Uid"].split()}
            expect(len(uids) == 1 and 0 not in uids, f"worker {w} has uids {status['Uid']}")
            expect(status["NoNewPrivs"].strip() == "1", f"worker {w}: NoNewPrivs off")
            expect(status["Seccomp"].strip() == "2", f"worker {w}: no seccomp filter")
            expect(os.readlink(f"/proc/{w}/ns/mnt") == own_mnt, f"worker {w}: other mount ns")
            seen[w] = {
                "uid": str(uids.pop()),
                **{k: status[k].strip() for k in ("CapEff", "CapPrm", "CapAmb", "CapBnd")},
            }
        self.facts["workers"] = seen
        probe = self.probe
        expect(probe["uid"] != 0, "the handler ran as root")
        for key in ("cap_eff", "cap_prm", "cap_amb"):
            expect(int(probe[key], 16) == 0, f"the handler holds capabilities: {probe}")
        expect(cgroup in probe["cgroup"], f"the handler is outside {cgroup}: {probe['cgroup']}")
        expect(not probe["etc_writable"], "the handler could write to /etc")
        expect((probe["no_new_privs"], probe["seccomp"]) == ("1", "2"), f"{probe}")
        isolation = (
            f"shared uid edge-agent ({agent_uid})"
            if probe["uid"] == agent_uid
            else f"function uid {probe['uid']} (agent {agent_uid})"
        )
        self.facts["isolation"] = isolation
        return (
            f"{len(workers)} workers in {cgroup}, non-root, NoNewPrivs, seccomp, the unit's "
            f"mount namespace; handler: {isolation}, no capabilities, /etc read-only"
        )

    # -- kill -9: systemd restarts the agent, which serves its deployments again

    def check_kill9_restart(self) -> str:
        old = main_pid()
        restarts = int(show("NRestarts")["NRestarts"])
        started = time.monotonic()
        os.kill(old, signal.SIGKILL)
        new = wait_for(lambda: active_with_new_pid(old), 20, "agent not restarted after kill -9")
        restarted = time.monotonic() - started
        self.facts["kill9_to_active_seconds"] = round(restarted, 3)
        expect(int(show("NRestarts")["NRestarts"]) == restarts + 1, "NRestarts did not go up")
        reply = wait_for(
            lambda: r if (r := invoke(self.node, "probe", {"n": 2})).get("ok") else None,
            20,
            "the restarted agent does not serve probe",
        )
        expect(reply["result"]["pid"] != self.probe["pid"], "a worker survived its agent")
        return f"pid {old} -> {new}, active again after {restarted:.2f} s; probe answers"

    # -- SIGSTOP: the watchdog kills and restarts it

    def check_watchdog_restart(self) -> str:
        watchdog = float(self.params["watchdog_sec"])
        old = main_pid()
        cursor = journal_cursor()
        started = time.monotonic()
        os.kill(old, signal.SIGSTOP)
        limit = watchdog + 2 + 10  # WatchdogSec + RestartSec + start-up and margin
        new = wait_for(
            lambda: active_with_new_pid(old),
            limit,
            f"agent {old} frozen but not restarted by the watchdog",
        )
        seconds = time.monotonic() - started
        self.facts["sigstop_to_active_seconds"] = round(seconds, 3)
        journal_sync()
        messages = [m for _, m in pid1_notifications(cursor)]
        expect(
            any("Failed with result 'watchdog'" in m for m in messages),
            f"PID 1 did not fail the unit for its watchdog: {messages[-15:]}",
        )
        invoke(self.node, "probe", {"n": 3})
        return (
            f"pid {old} -> {new}: active again {seconds:.2f} s after SIGSTOP "
            f"(WatchdogSec={watchdog:g}, RestartSec=2, limit {limit:g} s)"
        )

    # -- reload: RELOADING=1, then READY=1

    def check_reload(self) -> str:
        pid = main_pid()
        cursor = journal_cursor()

        def sequence() -> list[str] | None:
            journal_sync()
            got = [
                m
                for _, m in pid1_notifications(cursor)
                if f"notification message from PID {pid}" in m
            ]
            reloading = [i for i, m in enumerate(got) if "RELOADING=1" in m]
            ready = [i for i, m in enumerate(got) if "READY=1" in m]
            if reloading and ready and ready[-1] > reloading[0]:
                return got
            return None

        started = time.monotonic()
        # ExecReload (kill -HUP) returns before the agent has even seen the signal: the
        # evidence is PID 1's log of RELOADING=1 and then READY=1, so wait for that while
        # PID 1 is still logging at debug level.
        with pid1_debug():
            sh(["systemctl", "reload", UNIT])
            wait_for(sequence, 10, f"no RELOADING=1 then READY=1 from {pid}")
        seconds = time.monotonic() - started
        self.facts["reload_seconds"] = round(seconds, 3)
        state = show("ActiveState", "SubState")
        expect(state == {"ActiveState": "active", "SubState": "running"}, f"after reload: {state}")
        expect(main_pid() == pid, "reload restarted the agent")
        invoke(self.node, "probe", {"n": 4})
        return f"RELOADING=1 then READY=1 from pid {pid} within {seconds:.2f} s; same pid"

    # -- signed specs verified by the installed agent (the system's libcrypto, no cryptography)

    def check_signed_deploy(self) -> str:
        keys = Path("/root/edge-keys")  # the cloud's private key: not on the gateway's paths
        keys.mkdir(mode=0o700, exist_ok=True)
        sh(["edgectl", "keygen", str(keys / "cloud")])
        trust = CONFIG.parent / "trust"
        trust.mkdir(mode=0o755, exist_ok=True)
        shutil.copyfile(keys / "cloud.pub", trust / "cloud.pub")
        (trust / "cloud.pub").chmod(0o644)
        text = CONFIG.read_text()
        # require_signed = false: the unsigned probe and fail keep running for what follows
        keyed = text.replace("keys = []", f'keys = ["{trust}/cloud.pub"]', 1).replace(
            "require_signed = true", "require_signed = false", 1
        )
        expect(keyed.count("cloud.pub") == 1, "agent.toml has no `keys = []` to set")
        CONFIG.write_text(keyed)
        sh(["systemctl", "restart", UNIT])
        wait_online(self.node, 30)
        source = "def handler(event):\n    return {'signed': event}\n"
        spec = keys / "spec.json"
        spec.write_text(json.dumps(source_spec("signed", source)))
        signed = json.loads(
            sh(
                [
                    "/opt/edge-agent/bin/python3",
                    "-c",
                    "import sys\n"
                    "from agent.contract import protocol\n"
                    "from agent.trust import Signer\n"
                    "spec = protocol.decode_spec(open(sys.argv[2], 'rb').read())\n"
                    "signer = Signer.from_file(sys.argv[1])\n"
                    "signed = signer.sign(spec, target='fleet', sequence=1)\n"
                    "print(protocol.encode_spec(signed).decode())\n",
                    str(keys / "cloud"),
                    str(spec),
                ]
            )
        )
        topic = f"{PREFIX}/fleet/functions/signed"
        forged = {**signed, "timeout_seconds": 9}  # its signature no longer covers it
        publish(topic, forged, retain=True)
        state = mqtt_wait(
            self.state_topic.format("signed"), lambda m: m.get("state") == "rejected", 30
        )
        message = (state.get("error") or {}).get("message", "")
        expect("does not verify" in message, f"the forged spec: {state}")
        publish(topic, signed, retain=True)
        mqtt_wait(self.state_topic.format("signed"), lambda m: m.get("state") == "active", 30)
        reply = invoke(self.node, "signed", 7)
        expect(reply.get("result") == {"signed": 7}, f"the signed function: {reply}")
        pid = main_pid()
        maps = Path(f"/proc/{pid}/maps").read_text()
        expect("cryptography" not in maps, "the agent loaded cryptography to verify")
        CONFIG.write_text(text)  # back to no keys for the checks that follow
        shutil.rmtree(trust)
        sh(["systemctl", "restart", UNIT])
        wait_online(self.node, 30)
        # an empty retained spec removes it: the checks that follow see probe and fail only
        sh(["mosquitto_pub", "-h", BROKER, "-t", topic, "-q", "1", "-V", "5", "-r", "-n"])
        mqtt_wait(self.state_topic.format("signed"), lambda m: m.get("state") == "removed", 30)
        invoke(self.node, "probe", {"n": 5})
        return "a forged spec rejected, the signed one active and answering; no cryptography"

    # -- systemd-analyze security, recorded for the README

    def check_security_score(self) -> str:
        out = sh(["systemd-analyze", "security", "--no-pager", UNIT], check=False)
        (OUT / "security.txt").write_text(out)
        match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\S+)", out)
        expect(match, f"no overall exposure level in:\n{out[-1500:]}")
        assert match is not None
        self.facts["security_exposure"] = f"{match.group(1)} {match.group(2)}"
        return f"exposure {match.group(1)} {match.group(2)}"

    # -- upgrade keeps state.db, config and deployed functions

    def check_upgrade(self) -> str:
        with CONFIG.open("a") as f:
            f.write("# kept across upgrades\n")
        config_hash = hashlib.sha256(CONFIG.read_bytes()).hexdigest()
        db_inode = (STATE / "state.db").stat().st_ino
        fn_dirs = {p.name: p.stat().st_ino for p in (STATE / "functions").iterdir()}
        expect({"probe", "fail"} <= set(fn_dirs), f"functions on disk: {sorted(fn_dirs)}")
        old = main_pid()
        started = time.monotonic()
        out = sh(
            ["apt-get", "install", "-y", "--no-install-recommends", self.params["deb_v2"]],
            timeout=180,
        )
        self.facts["upgrade_seconds"] = round(time.monotonic() - started, 3)
        (OUT / "apt-upgrade.log").write_text(out)
        version = sh(["dpkg-query", "-W", "-f=${Version}", "edge-agent"]).strip()
        expect(version == self.params["version_v2"], f"installed version is {version}")
        new = wait_for(lambda: active_with_new_pid(old), 20, "agent not running after upgrade")
        expect(
            hashlib.sha256(CONFIG.read_bytes()).hexdigest() == config_hash,
            "the upgrade changed agent.toml",
        )
        expect((STATE / "state.db").stat().st_ino == db_inode, "state.db was replaced")
        after = {p.name: p.stat().st_ino for p in (STATE / "functions").iterdir()}
        expect(after == fn_dirs, f"function directories changed: {fn_dirs} -> {after}")
        status = json.loads(sh(["edge-agent", "status", "--json"]))
        states = {f["id"]: f["state"] for f in status["functions"]}
        expect(states == {"probe": "active", "fail": "active"}, f"state.db says {states}")
        reply = invoke(self.node, "probe", {"n": 5})
        expect(reply.get("ok") is True, f"invoke after upgrade: {reply}")
        return (
            f"{self.params['version_v1']} -> {version}, pid {old} -> {new}; "
            "config, state.db and function directories kept"
        )

    # -- purge removes users, state and config

    def check_purge(self) -> str:
        dropin = Path(f"/etc/systemd/system/{UNIT}.d")
        if dropin.exists():  # the test's own drop-in: not the package's to remove
            (dropin / "test.conf").unlink()
            dropin.rmdir()
        uid = int(sh(["id", "-u", "edge-agent"]))
        started = time.monotonic()
        out = sh(["apt-get", "purge", "-y", "edge-agent"], timeout=180)
        self.facts["purge_seconds"] = round(time.monotonic() - started, 3)
        (OUT / "apt-purge.log").write_text(out)
        expect(not sh(["getent", "passwd", "edge-agent"], check=False), "the user is still there")
        expect(not sh(["getent", "group", "edge-agent"], check=False), "the group is still there")
        for path in (
            "/etc/edge-agent",
            "/var/lib/edge-agent",
            "/opt/edge-agent",
            "/usr/bin/edge-agent",
            f"/usr/lib/systemd/system/{UNIT}",
            f"/etc/systemd/system/multi-user.target.wants/{UNIT}",
        ):
            expect(not os.path.lexists(path), f"{path} is still there after purge")
        left = [
            p
            for p in os.listdir("/proc")
            if p.isdigit() and os.path.exists(f"/proc/{p}") and _uid_of(p) == uid
        ]
        expect(not left, f"processes of the old uid {uid} left: {left}")
        state = sh(["systemctl", "is-enabled", UNIT], check=False).strip()
        expect(
            state == "not-found" or "No such file" in state,
            f"systemctl is-enabled still knows the unit: {state!r}",
        )
        return "user, group, /etc/edge-agent, /var/lib/edge-agent, /opt/edge-agent, unit gone"

    # -- a config provisioned before the install: kept, repaired, and the agent starts

    def check_provisioned_install(self) -> str:
        CONFIG.parent.mkdir(mode=0o700)
        text = f'[node]\nid = "provisioned-{self.node}"\n\n[mqtt]\nhost = "{BROKER}"\n'
        CONFIG.write_text(text)
        CONFIG.chmod(0o600)
        started = time.monotonic()
        out = sh(
            ["apt-get", "install", "-y", "--no-install-recommends", self.params["deb_v2"]],
            timeout=180,
        )
        self.facts["provisioned_install_seconds"] = round(time.monotonic() - started, 3)
        (OUT / "apt-provisioned.log").write_text(out)
        expect(CONFIG.read_text() == text, "the install changed a provisioned agent.toml")
        gid = int(sh(["getent", "group", "edge-agent"]).split(":")[2])
        st = CONFIG.stat()
        expect(
            (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, gid, 0o640),
            f"provisioned agent.toml not repaired: {st.st_uid}:{st.st_gid} {oct(st.st_mode)}",
        )
        state = show("ActiveState")["ActiveState"]
        expect(state == "active", f"a provisioned gateway's agent is {state} after install")
        wait_online(f"provisioned-{self.node}", 15)
        return "config kept, repaired to root:edge-agent 0640; agent started by the install"


def _uid_of(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    params = json.loads((BASE / "params.json").read_text())
    guest = Guest(params)
    try:
        guest.run()
    finally:
        # What the host needs to explain a failure.
        for name, cmd in (
            ("journal.txt", ["journalctl", "-b", "--no-pager", "-o", "short-monotonic"]),
            ("status.txt", ["systemctl", "status", "--no-pager", "--full", UNIT]),
        ):
            (OUT / name).write_text(sh(cmd, check=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
