"""Hostile input through the real `kiosk` command, every sub-command (issue 14, "Done when").

Each case runs the installed `kiosk` in a subprocess, as a user would, and asserts the promise of
kiosk.core.errors: it ends within a bound, with exit status 1 or 2, no traceback, no "internal
error", and one line on stderr (an invalid spec may print one line per problem, each starting
with the file's name, with its indented detail lines).

The inputs: FIFOs (opening one for reading waits for a writer forever), device nodes (/dev/zero
never ends), /dev/null, a directory, a missing path, a 20 MB and a 100,000-deep JSON file, lone
surrogates and odd encodings (latin-1, UTF-16) in files and in arguments, NaN/inf/-1 and
5000-digit numbers for numeric options, an unreadable (0000) file (read without CAP_DAC_OVERRIDE
when the tests run as root), and a standard output that is full, closed or a pipe with no reader.

Nothing on this machine is touched: every path is under a throw-away directory, the device
commands get an empty --root / KIOSK_ROOT, HOME is a temporary directory (builders authorize
writes ~/.ssh/authorized_keys), device nodes a command might write to are nodes made here (never
/dev/null: issue 14 item 9), `kiosk flash` is only given files, and `kiosk agent` gets a short
bound. Each process runs in its own session (killed whole at the bound) under an address-space
limit, so a command that reads /dev/zero into memory fails instead of taking the machine's.

A case that fails while its fix is still on another branch may be listed in KNOWN (marked
xfail(strict=False) with the reason); none is listed now.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "nixiosk.json.sample"
TIMEOUT = 20          # seconds any one command may take
AGENT_TIMEOUT = 5     # the agent, if it wrongly starts, would answer mDNS on this machine's network: keep it short
MEMORY_LIMIT = 2 << 30
WORKERS = 3

# Arguments that cannot be text: a lone surrogate as UTF-8 would encode it, and bytes that are not UTF-8.
SURROGATE_ARG = b"\xed\xa0\x80"
LATIN1_ARG = b"caf\xe9"
LONG_ARG = "a" * 100_000

# Cases that fail on this branch, by id -> why (the issue item that fixes them): marked xfail(strict=False)
# until the fix is merged, then removed from here so the case is enforced. Every case passes now.
KNOWN: dict[str, str] = {}


@dataclass
class Case:
    id: str
    argv: list                     # str or bytes; "{name}" placeholders are files made for the case
    stdin: str | None = None       # a placeholder or path to read stdin from (default /dev/null)
    stdout: str = "pipe"           # pipe, full (/dev/full), closed (>&-), broken (a pipe nobody reads)
    timeout: float = TIMEOUT
    codes: tuple = (1, 2)
    no_dac: bool = False           # run without CAP_DAC_OVERRIDE (so root cannot read a 0000 file)
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The files: shared read-only ones made once, the rest (FIFOs, nodes, roots) per case

def _shared_files(base: Path) -> dict[str, str]:
    base.mkdir(parents=True, exist_ok=True)
    files = {
        "huge": b'{"hostName": "' + b"a" * (20 << 20) + b'"}',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "deepobj": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "surrogate": b'{"hostName": "\\ud800", "hardware": "qemu"}',
        "latin1": b'{"hostName": "caf\xe9", "hardware": "qemu"}',
        "utf16": '{"hostName": "kiosk", "hardware": "qemu"}'.encode("utf-16"),
        "bigint": b'{"hostName": 1' + b"0" * 5000 + b', "hardware": "qemu"}',
        "nan": b'{"hostName": NaN, "hardware": "qemu"}',
        "bom": b"\xef\xbb\xbf" + SAMPLE.read_bytes(),
        "lines": b"\n" * 1000 + b"0" * 40 + b" " + b"f" * 40 + b" refs/heads/main\n",
        "garbage": bytes(range(256)) * 16,
        "inventory": b"all:\n  hosts:\n    kiosk-one:\n",
        "yamlbomb": b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
            b"%c: &%c [%s]\n" % (98 + i, 98 + i, b", ".join([b"*%c" % (97 + i)] * 10)) for i in range(9)),
        "yamldeep": b"[" * 100_000 + b"]" * 100_000,
        "yamltab": b"all:\n\thosts: x\n",
    }
    out = {}
    for name, data in files.items():
        (base / f"{name}.json").write_bytes(data)
        out[name] = str(base / f"{name}.json")
    return out


def _case_files(base: Path) -> dict[str, str]:
    """FIFOs, device nodes, directories and a small image, fresh for one case."""
    base.mkdir(parents=True)
    os.mkfifo(base / "fifo")
    (base / "dir").mkdir()
    (base / "root").mkdir()
    (base / "home").mkdir()
    (base / "cwd").mkdir()
    unreadable = base / "unreadable.json"
    unreadable.write_bytes(SAMPLE.read_bytes())
    unreadable.chmod(0)
    img = base / "small.img"
    with open(img, "wb") as f:   # an MBR signature and nothing else: enough to be taken for an image
        f.truncate(1 << 20)
        f.seek(510)
        f.write(b"\x55\xaa")
    stale = socket.socket(socket.AF_UNIX)   # a socket file nobody listens on any more
    stale.bind(str(base / "sock"))
    stale.close()
    out = {name: str(base / name) for name in ("fifo", "dir", "root", "home", "cwd", "sock")}
    out.update(unreadable=str(unreadable), img=str(img), missing=str(base / "missing"),
               missingdir=str(base / "no" / "such" / "file"), out=str(base / "out.img"),
               devzero="/dev/zero", devnull="/dev/null", sample=str(SAMPLE))
    # Device nodes of our own for the arguments a command may write to: whatever it does to them, the
    # machine's /dev/null and /dev/zero stay as they are.
    for name, minor in (("nullnode", 3), ("zeronode", 5)):
        try:
            os.mknod(base / name, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            out[name] = str(base / name)
        except OSError:
            out[name] = None
    return out


def _expand(arg, files: dict):
    if isinstance(arg, bytes) or "{" not in arg:
        return arg
    for name in re.findall(r"\{(\w+)\}", arg):
        if files.get(name) is None:
            pytest.skip(f"no {name} here (mknod needs root and a file system that allows device nodes)")
    return arg.format(**files)


# ---------------------------------------------------------------------------------------------
# Running one case

def _kiosk() -> str:
    return shutil.which("kiosk", path=str(Path(sys.executable).parent)) or "kiosk"


@dataclass
class Result:
    code: int | None
    out: str
    err: str
    argv: list


def _run(case: Case, shared: dict, base: Path) -> Result:
    files = dict(shared, **_case_files(base / case.id))
    argv = [_expand(a, files) for a in case.argv]
    env = dict(os.environ, KIOSK_OFFLINE="1", KIOSK_ROOT=files["root"], KIOSK_ACTIVATOR="none",
               KIOSK_CACHE_DIR=str(base / "cache"), XDG_CACHE_HOME=str(base / "cache"), HOME=files["home"],
               KIOSK_LOCK_TIMEOUT="2", KIOSK_BUILDER_CONNECT_TIMEOUT="2", KIOSK_BUILDER_TIMEOUT="5",
               KIOSK_SSH_COMMAND="false", **case.extra)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "KIOSK_DATA_DIR"):
        env.pop(name, None)
    command = ["prlimit", f"--as={MEMORY_LIMIT}", "--"] if shutil.which("prlimit") else []
    if case.no_dac and os.geteuid() == 0 and shutil.which("setpriv"):
        command += ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    command.append(_kiosk())
    if case.stdout == "closed":   # close descriptor 1 in the child: a shell does it portably
        command = ["sh", "-c", 'exec "$@" >&-', "sh", *command]
    command += argv

    stdin = open(_expand(case.stdin, files), "rb") if case.stdin else subprocess.DEVNULL
    reader = None
    if case.stdout == "full":
        stdout = open("/dev/full", "wb")
    elif case.stdout == "broken":
        reader, stdout = os.pipe()
        os.close(reader)
        reader = None
    else:
        stdout = subprocess.PIPE
    try:
        proc = subprocess.Popen(command, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env,
                                cwd=files["cwd"], start_new_session=True)
    finally:
        if stdin is not subprocess.DEVNULL:
            stdin.close()
        if case.stdout == "full":
            stdout.close()
        elif case.stdout == "broken":
            os.close(stdout)
    try:
        out, err = proc.communicate(timeout=case.timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = None
    return Result(code, (out or b"").decode("utf-8", "replace"), err.decode("utf-8", "replace"), argv)


def check(case: Case, r: Result) -> None:
    shown = f"kiosk {' '.join(map(repr, r.argv))[:300]} (stdout {case.stdout})"
    assert r.code is not None, f"{shown} did not finish in {case.timeout} s; stderr: {r.err[-500:]!r}"
    assert "Traceback" not in r.err and "Traceback" not in r.out, f"{shown}: {r.err[-2000:]}"
    assert "internal error" not in r.err, f"{shown}: {r.err[-1000:]}"
    assert "Exception ignored" not in r.err, f"{shown}: {r.err[-1000:]}"
    assert r.code in case.codes, f"{shown} exited {r.code}, not {case.codes}; stderr: {r.err[-1000:]!r}"
    lines = r.err.splitlines()
    if case.stdout == "broken":   # the reader went away: exit 1, quietly or with one line
        assert len(lines) <= 1, f"{shown}: {r.err!r}"
        return
    assert lines and lines[0].strip(), f"{shown} failed without a word (exit {r.code})"
    lines = [line for line in lines if ": warning: " not in line] or lines   # warnings are not the error
    if len(lines) > 1:   # an invalid spec: one line per problem, each naming the file, and indented detail
        source = lines[0].split(": ", 1)[0]
        named = [line for line in lines if not line.startswith("    ")]
        assert all(line.startswith(f"{source}: ") for line in named) and source != "kiosk", \
            f"{shown}: more than one line on stderr: {r.err[-2000:]!r}"


# ---------------------------------------------------------------------------------------------
# The table

FILES = ["fifo", "devzero", "devnull", "dir", "missing", "huge", "deep", "deepobj", "surrogate", "latin1",
         "utf16", "bigint", "nan", "unreadable", "garbage"]
NUMBERS = ["nan", "inf", "-inf", "-1", "1e309", "9" * 5000, "0x10", ""]


def _spec_cases(command: list, ids: str, files=FILES) -> list[Case]:
    out = [Case(f"{ids}-{name}", [*command, f"{{{name}}}"], no_dac=name == "unreadable") for name in files]
    for label, arg in (("surrogate-arg", SURROGATE_ARG), ("latin1-arg", LATIN1_ARG), ("long-arg", LONG_ARG),
                       ("empty-arg", "")):
        out.append(Case(f"{ids}-{label}", [*command, arg]))
    return out


def _cases() -> list[Case]:
    cases: list[Case] = []
    # validate, show, build: the spec (kiosk/spec reads it)
    cases += _spec_cases(["validate"], "validate")
    cases += _spec_cases(["show", "--json"], "show-json")
    cases += _spec_cases(["show"], "show", files=["fifo", "devzero", "surrogate", "deep"])
    cases += _spec_cases(["build", "-o", "{dir}"], "build", files=["fifo", "devzero", "dir", "missing", "deep"])

    # run: SPEC|IMAGE, and its options (checked before anything is read or started); --print-command never boots
    for name in ["fifo", "devzero", "devnull", "dir", "missing", "garbage", "unreadable"]:
        cases.append(Case(f"run-{name}", ["run", f"{{{name}}}", "--print-command"], no_dac=name == "unreadable"))
    for name in ["surrogate", "deep", "huge", "latin1"]:   # JSON: taken for a spec, which kiosk/spec reads
        cases.append(Case(f"run-{name}", ["run", f"{{{name}}}", "--print-command"]))
    run_img = ["run", "{img}", "--board", "qemu", "--print-command"]
    for option in ("--memory", "--disk-size"):
        for value in ["nan", "inf", "-1", "0", "9" * 5000, "1e3G", "\u0661G", ""]:
            cases.append(Case(f"run{option}={value[:8]}", [*run_img, option, value]))
    for value in ["-1", "70000", "nan", "9" * 5000]:
        cases.append(Case(f"run--ssh-port={value[:8]}", [*run_img, "--ssh-port", value]))
    for name in ["fifo", "zeronode", "dir"]:
        cases.append(Case(f"run--disk-{name}", [*run_img, "--disk", f"{{{name}}}"]))
    for label, board in (("surrogate", SURROGATE_ARG), ("traversal", "../../etc/passwd"), ("missing", "nosuch")):
        cases.append(Case(f"run--board-{label}", ["run", "{img}", "--board", board, "--print-command"]))
    for name in ["fifo", "devzero", "dir", "missing", "img", "sock"]:   # sock: a VM's socket, the VM gone
        cases.append(Case(f"run-screendump-qmp-{name}", ["run", "--screendump", "{out}.png", "--qmp", f"{{{name}}}"]))

    # flash: only files, never a disk; the targets that are nodes are our own
    for name in ["fifo", "devzero", "devnull", "dir", "missing", "unreadable"]:
        cases.append(Case(f"flash-image-{name}", ["flash", f"{{{name}}}", "{out}"], no_dac=name == "unreadable"))
    for name in ["fifo", "devzero", "devnull", "dir", "missing", "huge", "deep", "latin1", "utf16", "garbage",
                 "unreadable"]:
        cases.append(Case(f"flash-bmap-{name}", ["flash", "{img}", "{out}", "--bmap", f"{{{name}}}"],
                          no_dac=name == "unreadable"))
    for name in ["fifo", "nullnode", "zeronode", "dir", "missingdir", "img"]:
        cases.append(Case(f"flash-target-{name}", ["flash", "{img}", f"{{{name}}}"]))
    cases.append(Case("flash-target-surrogate-dir", ["flash", "{img}", b"/nonexistent-\xed\xa0\x80/x.img"]))

    # generations, rollback, switch: an empty or hostile device root (kiosk/device)
    for name in ["fifo", "zeronode", "missing", "img"]:
        cases.append(Case(f"generations-root-{name}", ["generations", "--root", f"{{{name}}}"]))
        cases.append(Case(f"generations-json-root-{name}", ["generations", "--json", "--root", f"{{{name}}}"]))
    for value in ["nan", "-1", "0", "9" * 5000, "99999", SURROGATE_ARG]:
        label = value[:8] if isinstance(value, str) else "surrogate"
        cases.append(Case(f"rollback-{label}", ["rollback", value, "--root", "{root}"]))
        cases.append(Case(f"switch-{label}", ["switch", "switch", value, "--root", "{root}"]))
    cases.append(Case("rollback-empty-root", ["rollback", "--root", "{root}"]))
    cases.append(Case("switch-recover-fifo-root", ["switch", "--recover", "--root", "{fifo}"]))
    cases.append(Case("switch-dry-activate-empty-root", ["switch", "dry-activate", "--root", "{root}"]))

    # agent: a bad --interval must be refused before it starts answering on the network
    for value in ["nan", "inf", "-1", "0"]:
        cases.append(Case(f"agent--interval={value[:8]}", ["agent", "--state-dir", "{dir}", "--interval", value], timeout=AGENT_TIMEOUT))

    # discover, resolve, ssh-proxy (kiosk/net)
    for value in ["nan", "inf", "-1", "1e309"]:
        cases.append(Case(f"discover--timeout={value}", ["discover", "--timeout", value]))
        cases.append(Case(f"resolve--timeout={value}", ["resolve", "nosuchkiosk.local", "--timeout", value]))
        cases.append(Case(f"ssh-proxy--timeout={value}", ["ssh-proxy", "nosuchkiosk.local", "22", "--timeout", value]))
    for label, host in (("surrogate", SURROGATE_ARG), ("empty", ""), ("long", LONG_ARG), ("newline", "a\nb.local"),
                        ("dots", "..local")):
        cases.append(Case(f"resolve-host-{label}", ["resolve", host, "--timeout", "1"]))
        cases.append(Case(f"ssh-proxy-host-{label}", ["ssh-proxy", host, "22", "--timeout", "1"]))
    for value in ["-1", "70000", "nan", "9" * 5000]:
        cases.append(Case(f"ssh-proxy-port={value[:8]}", ["ssh-proxy", "nosuchkiosk.local", value, "--timeout", "1"]))

    # status (kiosk/update/status.py): the host, the port; --here on an empty root; ssh that says nothing
    for label, host in (("surrogate", SURROGATE_ARG), ("empty", ""), ("long", LONG_ARG), ("newline", "a\nb.local"),
                        ("option", "-oProxyCommand=touch /tmp/x")):
        cases.append(Case(f"status-host-{label}", ["status", host]))
    for value in ["-1", "nan", "9" * 5000]:
        cases.append(Case(f"status-port={value[:8]}", ["status", "lobby.example", "-p", value]))
    cases.append(Case("status-here-empty-root", ["status", "--here"]))
    cases.append(Case("status-here-and-host", ["status", "--here", "lobby.example"]))
    cases.append(Case("status-ssh-says-nothing", ["status", "lobby.example", "--json"]))

    # builders check/authorize, builder-serve (kiosk/builders)
    cases += _spec_cases(["builders", "check", "--root", "{root}"], "builders-check",
                         files=["fifo", "devzero", "dir", "missing", "deep", "surrogate", "huge"])
    cases.append(Case("builders-check-image-dir-missing", ["builders", "check", "--root", "{root}", "--image-dir",
                                                           "{missing}", "{sample}"]))
    authorize = ["builders", "authorize", "--authorized-keys", "{home}/authorized_keys"]
    cases += _spec_cases(authorize, "builders-authorize",
                         files=["fifo", "devzero", "dir", "missing", "deep", "surrogate"])
    for name in ["fifo", "devzero", "dir", "missing", "huge", "latin1", "utf16", "garbage"]:
        cases.append(Case(f"builders-authorize-key-{name}", [*authorize, "--key", f"{{{name}}}", "{sample}"]))
    for name in ["fifo", "nullnode", "zeronode", "dir", "missingdir"]:   # never the machine's /dev/null (item 9)
        cases.append(Case(f"builders-authorize-into-{name}",
                          ["builders", "authorize", "--authorized-keys", f"{{{name}}}", "--key", "{sample}", "{sample}"]))
    for name in ["devzero", "huge", "deep", "deepobj", "surrogate", "latin1", "utf16", "bigint", "nan", "garbage"]:
        cases.append(Case(f"builder-serve-stdin-{name}", ["builder-serve"], stdin=f"{{{name}}}"))

    # fleet: the inventory (YAML or INI, read by kiosk/fleet), the base spec, the numbers
    inventories = FILES + ["yamlbomb", "yamldeep", "yamltab"]
    cases += _spec_cases(["fleet", "show"], "fleet-show", files=inventories)
    cases += _spec_cases(["fleet", "push", "--json"], "fleet-push", files=["fifo", "devzero", "dir", "huge",
                                                                          "yamlbomb", "utf16"])
    cases += _spec_cases(["fleet", "status"], "fleet-status", files=["fifo", "devzero", "missing", "yamldeep"])
    cases += _spec_cases(["fleet", "build", "-o", "{dir}"], "fleet-build", files=["fifo", "devzero", "missing"])
    cases += _spec_cases(["fleet", "show", "{inventory}"], "fleet-show-spec",
                         files=["fifo", "devzero", "dir", "missing", "huge", "deep", "surrogate", "utf16", "nan"])
    for option in ("--max-failures", "--connect-timeout", "--batch", "--parallel", "--canary"):
        for value in ["nan", "inf", "-1", "150%", "9" * 5000, ""]:
            cases.append(Case(f"fleet-push{option}={value[:8]}",
                              ["fleet", "push", "{inventory}", "{sample}", option, value]))
    for value in ["nan", "inf", "-1", "1e309", "0"]:
        cases.append(Case(f"fleet-status--timeout={value}", ["fleet", "status", "{inventory}", "--timeout", value]))
        cases.append(Case(f"fleet-discover--timeout={value}", ["fleet", "discover", "--timeout", value]))
    for label, limit in (("surrogate", SURROGATE_ARG), ("nothing", "nosuch"), ("empty", ""), ("long", LONG_ARG)):
        cases.append(Case(f"fleet-show--limit-{label}", ["fleet", "show", "{inventory}", "{sample}", "--limit", limit]))

    # hook: git's lines on stdin, an empty device root (kiosk/device)
    for hook in ("pre-receive", "post-receive"):
        for name in ["devzero", "huge", "garbage", "lines", "surrogate"]:
            cases.append(Case(f"hook-{hook}-{name}", ["hook", hook], stdin=f"{{{name}}}"))

    # global: usage errors are one line too
    cases.append(Case("unknown-command", ["no-such-command"]))
    cases.append(Case("unknown-option", ["validate", "--no-such-option"]))
    cases.append(Case("surrogate-command", [SURROGATE_ARG]))
    cases.append(Case("missing-arguments", ["flash"]))
    return cases


# Standard output that cannot be written: every command that prints, and --help/--version (argparse's).
STDOUT_COMMANDS = {
    "help": ["--help"],
    "version": ["--version"],
    "flash-help": ["flash", "--help"],
    "validate": ["validate", "{sample}"],
    "show": ["show", "{sample}"],
    "show-json": ["show", "--json", "{sample}"],
    "ssh-config": ["ssh-config"],
}


def _stdout_cases() -> list[Case]:
    return [Case(f"stdout-{how}-{name}", argv, stdout=how, codes=(1,))
            for name, argv in STDOUT_COMMANDS.items() for how in ("full", "closed", "broken")]


CASES = _cases()
STDOUT_CASES = _stdout_cases()
assert len({c.id for c in CASES + STDOUT_CASES}) == len(CASES + STDOUT_CASES), "case ids must be unique"
assert set(KNOWN) <= {c.id for c in CASES}, f"KNOWN names no case: {set(KNOWN) - {c.id for c in CASES}}"


@pytest.fixture(scope="module")
def results(request, tmp_path_factory):
    """Every selected case started at once on a few workers (most of the time is Python starting up)."""
    base = tmp_path_factory.mktemp("hostile")
    shared = _shared_files(base / "shared")
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    pool = ThreadPoolExecutor(WORKERS)
    futures = {case.id: pool.submit(_run, case, shared, base) for case in CASES + STDOUT_CASES
               if case.id in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    for path in base.rglob("unreadable.json"):
        path.chmod(0o600)


def _params(cases):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=False, reason=KNOWN[c.id])] if c.id in KNOWN
                         else []) for c in cases]


@pytest.mark.parametrize("case", _params(CASES))
def test_hostile_input_ends_on_one_line_with_status_1_or_2(case, results):
    check(case, results[case.id].result())


@pytest.mark.parametrize("case", _params(STDOUT_CASES))
def test_stdout_that_cannot_be_written_is_one_line_and_status_1(case, results):
    r = results[case.id].result()
    check(case, r)
    last = r.err.splitlines()[-1:]   # (validate and show warn first that KIOSK_OFFLINE=1 skipped the package check)
    if case.stdout == "full":
        assert last == ["kiosk: cannot write to standard output: No space left on device"]
    elif case.stdout == "closed":
        assert last == ["kiosk: cannot write to standard output: Bad file descriptor"]
