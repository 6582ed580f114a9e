#!/usr/bin/env python3
"""Run devpi-client's own live-server tests against minidevpi.

devpi-client's source distribution carries its tests (``testing/``); their conftest starts
``devpi-init`` and ``devpi-server`` from PATH. This script puts shims with those names first
on PATH that run ``minidevpi.py init`` / ``serve`` instead, then runs pytest over the tests
that use a live server (those needing the ``url_of_liveserver`` fixture) and prints the
counts and the failing tests.

    python3 benchmarks/devpi_client_suite.py [--version 7.3.0] [--workdir DIR] [--venv DIR]
                                             [--all] [-- PYTEST ARGS...]

The tests and their dependencies (pytest, pytest-timeout, mock, webtest, sphinx, tox, ...)
are installed into a venv of their own (``--venv``, default /tmp/devpi-suite-venv), never
into the one that runs minidevpi's tests. Needs the package index pip is configured with.

What the shims do with the options the conftest passes:

- devpi-init: ``--serverdir``, ``--no-root-pypi``, ``--root-passwd`` go through; root's
  password is the empty one unless given (devpi-init's default; minidevpi's is random).
- devpi-server: ``--serverdir``, ``--host``, ``--port``, ``--offline-mode``,
  ``--no-root-pypi``, ``--root-passwd`` go through; ``--debug`` and devpi's
  ``--argon2-*`` and ``--indexer-backend`` (options of what minidevpi does not have) are
  dropped with their values; ``--version`` prints the devpi-server version whose API
  minidevpi speaks; ``-h`` prints minidevpi's help. Anything else goes through, and
  minidevpi refuses what it doesn't know. The server's output goes to SERVERDIR.log.
- What devpi-server does without being told, said to minidevpi as a user would configure
  it (SERVER_DEFAULTS): ``--mirror-creators anyone`` (devpi lets every user make mirror
  indexes; minidevpi leaves that to root unless told), and ``--mirror-allow-host
  127.0.0.1``: the tests' own simple index (simpypi) listens there, and a user's mirror
  fetches from no loopback host unless allowed (devpi-server has no such policy).
  Mirrors of the public index reach it through pip's configuration (a mirror made without
  mirror_url takes the index pip is configured with).

The build isolation of ``devpi upload`` gets ``flit_core<4`` (BUILD_CONSTRAINTS, through
PIP_CONSTRAINT): devpi-client 7.3.0's ``test_wheel_pyproject_toml`` writes a
``pyproject.toml`` with ``packages = "find:"`` in ``[project]``, which flit_core 4 refuses
("Unrecognised key(s) in [project] table") before any server is involved.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
MINIDEVPI = os.path.join(os.path.dirname(HERE), "minidevpi.py")
TEST_DEPS = ["pytest", "pytest-timeout", "mock", "webtest", "wheel", "sphinx", "tox",
             "setuptools", "build", "pypitoken"]
# what devpi-server does unasked, as minidevpi options (see the docstring)
SERVER_DEFAULTS = ["--mirror-creators", "anyone", "--mirror-allow-host", "127.0.0.1"]
# pins for the isolated builds of the tests' projects (see the docstring)
BUILD_CONSTRAINTS = ["flit_core<4"]

# --storage pg8000:...: each server directory the suite makes gets a database of its own on
# that cluster, named after the directory (the database in the spec is only a prefix)
STORAGE_SNIPPET = r'''
def storage_for(serverdir, create):
    spec = %(storage)r
    if not spec or not serverdir:
        return []
    import hashlib
    settings = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(",") if kv)
    name = "%%s_%%s" %% (settings.get("database", "suite"), hashlib.sha1(
        os.path.abspath(serverdir).encode()).hexdigest()[:12])
    if create:
        import pg8000.native
        kw = {k: v for k, v in settings.items() if k in ("host", "user", "password", "unix_sock")}
        if "port" in settings:
            kw["port"] = int(settings["port"])
        con = pg8000.native.Connection(database="postgres", **kw)
        try:
            con.run("DROP DATABASE IF EXISTS %%s WITH (FORCE)" %% name)
            con.run("CREATE DATABASE %%s TEMPLATE template0" %% name)
        finally:
            con.close()
    settings["database"] = name
    return ["--storage", "pg8000:" + ",".join("%%s=%%s" %% kv for kv in settings.items())]
'''

INIT_SHIM = r'''#!%(python)s
import os, sys
''' + STORAGE_SNIPPET + r'''
args, i, root = [], 1, None
argv = sys.argv
while i < len(argv):
    a = argv[i]
    if a == "--root-passwd" and i + 1 < len(argv):
        root = argv[i + 1]; i += 2; continue
    if a.startswith("--root-passwd="):
        root = a.split("=", 1)[1]; i += 1; continue
    args.append(a); i += 1
args += ["--root-passwd", "" if root is None else root]
args += storage_for(args[args.index("--serverdir") + 1] if "--serverdir" in args else None, True)
os.execv(%(python)r, [%(python)r, %(minidevpi)r, "init"] + args)
'''

SERVER_SHIM = r'''#!%(python)s
import os, sys
''' + STORAGE_SNIPPET + r'''
DROP_WITH_VALUE = ("--argon2-memory-cost", "--argon2-parallelism", "--argon2-time-cost",
                   "--indexer-backend")
DROP = ("--debug",)
argv = sys.argv[1:]
if "--version" in argv:
    sys.path.insert(0, os.path.dirname(%(minidevpi)r))
    import minidevpi
    print(minidevpi.DEVPI_SERVER_VERSION)
    sys.exit(0)
if "-h" in argv or "--help" in argv:
    os.execv(%(python)r, [%(python)r, %(minidevpi)r, "serve", "--help"])
args, i, serverdir = [], 0, None
while i < len(argv):
    a = argv[i]
    name = a.split("=", 1)[0]
    if name in DROP_WITH_VALUE:
        i += 1 if "=" in a else 2; continue
    if a in DROP:
        i += 1; continue
    if a == "--serverdir" and i + 1 < len(argv):
        serverdir = argv[i + 1]
    args.append(a); i += 1
if serverdir:
    log = os.open(serverdir.rstrip("/") + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
given = set(a.split("=", 1)[0] for a in args)
for i in range(0, len(%(defaults)r), 2):
    if %(defaults)r[i] not in given:
        args += %(defaults)r[i:i + 2]
os.execv(%(python)r, [%(python)r, %(minidevpi)r, "serve"] + args + storage_for(serverdir, False))
'''

PLUGIN = r'''
import json, os
import pytest

RESULTS = os.environ["SUITE_RESULTS"]
ALL = os.environ.get("SUITE_ALL") == "1"
_outcomes = {}


def pytest_collection_modifyitems(config, items):
    if ALL:
        return
    keep, drop = [], []
    for item in items:
        (keep if "url_of_liveserver" in getattr(item, "fixturenames", ()) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_logreport(report):
    o = _outcomes.setdefault(report.nodeid, {"outcome": "passed", "why": ""})
    if report.when == "call" and hasattr(report, "wasxfail"):
        o["outcome"] = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        o["outcome"] = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        o["why"] = (crash.message if crash else str(report.longrepr))[:300]
    elif report.skipped and o["outcome"] == "passed":
        o["outcome"] = "skipped"
        o["why"] = str(report.longrepr[-1] if isinstance(report.longrepr, tuple)
                       else report.longrepr)[:300]


def pytest_sessionfinish(session):
    with open(RESULTS, "w") as f:
        json.dump(_outcomes, f, indent=1)
'''


def run(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def venv_bin(venv, name):
    return os.path.join(venv, "Scripts" if os.name == "nt" else "bin", name)


def prepare(args):
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    py = venv_bin(args.venv, "python")
    if not os.path.exists(py):
        run([sys.executable, "-m", "venv", args.venv])
    stem = "devpi_client_%s" % args.version  # (either spelling of the sdist's name)
    unpacked = [n for n in os.listdir(work) if n.lower().replace("-", "_") == stem
                and os.path.isdir(os.path.join(work, n, "testing"))]
    src = os.path.join(work, unpacked[0]) if unpacked else None
    if src is None:
        run([py, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
             "-d", work, "devpi-client==%s" % args.version])
        sdist = [f for f in os.listdir(work) if f.endswith(".tar.gz")
                 and f[:-len(".tar.gz")].lower().replace("-", "_") == stem][0]
        with tarfile.open(os.path.join(work, sdist)) as tf:
            tf.extractall(work)  # (a release of the client's own project)
        names = [n for n in os.listdir(work) if os.path.isdir(os.path.join(work, n))
                 and n.lower().replace("-", "_") == stem]
        src = os.path.join(work, names[0])
    have = subprocess.run([py, "-m", "pip", "show", "devpi-client", "webtest", "tox"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
    if have.count("Name:") < 3 or ("Version: %s" % args.version) not in have:
        run([py, "-m", "pip", "install", "-q", *TEST_DEPS, src])
    shims = os.path.join(work, "bin")
    os.makedirs(shims, exist_ok=True)
    for name, text in (("devpi-init", INIT_SHIM), ("devpi-server", SERVER_SHIM)):
        path = os.path.join(shims, name)
        with open(path, "w") as f:
            f.write(text % {"python": sys.executable, "minidevpi": MINIDEVPI,
                            "defaults": SERVER_DEFAULTS,
                            "storage": args.storage})
        os.chmod(path, 0o755)
    with open(os.path.join(work, "suite_plugin.py"), "w") as f:
        f.write(PLUGIN)
    with open(os.path.join(work, "build-constraints.txt"), "w") as f:
        f.write("".join(line + "\n" for line in BUILD_CONSTRAINTS))
    return work, src, shims, py


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--version", default="7.3.0", help="devpi-client version to test")
    p.add_argument("--workdir", default="/tmp/devpi-client-suite")
    p.add_argument("--venv", default="/tmp/devpi-suite-venv")
    p.add_argument("--all", action="store_true",
                   help="run every test of the suite, not only the live-server ones")
    p.add_argument("--storage", metavar="SPEC",
                   help="run the servers the suite starts on PostgreSQL: "
                        "pg8000:host=H,port=P,user=U[,database=PREFIX], each server directory "
                        "a database of its own named PREFIX_HASH, made (dropped and created "
                        "again) by devpi-init; the Python running this needs pg8000")
    p.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = p.parse_args(argv)
    work, src, shims, py = prepare(args)
    results = os.path.join(work, "results.json")
    if os.path.exists(results):
        os.remove(results)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([shims, os.path.dirname(py), env.get("PATH", "")])
    env["PYTHONPATH"] = work
    env["VIRTUAL_ENV"] = os.path.abspath(args.venv)  # (as under tox, which the tests expect)
    env["SUITE_RESULTS"] = results
    env["SUITE_ALL"] = "1" if args.all else "0"
    env["PIP_CONSTRAINT"] = " ".join(filter(None, [
        env.get("PIP_CONSTRAINT"), os.path.join(work, "build-constraints.txt")]))
    env.pop("DEVPI_INDEX", None)
    basetemp = os.path.join(work, "tmp")
    shutil.rmtree(basetemp, ignore_errors=True)
    cmd = [py, "-m", "pytest", "-p", "suite_plugin", "-p", "no:cacheprovider", "-q",
           "--basetemp", basetemp, "testing", *args.pytest_args]
    print("+ " + " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=src, env=env).returncode
    if not os.path.exists(results):
        print("pytest ended (%d) without results" % code)
        return 1
    with open(results) as f:
        outcomes = json.load(f)
    counts = {}
    for o in outcomes.values():
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    print("\ndevpi-client %s %s tests against minidevpi: %d" % (
        args.version, "" if args.all else "live-server", len(outcomes)))
    print("  " + ", ".join("%s %d" % kv for kv in sorted(counts.items())))
    for nodeid, o in sorted(outcomes.items()):
        if o["outcome"] in ("failed", "error"):
            print("  %s %s\n      %s" % (o["outcome"].upper(), nodeid,
                                         o["why"].replace("\n", " ")[:200]))
    return 0 if counts.get("failed", 0) + counts.get("error", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
