#!/usr/bin/env python3
"""Benchmarks: minidevpi against devpi-server and pypiserver, on this machine.

    python3 benchmarks/bench.py [--quick] [--peers-python /tmp/benchvenv/bin/python]

Starts each server on 127.0.0.1 (free ports, temporary directories, all removed at the end,
also on Ctrl-C), fills each with the same generated distributions over HTTP, drives the same
requests at each and prints a table. Ratios are "how many times better minidevpi is": peer ÷
minidevpi for times, minidevpi ÷ peer for rates; above 1 means minidevpi wins. Standard
library only; uses `wrk` for the keep-alive load test when it is on PATH. See README.md here.
Other scenarios run alone: --cold-mirror, --scale, --tail, and --processes (one serve on
sqlite against 1, 2 and 4 serve processes sharing a PostgreSQL database; needs pg8000).
"""

import argparse
import base64
import functools
import gzip
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from urllib.parse import urljoin, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MINIDEVPI = os.path.join(REPO, "minidevpi.py")
USER, PASSWORD, INDEX = "bench", "bench-secret", "dev"
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
HTML_ACCEPT = "text/html"

PROCS = []      # every subprocess we started, stopped in cleanup()
TMPDIRS = []    # every temporary directory we made, removed in cleanup()


def say(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------
# Distributions
# ----------------------------------------------------------------------------------

def _b64hash(data):
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(name, version, payload=b"", requires=()):
    """A small valid pure-Python wheel; ``payload`` goes in as an uncompressed data file."""
    dist = re.sub(r"[-_.]+", "_", name).lower()
    di = "%s-%s.dist-info" % (dist, version)
    meta = ("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: minidevpi benchmark package\n"
            % (name, version)) + "".join("Requires-Dist: %s\n" % r for r in requires)
    files = [("%s/__init__.py" % dist, ("__version__ = %r\n" % version).encode(), zipfile.ZIP_DEFLATED)]
    if payload:
        files.append(("%s/data.bin" % dist, payload, zipfile.ZIP_STORED))
    files.append(("%s/METADATA" % di, meta.encode(), zipfile.ZIP_DEFLATED))
    files.append(("%s/WHEEL" % di, b"Wheel-Version: 1.0\nGenerator: minidevpi-bench\n"
                  b"Root-Is-Purelib: true\nTag: py3-none-any\n", zipfile.ZIP_DEFLATED))
    record = "".join("%s,sha256=%s,%d\n" % (p, _b64hash(d), len(d)) for p, d, _ in files)
    record += "%s/RECORD,,\n" % di
    files.append(("%s/RECORD" % di, record.encode(), zipfile.ZIP_DEFLATED))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data, comp in files:
            zi = zipfile.ZipInfo(path, date_time=(2024, 1, 1, 0, 0, 0))
            zi.compress_type = comp
            zi.external_attr = 0o644 << 16
            zf.writestr(zi, data)
    return "%s-%s-py3-none-any.whl" % (dist, version), buf.getvalue(), "bdist_wheel", "py3"


def make_sdist(name, version):
    dist = re.sub(r"[-_.]+", "_", name).lower()
    base = "%s-%s" % (dist, version)
    pkginfo = ("Metadata-Version: 2.1\nName: %s\nVersion: %s\nSummary: minidevpi benchmark package\n"
               % (name, version)).encode()
    pyproject = (b'[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                 b'[project]\nname = "%s"\nversion = "%s"\n' % (name.encode(), version.encode()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for path, data in (("PKG-INFO", pkginfo), ("pyproject.toml", pyproject),
                           ("%s/__init__.py" % dist, b"")):
            ti = tarfile.TarInfo("%s/%s" % (base, path))
            ti.size, ti.mtime, ti.mode = len(data), 1704067200, 0o644
            tf.addfile(ti, io.BytesIO(data))
    return base + ".tar.gz", buf.getvalue(), "sdist", "source"


def multipart(name, version, dist):
    filename, data, filetype, pyversion = dist
    boundary = "minidevpibench" + uuid.uuid4().hex
    fields = [(":action", "file_upload"), ("protocol_version", "1"), ("metadata_version", "2.1"),
              ("name", name), ("version", version), ("filetype", filetype),
              ("pyversion", pyversion), ("sha256_digest", hashlib.sha256(data).hexdigest())]
    out = []
    for k, v in fields:
        out.append(('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                    % (boundary, k, v)).encode())
    out.append(('--%s\r\nContent-Disposition: form-data; name="content"; filename="%s"\r\n'
                'Content-Type: application/octet-stream\r\n\r\n' % (boundary, filename)).encode())
    out.append(data)
    out.append(("\r\n--%s--\r\n" % boundary).encode())
    return b"".join(out), "multipart/form-data; boundary=" + boundary


# ----------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------

class Client:
    """One keep-alive connection, reconnecting when the server closed it."""

    def __init__(self, port, timeout=120):
        self.port, self.timeout, self.conn = port, timeout, None

    def request(self, method, path, body=None, headers=None, read=True):
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read() if read else resp
                if read and resp.will_close:
                    self.close()
                return resp.status, data, resp
            except (ConnectionError, http.client.BadStatusLine, http.client.CannotSendRequest):
                self.close()
                if attempt == 2 or body is not None and not isinstance(body, (bytes, str)):
                    raise
        raise AssertionError

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def basic_auth(user, pw):
    return "Basic " + base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_answered(port, proc, deadline_s=120):
    """Poll until a GET / gets any HTTP answer; returns the monotonic time of the answer."""
    end = time.monotonic() + deadline_s
    req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited with %s before answering" % proc.returncode)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(req)
                if s.recv(12).startswith(b"HTTP/"):
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.002)
    raise RuntimeError("no answer on port %d within %ss" % (port, deadline_s))


def vm_hwm_mb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


# ----------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------

def mkdtemp(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    TMPDIRS.append(d)
    return d


def server_env():
    """The environment of the servers: whatever proxy is configured, 127.0.0.1 is reached
    directly (the fake upstream of the mirror scenarios lives there)."""
    return dict(os.environ, no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")


def popen(cmd, logpath, env=None):
    log = open(logpath, "ab")
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True, env=env)
    log.close()
    PROCS.append(p)
    return p


def stop_proc(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in PROCS:
        PROCS.remove(p)


class Target:
    name = "?"

    def __init__(self, python):
        self.python = python
        self.proc = None
        self.port = None
        self.dir = None
        self.online = False  # True: may talk to an upstream (the fake one of the mirror runs)

    # subclasses: command(s), paths
    def launch(self, fresh):
        raise NotImplementedError

    def start(self, fresh=True):
        """Start (initialising a new directory when ``fresh``); returns seconds to answer."""
        if fresh:
            self.dir = mkdtemp("bench-%s-" % self.name)
        self.port = free_port()
        t0 = time.monotonic()
        self.launch(fresh)
        return wait_answered(self.port, self.proc) - t0

    def stop(self):
        if self.proc is not None:
            stop_proc(self.proc)
            self.proc = None

    def discard(self):
        self.stop()
        if self.dir and self.dir in TMPDIRS:
            shutil.rmtree(self.dir, ignore_errors=True)
            TMPDIRS.remove(self.dir)
        self.dir = None

    def log(self):
        return os.path.join(self.dir, "bench-server.log")

    def serverdir(self):
        return os.path.join(self.dir, "server")  # created by the server itself

    def setup(self):
        pass

    def upload_headers(self):
        return {"Authorization": basic_auth(USER, PASSWORD)}

    def simple_root(self):
        return "/%s/%s/+simple/" % (USER, INDEX)

    def upload_path(self):
        return "/%s/%s/" % (USER, INDEX)

    def upload(self, client, name, version, dist):
        if callable(dist):  # made when it is sent (large fills are not kept in memory)
            dist = dist()
        body, ctype = multipart(name, version, dist)
        headers = dict(self.upload_headers(), **{"Content-Type": ctype})
        status, data, _ = client.request("POST", self.upload_path(), body=body, headers=headers)
        return status, data


class DevpiLike(Target):
    """minidevpi and devpi-server share the HTTP API for users and indexes."""

    def setup(self):
        c = Client(self.port)
        st, body, _ = c.request("PUT", "/" + USER, json.dumps({"password": PASSWORD}),
                                {"Content-Type": "application/json", "Accept": "application/json"})
        assert st in (200, 201), (self.name, "create user", st, body[:300])
        st, body, _ = c.request("PUT", "/%s/%s" % (USER, INDEX), json.dumps({"volatile": True}),
                                {"Content-Type": "application/json", "Accept": "application/json",
                                 "Authorization": basic_auth(USER, PASSWORD)})
        assert st in (200, 201), (self.name, "create index", st, body[:300])
        c.close()

    def make_mirror(self, upstream_url):
        """root/pypi as a mirror of ``upstream_url``, made as root over the JSON API."""
        c = Client(self.port)
        st, body, _ = c.request("PUT", "/root/pypi",
                                json.dumps({"type": "mirror", "mirror_url": upstream_url}),
                                {"Content-Type": "application/json", "Accept": "application/json",
                                 "Authorization": basic_auth("root", "pw")})
        c.close()
        if st not in (200, 201):
            raise RuntimeError("creating the mirror root/pypi answered %s: %s" % (st, body[:300]))


class Minidevpi(DevpiLike):
    name = "minidevpi"
    script = MINIDEVPI  # another minidevpi.py may be measured (before/after)

    def launch(self, fresh):
        self.proc = popen([sys.executable, self.script, "serve", "--serverdir", self.serverdir(),
                           "--host", "127.0.0.1", "--port", str(self.port), "--root-passwd", "pw",
                           "--no-root-pypi", "--no-access-log"]
                          + ([] if self.online else ["--offline-mode"]), self.log(), server_env())


class DevpiServer(DevpiLike):
    name = "devpi-server"

    def bin(self, name):
        return os.path.join(os.path.dirname(self.python), name)

    def launch(self, fresh):
        if fresh:
            r = subprocess.run([self.bin("devpi-init"), "--serverdir", self.serverdir(), "--no-root-pypi",
                                "--root-passwd", "pw"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            if r.returncode:
                raise RuntimeError("devpi-init failed: %s" % r.stdout.decode()[-2000:])
        self.proc = popen([self.bin("devpi-server"), "--serverdir", self.serverdir(), "--host",
                           "127.0.0.1", "--port", str(self.port)]
                          + ([] if self.online else ["--offline-mode"]), self.log(), server_env())


class PypiServer(Target):
    name = "pypiserver"

    def launch(self, fresh):
        pkgdir = self.serverdir()
        os.makedirs(pkgdir, exist_ok=True)
        self.proc = popen([os.path.join(os.path.dirname(self.python), "pypi-server"), "run",
                           "-i", "127.0.0.1", "-p", str(self.port), "-a", ".", "-P", ".",
                           "--disable-fallback", "--log-stream", "none", pkgdir], self.log(),
                          server_env())

    def upload_headers(self):
        return {}

    def simple_root(self):
        return "/simple/"

    def upload_path(self):
        return "/"


# ----------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------

def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def latency(port, path, n, headers=None):
    """Median seconds of ``n`` sequential GETs over one keep-alive connection."""
    c = Client(port)
    c.request("GET", path, headers=headers)  # warm
    times, bad = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        st, _, _ = c.request("GET", path, headers=headers)
        times.append(time.perf_counter() - t0)
        bad += st != 200
    c.close()
    return statistics.median(times), bad


def load_wrk(port, path, headers, conns, seconds):
    cmd = ["wrk", "-t", "2", "-c", str(conns), "-d", "%ds" % max(1, round(seconds)),
           "--timeout", "10s"]
    for k, v in headers.items():
        cmd += ["-H", "%s: %s" % (k, v)]
    cmd.append("http://127.0.0.1:%d%s" % (port, path))
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=seconds + 60,
                         stdin=subprocess.DEVNULL).stdout.decode()
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    if not m:
        raise RuntimeError("wrk output not understood:\n" + out)
    errors = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s*(\d+)", out))
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        errors += sum(int(x) for x in se.groups())
    return float(m.group(1)), errors


def load_threads(port, path, headers, conns, seconds, times=None):
    """Fallback when wrk is missing: ``conns`` threads, each one keep-alive connection.
    Shares the GIL with nothing else but itself; wrk measures servers more faithfully.
    ``times``: a list that gets the seconds of every request (for percentiles)."""
    return load_ports_threads([port], path, headers, conns, seconds, times)


LOAD = load_wrk if shutil.which("wrk") else load_threads


def throughput(port, path, runs, size):
    """Median MB/s of downloading ``path`` ``runs`` times over one connection."""
    rates = []
    c = Client(port)
    for _ in range(runs):
        t0 = time.perf_counter()
        st, resp, _ = c.request("GET", path, read=False)
        got = 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            got += len(chunk)
        dt = time.perf_counter() - t0
        if st != 200 or got != size:
            raise RuntimeError("download %s: status %s, %d of %d bytes" % (path, st, got, size))
        rates.append(size / dt / 1e6)
    c.close()
    return statistics.median(rates)


def timed_upload(target, c, name, version, dist):
    """(status or None, body or the error, seconds) of one upload over the Client ``c``
    (closed on an error, so that it connects again)."""
    t0 = time.perf_counter()
    try:
        st, body = target.upload(c, name, version, dist)
    except (OSError, http.client.HTTPException) as e:
        st, body = None, repr(e).encode()
        c.close()
    return st, body, time.perf_counter() - t0


def concurrent_uploads(target, jobs, workers):
    """Upload ``jobs`` (lists of (name, version, dist)) from ``workers`` threads, one
    connection each; returns (median latency seconds, failures, failure notes)."""
    times, fails, notes = [], [0], []
    lock = threading.Lock()

    def worker(mine):
        c = Client(target.port)
        for name, version, dist in mine:
            st, body, dt = timed_upload(target, c, name, version, dist)
            with lock:
                times.append(dt)
                if st not in (200, 201):
                    fails[0] += 1
                    notes.append("%s %s: %s %s" % (name, version, st, body[:200]))
        c.close()
    per = [jobs[i::workers] for i in range(workers)]
    ts = [threading.Thread(target=worker, args=(p,), daemon=True) for p in per]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return (statistics.median(times) if times else None), fails[0], notes


def fill(target, dists, workers=8, problems=None):
    """Upload ``dists``; a failed upload is retried (up to 3 tries) and reported in
    ``problems``; only uploads that fail every try abort the server's run."""
    st = time.monotonic()
    todo, tries = list(dists), 0
    while todo and tries < 3:
        tries += 1
        _, fails, notes = concurrent_uploads(target, todo, workers)
        if not fails:
            break
        if problems is not None:
            problems.append("%s: %d of %d uploads failed (try %d, retried), e.g. %s"
                            % (target.name, fails, len(todo), tries, notes[:2]))
        failed = {n.split(" ", 2)[0] + " " + n.split(" ", 2)[1].rstrip(":") for n in notes}
        todo = [j for j in todo if "%s %s" % (j[0], j[1]) in failed]
    else:
        if todo and tries >= 3:
            raise RuntimeError("%s: uploads failed 3 times: %s" % (target.name, notes[:3]))
    return time.monotonic() - st


def file_links(port, page):
    """Absolute paths of the files on the simple page at ``page``."""
    c = Client(port)
    st, body, _ = c.request("GET", page, headers={"Accept": HTML_ACCEPT})
    c.close()
    if st != 200:
        raise RuntimeError("GET %s answered %s" % (page, st))
    links = []
    for href in re.findall(r'href="([^"]+)"', body.decode()):
        u = urlsplit(urljoin("http://127.0.0.1:%d%s" % (port, page), href.replace("&amp;", "&")))
        links.append(u.path)
    return links


def count_json_files(port, page):
    """Files on the PEP 691 JSON variant of ``page``; None when the server has none."""
    c = Client(port)
    st, body, resp = c.request("GET", page, headers={"Accept": JSON_ACCEPT})
    c.close()
    ctype = resp.getheader("Content-Type", "")
    if st != 200 or "json" not in ctype:
        return None
    return len(json.loads(body).get("files", []))


def page_rate(target, page, accept, cfg, problems, what):
    """Median req/s of ``cfg.load_runs`` loads of 16 keep-alive connections."""
    rates, errs = [], 0
    for _ in range(cfg.load_runs):
        r, e = LOAD(target.port, page, {"Accept": accept}, 16, cfg.load_seconds)
        rates.append(r)
        errs += e
    if errs:
        problems.append("%s: %d errors/non-2xx under 16-connection load (%s)" % (target.name, errs, what))
    return median(rates)


def installer_env():
    """pip's and uv's environment: no index, config or proxy of this machine leaks in."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("PIP_", "UV_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(PIP_CONFIG_FILE=os.devnull, UV_NO_CONFIG="1", UV_PYTHON_DOWNLOADS="never",
               no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    return env


def find_uv():
    for cand in ("/tmp/dv/bin/uv", shutil.which("uv")):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def install_times(tool, python, uv, index_url, wanted, runs, warm=True):
    """Median wall time of installing ``wanted[0]`` (which pulls in all of ``wanted``)
    into a new --target directory with pip or uv, caches off; one warm-up run first."""
    times = []
    for i in range(runs + 1 if warm else runs):
        target_dir = mkdtemp("bench-%s-" % tool)
        if tool == "pip":
            cmd = [python, "-m", "pip", "install", "--isolated", "--no-cache-dir",
                   "--disable-pip-version-check", "--no-input", "--quiet", "--target",
                   target_dir, "--index-url", index_url, wanted[0]]
        else:
            cmd = [uv, "pip", "install", "--no-config", "--no-cache", "--quiet", "--python",
                   python, "--target", target_dir, "--default-index", index_url, wanted[0]]
        t0 = time.monotonic()
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=installer_env(), timeout=300,
                           cwd=target_dir)
        dt = time.monotonic() - t0
        got = {e.split("-")[0] for e in os.listdir(target_dir) if e.endswith(".dist-info")}
        shutil.rmtree(target_dir, ignore_errors=True)
        TMPDIRS.remove(target_dir)
        if r.returncode:
            raise RuntimeError("%s install failed: %s" % (tool, r.stdout.decode()[-1500:]))
        missing = {re.sub(r"[-_.]+", "_", w) for w in wanted} - got
        if missing:
            raise RuntimeError("%s installed %d packages, %d missing (e.g. %s)"
                               % (tool, len(got), len(missing), sorted(missing)[:3]))
        if i or not warm:
            times.append(dt)
    return statistics.median(times)


def drop_caches():
    """Write back and drop the page cache, so that the next step reads from disk;
    False (quietly) where that is not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def count_files(top):
    return sum(len(files) for _, _, files in os.walk(top))


def inprocess_start(runs):
    sys.path.insert(0, REPO)
    try:
        import minidevpi
    except Exception as e:  # the file may be mid-edit; the rest of the run still counts
        say("  in-process: cannot import minidevpi: %r" % e)
        return None
    finally:
        sys.path.remove(REPO)
    times = []
    for _ in range(runs):
        d = mkdtemp("bench-inproc-")
        os.rmdir(d)  # a fresh, not yet existing server directory
        t0 = time.monotonic()
        srv = minidevpi.Server(d, root_password="pw")
        srv.start()
        try:
            wait_answered(srv.port, None)
            times.append(time.monotonic() - t0)
        finally:
            srv.stop()
            shutil.rmtree(d, ignore_errors=True)
            TMPDIRS.remove(d)
    return statistics.median(times)


# ----------------------------------------------------------------------------------
# Fake upstream (the mirror scenarios)
# ----------------------------------------------------------------------------------

SYLLABLES = ("py", "data", "flask", "auth", "core", "lib", "test", "cloud", "json", "web", "ml",
             "sql", "async", "http", "tool", "kit", "utils", "client", "api", "grid", "net",
             "log", "cli", "xml", "img", "geo", "stats", "bio", "aws", "cache", "queue")


def upstream_names(n):
    """``n`` distinct project names, the same every run, varied like a public index's
    (mixed case; '-', '_', '.' or no separator; 5 to ~20 characters). The trailing
    number is the name's position, so no two names normalize alike."""
    k = len(SYLLABLES)
    seps = ("-", "", "_", "-", ".", "")
    out = []
    for i in range(n):
        name = "%s%s%s%d" % (SYLLABLES[i % k], seps[(i // 7) % 6], SYLLABLES[(i // k) % k], i)
        out.append(name.capitalize() if i % 13 == 0 else name)
    return out


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def wants_json(accept):
    """Whether an Accept header prefers PEP 691 JSON over HTML (q-values honoured)."""
    best = {"json": -1.0, "html": -1.0}
    for part in (accept or "").split(","):
        bits = [b.strip() for b in part.split(";")]
        q = 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 0.0
        kind = {JSON_ACCEPT: "json", "application/vnd.pypi.simple.latest+json": "json",
                "text/html": "html", "application/vnd.pypi.simple.v1+html": "html",
                "application/vnd.pypi.simple.latest+html": "html", "*/*": "html"}.get(bits[0])
        if kind:
            best[kind] = max(best[kind], q)
    return best["json"] > 0 and best["json"] >= best["html"]


class _UpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout):
            pass  # a client hung up; not our measurement

    def do_GET(self):
        up = self.server.upstream
        path = urlsplit(self.path).path
        with up.lock:
            up.hits[path] = up.hits.get(path, 0) + 1
        js = wants_json(self.headers.get("Accept"))
        body, ctype = None, None
        if path == "/simple/":
            body, ctype = (up.root_json, JSON_ACCEPT) if js else (up.root_html, "text/html; charset=utf-8")
        elif path.startswith("/simple/") and path.endswith("/"):
            page = up.pages.get(normalize(path[len("/simple/"):-1]))
            if page is not None:
                body, ctype = (page[1], JSON_ACCEPT) if js else (page[0], "text/html; charset=utf-8")
        elif path.startswith("/files/"):
            body = up.files.get(path[len("/files/"):])
            ctype = "application/octet-stream"
        if body is None:
            body, ctype = b"not found\n", "text/plain"
            self.send_response(404)
        else:
            self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-PyPI-Last-Serial", str(up.serial))
        self.end_headers()
        self.wfile.write(body)


class FakeUpstream:
    """A read-only index on 127.0.0.1 shaped like a big public one: a root listing of
    ``nprojects`` names, one of them ``mirrorpkg``, the one project with a page: 20 files
    (10 versions, wheel + sdist). Pages in PEP 691 JSON or HTML by Accept, files at /files/.
    Every body is made once beforehand, so serving costs next to nothing."""

    def __init__(self, nprojects):
        self.n = nprojects
        self.serial = 20000000 + nprojects
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
        self.httpd.daemon_threads = True
        self.httpd.upstream = self
        self.url = "http://127.0.0.1:%d/" % self.httpd.server_address[1]
        self.simple_url = self.url + "simple/"
        # mirrorpkg is listed too: devpi-server serves only projects upstream lists
        names = upstream_names(nprojects - 1) + ["mirrorpkg"]
        serials = [10000000 + (i * 7919) % 10000000 for i in range(nprojects)]
        self.root_html = "".join(
            ['<!DOCTYPE html>\n<html>\n  <head>\n    <meta name="pypi:repository-version" '
             'content="1.1">\n    <title>Simple index</title>\n  </head>\n  <body>\n']
            + ['    <a href="/simple/%s/">%s</a>\n' % (normalize(n), n) for n in names]
            + ["  </body>\n</html>\n"]).encode()
        self.root_json = ('{"meta": {"_last-serial": %d, "api-version": "1.1"}, "projects": [%s]}'
                          % (self.serial, ", ".join('{"_last-serial": %d, "name": "%s"}' % x
                                                    for x in zip(serials, names)))).encode()
        del names, serials
        self.files, entries = {}, []
        for i in range(10):
            v = "2.%d" % i
            for fn, data, _, _ in (make_wheel("mirrorpkg", v), make_sdist("mirrorpkg", v)):
                self.files[fn] = data
                entries.append({"filename": fn, "url": self.url + "files/" + fn,
                                "hashes": {"sha256": hashlib.sha256(data).hexdigest()},
                                "requires-python": ">=3.8", "size": len(data),
                                "upload-time": "2024-01-01T00:00:00.000000Z", "yanked": False})
        page_json = json.dumps({"meta": {"api-version": "1.1", "_last-serial": self.serial},
                                "name": "mirrorpkg", "versions": ["2.%d" % i for i in range(10)],
                                "files": entries}).encode()
        page_html = ("<!DOCTYPE html>\n<html><head><meta name=\"pypi:repository-version\" "
                     "content=\"1.1\"><title>Links for mirrorpkg</title></head><body>\n"
                     "<h1>Links for mirrorpkg</h1>\n"
                     + "".join('<a href="%s#sha256=%s" data-requires-python="&gt;=3.8">%s</a><br />\n'
                               % (e["url"], e["hashes"]["sha256"], e["filename"]) for e in entries)
                     + "</body></html>\n").encode()
        self.pages = {"mirrorpkg": (page_html, page_json)}
        self.thread = None
        self.hits, self.lock = {}, threading.Lock()  # path -> GETs answered

    def count(self, path):
        with self.lock:
            return self.hits.get(path, 0)

    def start(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread = None
        self.httpd.server_close()


def root_count(body, resp, fmt):
    """Projects listed in a root listing body (gunzipped when the server gzipped it)."""
    if resp.getheader("Content-Encoding", "") == "gzip":
        body = gzip.decompress(body)
    if fmt == "json":
        return len(json.loads(body)["projects"])
    return body.count(b"<a ")


def run_mirror(target, cfg, upstream, R, problems):
    """The mirror scenarios on a fresh server of ``target`` that may go upstream, with
    root/pypi mirroring the fake upstream: the root listing (first and later requests),
    then the cached project page under load, then the server's peak RSS."""
    name = target.name
    target.online = True
    try:
        target.start(fresh=True)
    finally:
        target.online = False
    try:
        target.make_mirror(upstream.simple_url)
        root_hits = upstream.count("/simple/")
        root = "/root/pypi/+simple/"
        c = Client(target.port, timeout=600)
        t0 = time.perf_counter()
        st, body, resp = c.request("GET", root, headers={"Accept": HTML_ACCEPT})
        R["mirror_root_first"] = time.perf_counter() - t0
        n = root_count(body, resp, "html") if st == 200 else 0
        if n != upstream.n:
            problems.append("%s: mirror root listing (first request) answered %s with %d of %d "
                            "projects" % (name, st, n, upstream.n))
        say("  mirror root, %d upstream projects: first request %.2fs (%d MB)"
            % (upstream.n, R["mirror_root_first"], len(body) >> 20))
        del body
        for fmt, accept in (("html", HTML_ACCEPT), ("json", JSON_ACCEPT)):
            for gz in (False, True):
                key = "mirror_root_%s%s" % (fmt, "_gz" if gz else "")
                headers = {"Accept": accept}
                if gz:
                    headers["Accept-Encoding"] = "gzip"
                st, body, resp = c.request("GET", root, headers=headers)
                ctype = resp.getheader("Content-Type", "")
                if fmt == "json" and "json" not in ctype:
                    problems.append("%s: mirror root listing has no PEP 691 JSON (got %r)" % (name, ctype))
                    break
                n = root_count(body, resp, fmt) if st == 200 else 0
                if n != upstream.n:
                    problems.append("%s: mirror root listing (%s%s) answered %s with %d of %d projects"
                                    % (name, fmt, ", gzip" if gz else "", st, n, upstream.n))
                zipped = resp.getheader("Content-Encoding", "") == "gzip"
                if gz and not zipped and name == "minidevpi":  # (devpi-server never gzips)
                    problems.append("%s: mirror root listing (%s) not gzipped although asked" % (name, fmt))
                size = len(body)
                del body
                times = []
                for _ in range(cfg.mirror_root_n):
                    t0 = time.perf_counter()
                    st, _, _ = c.request("GET", root, headers=headers)
                    times.append(time.perf_counter() - t0)
                    if st != 200:
                        problems.append("%s: mirror root listing answered %s" % (name, st))
                R[key] = median(times)
                say("  mirror root, later, %s%s: %.0f ms (%.1f MB%s)"
                    % (fmt, " + Accept-Encoding: gzip" if gz else "", R[key] * 1e3, size / 1e6,
                       " gzipped" if zipped else ""))
        c.close()
        if upstream.count("/simple/") - root_hits != 1:
            problems.append("%s: asked upstream for the project list %d times, expected once"
                            % (name, upstream.count("/simple/") - root_hits))
        page = root + "mirrorpkg/"
        nh = len(file_links(target.port, page))   # the first request fetches and keeps it
        nj = count_json_files(target.port, page)
        if nh != 20 or nj not in (None, 20):
            problems.append("%s: mirror project page lists %d files (HTML), %s (JSON), expected 20"
                            % (name, nh, nj))
        page_hits = upstream.count("/simple/mirrorpkg/")
        for fmt, accept in (("html", HTML_ACCEPT), ("json", JSON_ACCEPT)):
            if fmt == "json" and nj is None:
                continue
            R["mirror_page_rps_" + fmt] = page_rate(target, page, accept, cfg, problems,
                                                    "mirror %s page" % fmt)
            say("  mirror project page (cached) %s: %.0f req/s (16 conns)"
                % (fmt, R["mirror_page_rps_" + fmt]))
        if upstream.count("/simple/mirrorpkg/") != page_hits:
            problems.append("%s: the mirror project page was fetched upstream %d times during the "
                            "load (not served from its cache)"
                            % (name, upstream.count("/simple/mirrorpkg/") - page_hits))
        R["mirror_rss"] = vm_hwm_mb(target.proc.pid)
        say("  mirror server peak RSS (VmHWM): %.1f MB" % R["mirror_rss"])
    finally:
        target.discard()


# ----------------------------------------------------------------------------------
# Export and import (minidevpi only) against cp -r
# ----------------------------------------------------------------------------------

def xfer_wheel(name, version, size):
    return make_wheel(name, version, os.urandom(size))


def run_export_import(cfg, R, problems):
    """Fill a minidevpi server with ``cfg.xfer_files`` files of random bytes, stop it, then
    time ``cp -r`` of its directory, ``minidevpi export`` of it and ``minidevpi import`` of
    that export, the page cache dropped before each (where permitted)."""
    t = Minidevpi(None)
    t.start(fresh=True)
    try:
        t.setup()
        jobs = []
        for p in range(cfg.xfer_files // 5):
            pname = "xfer%05d" % p
            jobs += [(pname, "1.%d" % v, functools.partial(xfer_wheel, pname, "1.%d" % v,
                                                             cfg.xfer_kb * 1024)) for v in range(5)]
        secs = fill(t, jobs, problems=problems)
        t.stop()
        src = t.serverdir()
        blobs = count_files(os.path.join(src, "+files"))
        mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(src) for f in fs) / 1e6
        say("  export/import: %d files uploaded in %.1fs; server dir %.0f MB"
            % (len(jobs), secs, mb))
        times = {"cp": [], "export": [], "import": []}
        cold = True
        for i in range(cfg.xfer_runs):
            steps = (("cp", ["cp", "-r", src, os.path.join(t.dir, "cp")]),
                     ("export", [sys.executable, MINIDEVPI, "export", "-q", "--serverdir", src,
                                 os.path.join(t.dir, "export")]),
                     ("import", [sys.executable, MINIDEVPI, "import", "-q", "--no-root-pypi",
                                 "--serverdir", os.path.join(t.dir, "import"),
                                 os.path.join(t.dir, "export")]))
            for step, cmd in steps:
                cold = drop_caches() and cold
                t0 = time.monotonic()
                r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=3600)
                times[step].append(time.monotonic() - t0)
                if r.returncode:
                    raise RuntimeError("%s failed: %s" % (step, r.stdout.decode()[-1500:]))
            if i == 0:
                got = count_files(os.path.join(t.dir, "import", "+files"))
                if got != blobs:
                    problems.append("minidevpi: import holds %d stored files, the exported server %d"
                                    % (got, blobs))
            for d in ("cp", "export", "import"):
                shutil.rmtree(os.path.join(t.dir, d))
        for step in times:
            R["xfer_" + step] = median(times[step])
        R["xfer_cold"] = cold
        say("  cp -r %.2fs, export %.2fs, import %.2fs (%s cache)"
            % (R["xfer_cp"], R["xfer_export"], R["xfer_import"], "cold" if cold else "warm"))
    finally:
        t.discard()


# ----------------------------------------------------------------------------------
# Scale: N projects x 3 versions x 2 files through import, export and a start
# ----------------------------------------------------------------------------------

SCALE_NS = (1000, 10000, 100000)
PEAK_WRAPPER = ("import re, runpy, sys\nsys.argv = sys.argv[1:]\ncode = 0\ntry:\n"
                "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
                "except SystemExit as e:\n    code = e.code or 0\n"
                "with open('/proc/self/status') as f:\n"
                "    sys.stderr.write('\\nVmHWM %s\\n' % re.search(r'VmHWM:\\s*(\\d+)', "
                "f.read()).group(1))\nsys.exit(code)\n")


def write_scale_dump(directory, n, versions=3, sdists=True):
    """A devpi-format dump of ``n`` projects x ``versions`` x a wheel and (``sdists``) an
    sdist, written entry by entry (the file list goes to a side file first: nothing grows
    with ``n``)."""
    os.makedirs(directory)
    side = os.path.join(directory, ".files.json")
    with open(os.path.join(directory, "dataindex.json"), "w") as out, open(side, "w") as fl:
        out.write('{"dumpversion": "2", "pythonversion": [3, 11, 0, "final", 0], "users": '
                  '{"root": {"username": "root"}, "%s": {"username": "%s"}}, "indexes": '
                  '{"%s/%s": {"indexconfig": {"type": "stage", "bases": [], "volatile": true, '
                  '"acl_upload": ["%s"]}, "projects": {' % (USER, USER, USER, INDEX, USER))
        first = True
        for p in range(n):
            name = "scale%07d" % p
            vers = {}
            for v in range(versions):
                ver = "1.%d" % v
                vers[ver] = {"name": name, "version": ver,
                             "summary": "minidevpi scale benchmark project %d" % p}
                for fn, data, _kind, _pyv in (make_wheel(name, ver),) + (
                        (make_sdist(name, ver),) if sdists else ()):
                    rel = "%s/%s/%s/%s/%s" % (USER, INDEX, name, ver, fn)
                    path = os.path.join(directory, *rel.split("/"))
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "wb") as f:
                        f.write(data)
                    sha = hashlib.sha256(data).hexdigest()
                    fl.write(("" if first else ", ") + json.dumps({
                        "type": "releasefile", "projectname": name, "version": ver,
                        "relpath": rel, "entrymapping": {
                            "last_modified": "Mon, 01 Jan 2024 00:00:00 GMT",
                            "hash_spec": "sha256=" + sha, "hashes": {"sha256": sha}},
                        "log": []}))
                    first = False
            out.write((", " if p else "") + json.dumps(name) + ": " + json.dumps(vers))
        out.write('}, "files": [')
        fl.close()
        with open(side) as f:
            shutil.copyfileobj(f, out)
        out.write("]}}}")
    os.unlink(side)


def timed_peak(cmd, what):
    """Run a Python script's command line under the VmHWM wrapper: (seconds, peak MB)."""
    t0 = time.monotonic()
    r = subprocess.run([cmd[0], "-c", PEAK_WRAPPER] + cmd[1:], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    secs = time.monotonic() - t0
    out = r.stdout.decode(errors="replace")
    if r.returncode:
        raise RuntimeError("%s failed: %s" % (what, out[-1500:]))
    return secs, int(re.findall(r"VmHWM (\d+)", out)[-1]) / 1024.0


def scale_pages(t, n, runs):
    """p50 of the JSON index listing, the simple root and a project's simple page."""
    name = "scale%07d" % (n // 2)
    out = {}
    for key, path, headers in (
            ("list_json", "/%s/%s" % (USER, INDEX), {"Accept": "application/json"}),
            ("simple_root", "/%s/%s/+simple/" % (USER, INDEX), None),
            ("project", "/%s/%s/+simple/%s/" % (USER, INDEX, name), None)):
        secs, bad = latency(t.port, path, runs, headers)
        out[key] = secs if not bad else None
    return out


def run_scale_one(t, n, dump, script, runs):
    """Import ``dump`` into ``t``'s directory, export it, start, measure; a dict of figures."""
    R = {}
    t.dir = mkdtemp("bench-scale-%s-" % t.name)
    if isinstance(t, DevpiServer):
        R["import"], R["import_mb"] = timed_peak(
            [t.python, t.bin("devpi-import"), "--serverdir", t.serverdir(), "--no-root-pypi",
             "--root-passwd", "pw", "--no-events", dump], "devpi-import")
        export = [t.python, t.bin("devpi-export"), "--serverdir", t.serverdir()]
    else:
        R["import"], R["import_mb"] = timed_peak(
            [sys.executable, script, "import", "-q", "--no-root-pypi", "--root-passwd", "pw",
             dump, "--serverdir", t.serverdir()], "minidevpi import")
        export = [sys.executable, script, "export", "-q", "--serverdir", t.serverdir()]
    R["export"], R["export_mb"] = timed_peak(export + [os.path.join(t.dir, "export")],
                                             "%s export" % t.name)
    shutil.rmtree(os.path.join(t.dir, "export"))
    R["start"] = t.start(fresh=False)
    R["start_mb"] = vm_hwm_mb(t.proc.pid)
    R.update(scale_pages(t, n, runs))
    t.stop()
    R["start2"] = t.start(fresh=False)  # (the first start after an import may derive things)
    t.discard()
    return R


def run_scale(args):
    ns = list(SCALE_NS) + ([1000000] if args.scale_million else [])
    if args.scale_ns:
        ns = [int(x) for x in args.scale_ns.split(",")]
    script = os.path.abspath(args.minidevpi or MINIDEVPI)
    peer = None
    if os.access(os.path.join(os.path.dirname(args.peers_python), "devpi-server"), os.X_OK):
        peer = args.peers_python
    rows = []
    for n in ns:
        top = mkdtemp("bench-scale-dump-")
        dump = os.path.join(top, "dump")
        t0 = time.monotonic()
        write_scale_dump(dump, n, args.scale_versions, not args.scale_wheels_only)
        say("N=%d: dump of %d files written in %.0fs" % (
            n, n * args.scale_versions * (1 if args.scale_wheels_only else 2),
            time.monotonic() - t0))
        targets = [Minidevpi(None)]
        if peer and n <= args.scale_peer_max:
            targets.append(DevpiServer(peer))
        for t in targets:
            try:
                R = run_scale_one(t, n, dump, script, 20 if n < 100000 else 10)
            except Exception as e:
                say("  %s at N=%d aborted: %s" % (t.name, n, e))
                t.discard()
                continue
            R.update(name=t.name, n=n)
            rows.append(R)
            say("  %s: %s" % (t.name, json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in R.items()})))
        shutil.rmtree(top, ignore_errors=True)
        TMPDIRS.remove(top)
    print()
    print("scale: N projects x %d versions x %d files, %d CPUs, Python %s (a shared machine: "
          "figures are noisy)" % (args.scale_versions, 1 if args.scale_wheels_only else 2,
                                  os.cpu_count(), sys.version.split()[0]))
    print("| N | server | import | import peak | export | export peak | start to first "
          "answer | again | JSON listing p50 | /+simple/ p50 | project page p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ms = lambda v: "-" if v is None else "%.1f ms" % (v * 1000)
    for R in rows:
        print("| %s | %s | %.1f s | %.0f MB | %.1f s | %.0f MB | %.2f s | %.2f s | %s | %s | %s |"
              % ("{:,}".format(R["n"]), R["name"], R["import"], R["import_mb"], R["export"],
                 R["export_mb"], R["start"], R["start2"], ms(R["list_json"]),
                 ms(R["simple_root"]), ms(R["project"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scale": rows}, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------
# Tail latency under many connections (--tail)
# ----------------------------------------------------------------------------------

def pctl(xs, q):
    """The ``q`` quantile (0..1) of ``xs``, nearest rank; None for none."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def tail_writes(target, seconds, uploaders, deleters, size, times_up, times_del, notes):
    """For ``seconds``: ``uploaders`` threads upload wheels of ``size`` bytes (new versions
    of tailup), ``deleters`` threads delete the versions of taildel uploaded before."""
    end = time.monotonic() + seconds
    payload = os.urandom(size)

    def uploader(i):
        c, k = Client(target.port), 0
        while time.monotonic() < end:
            v = "%d.%d" % (i, k)
            k += 1
            dist = make_wheel("tailup", v, payload)
            t0 = time.perf_counter()
            st, body = target.upload(c, "tailup", v, dist)
            times_up.append(time.perf_counter() - t0)
            if st not in (200, 201):
                notes.append("upload %s: %s %s" % (v, st, body[:200]))
        c.close()

    def deleter(i):
        c, k = Client(target.port), 0
        headers = dict(target.upload_headers(), Accept="application/json")
        while time.monotonic() < end and k < 10000:
            path = "/%s/%s/taildel/%d.%d" % (USER, INDEX, i, k)
            k += 1
            t0 = time.perf_counter()
            st, body, _ = c.request("DELETE", path, headers=headers)
            times_del.append(time.perf_counter() - t0)
            if st != 200:
                notes.append("delete %s: %s %s" % (path, st, body[:200]))
        c.close()
    ts = [threading.Thread(target=uploader, args=(i,), daemon=True) for i in range(uploaders)]
    ts += [threading.Thread(target=deleter, args=(i,), daemon=True) for i in range(deleters)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def run_tail_one(t, args):
    """One server: fill, page load at each connection count, writes under downloaders."""
    R = {"name": t.name}
    t.start()
    t.setup()
    n_del = 5 * 40  # versions of taildel: 5 deleters x 40 each
    dists = [("filler%05d" % i, "1.0", functools.partial(make_wheel, "filler%05d" % i, "1.0"))
             for i in range(args.tail_projects)]
    dists += [("pagepkg", "1.%d" % i, make_wheel("pagepkg", "1.%d" % i)) for i in range(10)]
    dists += [("taildel", "%d.%d" % (i % 5, i // 5), make_wheel("taildel", "%d.%d" % (i % 5, i // 5)))
              for i in range(n_del)]
    dists.append(("bigpkg", "1.0", make_wheel("bigpkg", "1.0", os.urandom(1 << 20))))
    say("  %s: filling %d uploads ..." % (t.name, len(dists)))
    fill(t, dists)
    page = t.simple_root() + "pagepkg/"
    accept = {"Accept": JSON_ACCEPT}
    big = [u for u in file_links(t.port, t.simple_root() + "bigpkg/")][0]
    latency(t.port, page, 20, accept)  # the page is built and cached
    for conns in args.tail_conns:
        times = []
        rate, errors = load_threads(t.port, page, accept, conns, args.tail_seconds, times)
        R["page%d" % conns] = dict(rate=rate, errors=errors, p50=pctl(times, .5),
                                   p99=pctl(times, .99), n=len(times))
        say("  %s page at %d connections: %s" % (t.name, conns, R["page%d" % conns]))
    dl_times, up, dl, notes = [], [], [], []
    loader = threading.Thread(target=lambda: R.__setitem__("dl", load_threads(
        t.port, big, {}, args.tail_downloaders, args.tail_seconds + 2, dl_times)), daemon=True)
    loader.start()
    time.sleep(1)  # the downloaders are all connected
    tail_writes(t, args.tail_seconds, 10, 5, 100 * 1024, up, dl, notes)
    loader.join()
    rate, errors = R.pop("dl")
    R["mixed"] = dict(dl_rate=rate, dl_errors=errors, dl_p50=pctl(dl_times, .5),
                      dl_p99=pctl(dl_times, .99), up_p50=pctl(up, .5), up_p99=pctl(up, .99),
                      up_n=len(up), del_p50=pctl(dl, .5), del_p99=pctl(dl, .99), del_n=len(dl),
                      write_errors=len(notes), notes=notes[:3])
    say("  %s writes under %d downloaders: %s" % (t.name, args.tail_downloaders, R["mixed"]))
    t.discard()
    return R


def run_tail(args):
    peers = args.peers_python
    wanted = args.only.split(",")
    tgts = [Minidevpi(None)] if "minidevpi" in wanted else []
    if args.minidevpi and tgts:
        tgts[0].script = os.path.abspath(args.minidevpi)
    if "devpi-server" in wanted:
        if os.access(os.path.join(os.path.dirname(peers), "devpi-server"), os.X_OK):
            tgts.append(DevpiServer(peers))
        else:
            say("devpi-server: not installed beside %s, skipped" % peers)
    rows = [run_tail_one(t, args) for t in tgts]
    ms = lambda v: "-" if v is None else "%.0f ms" % (v * 1000)
    print()
    print("tail latency: %d CPUs, Python %s, client: load_threads (one thread per keep-alive "
          "connection), %d s per load; a shared machine: figures are noisy"
          % (os.cpu_count(), sys.version.split()[0], args.tail_seconds))
    print("| server | connections | page req/s | page p50 | page p99 | errors |")
    print("|---|---|---|---|---|---|")
    for R in rows:
        for conns in args.tail_conns:
            P = R["page%d" % conns]
            print("| %s | %d | %.0f | %s | %s | %d |" % (R["name"], conns, P["rate"], ms(P["p50"]),
                                                        ms(P["p99"]), P["errors"]))
    print()
    print("| server | 1 MB downloads/s (%d conns) | download p50 | p99 | upload 100 KB p50 | p99 "
          "| uploads | delete p50 | p99 | deletes | errors |" % args.tail_downloaders)
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for R in rows:
        M = R["mixed"]
        print("| %s | %.0f | %s | %s | %s | %s | %d | %s | %s | %d | %d |"
              % (R["name"], M["dl_rate"], ms(M["dl_p50"]), ms(M["dl_p99"]), ms(M["up_p50"]),
                 ms(M["up_p99"]), M["up_n"], ms(M["del_p50"]), ms(M["del_p99"]), M["del_n"],
                 M["dl_errors"] + M["write_errors"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tail": rows}, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------
# Several serve processes on one PostgreSQL database (--processes)
# ----------------------------------------------------------------------------------

class MinidevpiProc(Minidevpi):
    """One ``serve`` process; ``storage`` is passed as --storage (None: sqlite, the default)."""

    def __init__(self, storage=None, label="minidevpi"):
        super().__init__(None)
        self.storage, self.name = storage, label

    def launch(self, fresh):
        self.proc = popen([sys.executable, self.script, "serve", "--serverdir", self.serverdir(),
                           "--host", "127.0.0.1", "--port", str(self.port), "--root-passwd", "pw",
                           "--no-root-pypi", "--no-access-log", "--offline-mode"]
                          + (["--storage", self.storage] if self.storage else []),
                          self.log(), server_env())


class PgCluster:
    """Where the databases of --processes live: the cluster named by ``spec``
    (host=H,port=P,user=U) or, without one, a throwaway one of .ci/postgres (fsync off)."""

    def __init__(self, spec=None):
        self.spec, self.dir, self.made = spec, None, []

    def start(self):
        if self.spec is None:
            self.dir = tempfile.mkdtemp(prefix="bench-pg-")  # removed in stop(), after pg_ctl
            r = subprocess.run([os.path.join(REPO, ".ci", "postgres"), "start", self.dir],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
            if r.returncode:
                raise RuntimeError(".ci/postgres start failed: %s" % r.stderr.decode()[-1500:])
            self.spec = r.stdout.decode().strip().splitlines()[-1]
        self.params = dict(kv.split("=", 1) for kv in self.spec.split(","))
        return self.spec

    def connect(self, database="postgres"):
        import pg8000.native
        p = self.params
        return pg8000.native.Connection(user=p.get("user", "postgres"), host=p.get("host", "127.0.0.1"),
                                        port=int(p.get("port", 5432)), password=p.get("password"),
                                        database=database)

    def new_database(self, name):
        """An empty database ``name`` (dropped first if there); the --storage spec for it."""
        c = self.connect()
        try:
            c.run("DROP DATABASE IF EXISTS %s" % name)
            c.run("CREATE DATABASE %s TEMPLATE template0" % name)
        finally:
            c.close()
        self.made.append(name)
        return "pg8000:" + ",".join("%s=%s" % kv for kv in dict(self.params, database=name).items())

    def stop(self):
        if self.made and (self.dir is None or os.path.exists(os.path.join(self.dir, "data"))):
            try:
                c = self.connect()
                for name in self.made:
                    c.run("DROP DATABASE IF EXISTS %s" % name)
                c.close()
            except Exception as e:
                say("dropping the benchmark databases: %s" % e)
            self.made = []
        if self.dir is not None:
            subprocess.run([os.path.join(REPO, ".ci", "postgres"), "stop", self.dir],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def load_ports_threads(ports, path, headers, conns, seconds, times):
    """``conns`` threads, each one keep-alive connection to ``ports[i % len(ports)]``, GET
    ``path`` for ``seconds``; every request's seconds go to ``times`` (a list, or None).
    (req/s, errors)."""
    end = time.monotonic() + seconds
    counts, errors = [0] * conns, [0] * conns

    def worker(i):
        c = Client(ports[i % len(ports)], timeout=10)
        mine = []
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                st, _, _ = c.request("GET", path, headers=headers)
                counts[i] += 1
                errors[i] += st != 200
                mine.append(time.perf_counter() - t0)
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                c.close()
        c.close()
        if times is not None:
            times.extend(mine)
    return sum(counts) / run_workers(worker, conns, seconds + 60), sum(errors)


def run_workers(worker, n, timeout):
    """``worker(i)`` in ``n`` threads at once, each given ``timeout`` seconds to end; the
    seconds they took together."""
    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    return time.monotonic() - t0


def _wrk_seconds(text):
    v, unit = float(re.match(r"([\d.]+)", text).group(1)), re.sub(r"[\d.]", "", text)
    return v * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[unit]


def load_ports_wrk(ports, path, headers, conns, seconds, times):
    """One ``wrk --latency`` per port at the same time, the connections split among them;
    the summed req/s, and the worst p50/p99 of them appended to ``times`` as a dict."""
    procs = []
    for k, port in enumerate(ports):
        c = conns // len(ports) + (k < conns % len(ports))
        cmd = ["wrk", "-t", "1", "-c", str(c), "-d", "%ds" % max(1, round(seconds)),
               "--timeout", "10s", "--latency"]
        for h, v in headers.items():
            cmd += ["-H", "%s: %s" % (h, v)]
        cmd.append("http://127.0.0.1:%d%s" % (port, path))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL))
    rate, errors, p50, p99 = 0.0, 0, [], []
    for p in procs:
        out = p.communicate(timeout=seconds + 60)[0].decode()
        m = re.search(r"Requests/sec:\s*([\d.]+)", out)
        if not m:
            raise RuntimeError("wrk output not understood:\n" + out)
        rate += float(m.group(1))
        errors += sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses:\s*(\d+)", out))
        se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if se:
            errors += sum(int(x) for x in se.groups())
        for q, acc in (("50", p50), ("99", p99)):
            mq = re.search(r"^\s*%s%%\s+(\S+)" % q, out, re.M)
            if mq:
                acc.append(_wrk_seconds(mq.group(1)))
    times.append({"p50": max(p50) if p50 else None, "p99": max(p99) if p99 else None})
    return rate, errors


LOAD_PORTS = load_ports_wrk if shutil.which("wrk") else load_ports_threads


def cpu_snapshot(pids):
    """(monotonic time, CPU seconds of the whole machine, of ``pids``, of this process and
    its waited-for children)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / tick  # all but idle and iowait (guest is in user)
    procs = 0.0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            procs += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    t = os.times()  # (children: the wrk processes, once waited for)
    return time.monotonic(), busy, procs, t.user + t.system + t.children_user + t.children_system


def cpu_used(before, after):
    """Cores busy between two snapshots: servers, this client, and the rest (PostgreSQL
    and whatever else runs on the machine)."""
    dt = after[0] - before[0]
    machine, servers, client = ((a - b) / dt for a, b in zip(after[1:], before[1:]))
    return dict(servers=servers, client=client, other=max(0.0, machine - servers - client))


def load_figures(ports, path, headers, conns, seconds, pids=()):
    times = []
    c0 = cpu_snapshot(pids)
    rate, errors = LOAD_PORTS(ports, path, headers, conns, seconds, times)
    cpu = cpu_used(c0, cpu_snapshot(pids))
    if times and isinstance(times[0], dict):  # wrk: its own percentiles
        return dict(rate=rate, errors=errors, cpu=cpu, **times[0])
    return dict(rate=rate, errors=errors, p50=pctl(times, .5), p99=pctl(times, .99), n=len(times),
                cpu=cpu)


def timed_uploads(procs, seconds, workers, notes):
    """For ``seconds``: ``workers`` threads, worker i on ``procs[i % len(procs)]``, upload
    new versions of their own project procup-i (~1 KB wheels). (uploads/s, times, made):
    ``made`` the (name, filename) of every upload that was answered 200/201."""
    end = time.monotonic() + seconds
    times, made = [], []
    lock = threading.Lock()

    def worker(i):
        t, name, k = procs[i % len(procs)], "procup-%d" % i, 0
        c = Client(t.port, timeout=60)
        while time.monotonic() < end:
            v = "1.%d" % k
            k += 1
            dist = make_wheel(name, v)
            st, body, dt = timed_upload(t, c, name, v, dist)
            with lock:
                times.append(dt)
                if st in (200, 201):
                    made.append((name, dist[0]))
                else:
                    notes.append("upload %s %s on port %d: %s %s" % (name, v, t.port, st, body[:200]))
        c.close()
    return len(made) / run_workers(worker, workers, seconds + 120), times, made


def page_has(client, page, filename):
    st, body, _ = client.request("GET", page, headers={"Accept": JSON_ACCEPT})
    return st == 200 and filename.encode() in body


def invalidation_lag(procs, rounds, notes, give_up_s=10.0):
    """Seconds from an upload's answer on process A to its file on process B's (cached)
    simple page, B polled back to back over one keep-alive connection; A and B rotate over
    the processes. A list of seconds (None where B never showed it within ``give_up_s``)."""
    lags, n = [], len(procs)
    polls_seen = []
    page = procs[0].simple_root() + "lagpkg/"
    clients = [Client(t.port, timeout=30) for t in procs]
    for k in range(rounds):
        a, b = k % n, (k + 1) % n
        v = "1.%d" % k
        dist = make_wheel("lagpkg", v)
        clients[b].request("GET", page, headers={"Accept": JSON_ACCEPT})  # B has it cached
        st, body = procs[a].upload(clients[a], "lagpkg", v, dist)
        t0 = time.perf_counter()
        if st not in (200, 201):
            notes.append("lag upload %s on process %d: %s %s" % (v, a, st, body[:200]))
            continue
        polls = 0
        while True:
            polls += 1
            if page_has(clients[b], page, dist[0]):
                lags.append(time.perf_counter() - t0)
                polls_seen.append(polls)
                break
            if time.perf_counter() - t0 > give_up_s:
                lags.append(None)
                notes.append("lag: %s uploaded on process %d (port %d) not on process %d's "
                             "page (port %d) after %.0f s, %d polls"
                             % (dist[0], a, procs[a].port, b, procs[b].port, give_up_s, polls))
                break
    for c in clients:
        c.close()
    return lags, polls_seen


def check_consistent(procs, made, notes, settle_s=5.0):
    """Every process's page of each procup project lists every upload answered 200/201
    (after up to ``settle_s``); mismatches go to ``notes``. Returns the stale pages seen."""
    want = {}
    for name, fn in made:
        want.setdefault(name, set()).add(fn)
    stale = 0
    for i, t in enumerate(procs):
        c = Client(t.port)
        for name, fns in sorted(want.items()):
            page = t.simple_root() + name + "/"
            end = time.monotonic() + settle_s
            while True:
                st, body, _ = c.request("GET", page, headers={"Accept": JSON_ACCEPT})
                got = {f["filename"] for f in json.loads(body).get("files", [])} if st == 200 else set()
                if fns <= got or time.monotonic() > end:
                    break
                time.sleep(0.05)
            if not fns <= got:
                stale += 1
                notes.append("process %d (port %d): %s lists %d of %d uploaded files (status %s)"
                             % (i, t.port, name, len(fns & got), len(fns), st))
        c.close()
    return stale


def run_processes_one(label, storages, args, dists, notes):
    """One setup: a serve process per storage spec, the data filled through the first,
    then (a) page load, (b) file load, (c) uploads, (d) invalidation lag."""
    R = {"setup": label, "processes": len(storages)}
    procs = [MinidevpiProc(s, "%s#%d" % (label, i)) for i, s in enumerate(storages)]
    try:
        say("%s: starting %d process(es) ..." % (label, len(procs)))
        procs[0].start()  # the first one creates the tables; the others join
        for t in procs[1:]:
            t.dir = mkdtemp("bench-%s-" % t.name.replace("#", "-").replace(" ", "-"))
            t.port = free_port()
            t.launch(True)
        for t in procs[1:]:
            wait_answered(t.port, t.proc)
        procs[0].setup()
        t0 = time.monotonic()
        fill(procs[0], dists, problems=notes)
        R["fill_rate"] = len(dists) / (time.monotonic() - t0)
        ports = [t.port for t in procs]
        name = "procpkg%04d" % (len(dists) // 4)
        page = procs[0].simple_root() + name + "/"
        links = [u for u in file_links(procs[0].port, page) if "+f/" in u]
        if not links:
            raise RuntimeError("no +f/ link on %s" % page)
        fpath = links[0]
        accept = {"Accept": JSON_ACCEPT}
        for t in procs:  # every process has the page built and the file in its cache
            for _ in range(3):
                c = Client(t.port)
                st1, _, _ = c.request("GET", page, headers=accept)
                st2, _, _ = c.request("GET", fpath)
                c.close()
                if st1 == st2 == 200:
                    break
                time.sleep(0.5)
            if (st1, st2) != (200, 200):
                notes.append("%s: page %s / file %s answered %s / %s after the fill"
                             % (t.name, page, fpath, st1, st2))
        pids = [t.proc.pid for t in procs]
        R["page"] = load_figures(ports, page, accept, args.processes_conns, args.processes_seconds,
                                 pids)
        say("  page: %s" % R["page"])
        R["file"] = load_figures(ports, fpath, {}, args.processes_conns, args.processes_seconds,
                                 pids)
        say("  file: %s" % R["file"])
        c0 = cpu_snapshot(pids)
        rate, times, made = timed_uploads(procs, args.processes_seconds, args.processes_uploaders,
                                          notes)
        R["upload"] = dict(rate=rate, n=len(times), ok=len(made), p50=pctl(times, .5),
                           p99=pctl(times, .99), cpu=cpu_used(c0, cpu_snapshot(pids)))
        say("  uploads: %s" % R["upload"])
        R["stale_pages"] = check_consistent(procs, made, notes)
        if len(procs) > 1:
            lags, polls = invalidation_lag(procs, args.processes_lag_rounds, notes)
            ok = [x for x in lags if x is not None]
            R["lag"] = dict(n=len(lags), missed=len(lags) - len(ok), p50=median(ok),
                            max=max(ok) if ok else None, all=[round(x, 5) for x in ok],
                            polls=polls)
            say("  lag: %s" % R["lag"])
        R["rss_mb"] = [vm_hwm_mb(t.proc.pid) for t in procs]
        for t in procs:
            if t.proc.poll() is not None:
                notes.append("%s exited with %s" % (t.name, t.proc.returncode))
        errs = [ln for t in procs for ln in open(t.log(), errors="replace")
                if "Traceback" in ln or " 500 " in ln or "ERROR" in ln]
        if errs:
            notes.append("%s: %d suspicious log lines, e.g. %s" % (label, len(errs), errs[:2]))
    except Exception as e:
        notes.append("%s aborted: %s" % (label, e))
        say("  %s aborted: %s" % (label, e))
        for t in procs:
            try:
                say("  %s log tail: %s" % (t.name, open(t.log(), errors="replace").read()[-1500:]))
            except (OSError, TypeError):
                pass
        R["aborted"] = str(e)
    finally:
        for t in procs:
            if t.proc is not None and t.proc.poll() is None:
                t.proc.terminate()
        t0 = time.monotonic()
        for t in procs:
            if t.proc is None:
                continue
            try:
                t.proc.wait(max(0.1, t0 + 10 - time.monotonic()))
            except subprocess.TimeoutExpired:
                notes.append("%s (port %s) still running 10 s after SIGTERM: killed"
                             % (t.name, t.port))
            t.discard()
        R["stop_s"] = time.monotonic() - t0
    return R


def run_processes(args):
    try:
        import pg8000  # noqa: F401  (the servers need it too; they run with this Python)
    except ImportError:
        say("--processes needs pg8000 in this Python (pip install pg8000)")
        return 2
    counts = [int(x) for x in args.processes_counts.split(",")]
    dists = [("procpkg%04d" % p, "1.%d" % v,
              functools.partial(make_wheel, "procpkg%04d" % p, "1.%d" % v))
             for p in range(args.processes_projects) for v in range(2)]
    gen = "wrk (one per port, --latency)" if LOAD_PORTS is load_ports_wrk else \
        "Python threads (load_threads: one thread per keep-alive connection, wrk not on PATH)"
    say("load generator: %s" % gen)
    cluster = PgCluster(args.processes_pg)
    rows, notes = [], []
    try:
        spec = cluster.start()
        say("PostgreSQL: %s (%s)" % (spec, "given" if args.processes_pg else
                                     "throwaway .ci/postgres cluster, fsync off"))
        rows.append(run_processes_one("sqlite", [None], args, dists, notes))
        for n in counts:
            storage = cluster.new_database("minidevpi_bench_p%d" % n)
            rows.append(run_processes_one("pg x%d" % n, [storage] * n, args, dists, notes))
    finally:
        cluster.stop()
    ms = lambda v: "-" if v is None else "%.1f ms" % (v * 1000)
    print()
    print("several processes: %d CPUs, Python %s, %d projects x 2 versions x one ~1 KB wheel; "
          "client: %s, %d connections round-robin over the processes' ports, %d s per load; "
          "uploads: %d workers for %d s; lag: median of %d. The client runs on the same cores "
          "as the servers (and PostgreSQL): it competes with them; a shared machine: figures "
          "are noisy" % (os.cpu_count(), sys.version.split()[0], args.processes_projects, gen,
                         args.processes_conns, args.processes_seconds, args.processes_uploaders,
                         args.processes_seconds, args.processes_lag_rounds))
    print("| setup | page req/s | page p50 | p99 | file req/s | file p50 | p99 | uploads/s "
          "| upload p50 | p99 | lag A->B p50 | lag max | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for R in rows:
        if "aborted" in R:
            print("| %s | aborted: %s |" % (R["setup"], R["aborted"][:100]))
            continue
        P, F, U, L = R["page"], R["file"], R["upload"], R.get("lag")
        errors = P["errors"] + F["errors"] + (U["n"] - U["ok"]) + R["stale_pages"] + \
            (L["missed"] if L else 0)
        print("| %s | %.0f | %s | %s | %.0f | %s | %s | %.1f | %s | %s | %s | %s | %d |"
              % (R["setup"], P["rate"], ms(P["p50"]), ms(P["p99"]), F["rate"], ms(F["p50"]),
                 ms(F["p99"]), U["rate"], ms(U["p50"]), ms(U["p99"]),
                 ms(L["p50"]) if L else "-", ms(L["max"]) if L else "-", errors))
    print()
    print("cores busy during each load (of %d): the serve processes / this client / the rest "
          "(PostgreSQL and anything else on the machine), from /proc" % os.cpu_count())
    print("| setup | page load | file load | uploads | lag polls to see it (median, max) |")
    print("|---|---|---|---|---|")
    cores = lambda C: "%.2f / %.2f / %.2f" % (C["servers"], C["client"], C["other"])
    for R in rows:
        if "aborted" in R:
            continue
        L = R.get("lag")
        print("| %s | %s | %s | %s | %s |" % (
            R["setup"], cores(R["page"]["cpu"]), cores(R["file"]["cpu"]), cores(R["upload"]["cpu"]),
            "%s, %d" % (median(L["polls"]), max(L["polls"])) if L and L["polls"] else "-"))
    return finish(notes, args.json, {"processes": rows, "problems": notes, "load": gen})


def finish(problems, json_path, data):
    """Print the problems a run saw; write ``data`` to ``json_path`` if given. 0."""
    if problems:
        print("\nproblems seen:")
        for p in problems:
            print("  - " + p)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------

class Cfg:
    def __init__(self, quick):
        self.quick = quick
        self.start_runs = 3 if quick else 5
        self.load_runs = 1 if quick else 3
        self.load_seconds = 1 if quick else 4
        self.lat_n = 100 if quick else 400
        self.up1 = 4 if quick else 10
        self.up8 = 16 if quick else 40
        self.dl_runs = 2 if quick else 3
        self.dl_mb = 50
        self.many = 1000 if quick else 10000
        self.root_n = 5 if quick else 15
        self.growth_up = 5 if quick else 15
        self.pip_runs = 3 if quick else 7
        self.upstream_projects = 600000
        self.mirror_root_n = 3 if quick else 7
        self.xfer_files = 1000 if quick else 10000
        self.xfer_kb = 100
        self.xfer_runs = 1 if quick else 3


CHAIN = 30


def chain_name(k):
    return "bench-chain-%02d" % k


class Data:
    """The distributions every server gets, generated once."""

    def __init__(self, cfg):
        self.page = []   # (name, version, dist): 10 versions x (wheel + sdist) of pagepkg
        for i in range(10):
            v = "1.%d" % i
            self.page += [("pagepkg", v, make_wheel("pagepkg", v)), ("pagepkg", v, make_sdist("pagepkg", v))]
        # the install scenario: bench-chain-01 requires -02, which requires -03 ... -30;
        # every fifth also requires the one five further on; versions 1.0 and 1.1 of each
        self.chain = []
        for k in range(1, CHAIN + 1):
            reqs = ["%s>=1.0" % chain_name(k + 1)] if k < CHAIN else []
            if k % 5 == 1 and k + 5 <= CHAIN:
                reqs.append(chain_name(k + 5))
            self.chain += [(chain_name(k), v, make_wheel(chain_name(k), v, requires=reqs))
                           for v in ("1.0", "1.1")]
        self.chain_names = [chain_name(k) for k in range(1, CHAIN + 1)]
        mb = os.urandom(1 << 20)
        self.up1 = [("uploadpkg", "1.%d" % i, make_wheel("uploadpkg", "1.%d" % i, mb[:(1 << 20) - 2048]))
                    for i in range(cfg.up1)]
        self.up8 = [("uploadpkg", "8.%d" % i, make_wheel("uploadpkg", "8.%d" % i, mb[:(1 << 20) - 2048]))
                    for i in range(cfg.up8)]
        self.big = ("bigpkg", "1.0", make_wheel("bigpkg", "1.0", os.urandom(cfg.dl_mb << 20)))
        n = 0
        self.filler = []   # filler projects up to cfg.many
        while n < cfg.many:
            name = "filler%05d" % n
            self.filler.append((name, "1.0", make_wheel(name, "1.0")))
            n += 1

    def growth_uploads(self, tag, n):
        return [("growth-%s-%d" % (tag, i), "1.0", make_wheel("growth-%s-%d" % (tag, i), "1.0"))
                for i in range(n)]


# ----------------------------------------------------------------------------------
# nginx: the README's caching configuration in front, and nginx serving files itself
# ----------------------------------------------------------------------------------

def find_nginx():
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx", "/usr/local/sbin/nginx"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def readme_nginx_block():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        m = re.search(r"```nginx\n(.*?)```", f.read(), re.S)
    if not m:
        raise RuntimeError("README.md has no ```nginx block")
    return m.group(1)


class Nginx:
    """nginx (2 workers) with two servers: the README's caching reverse proxy in front of
    minidevpi on ``upstream_port``, and a plain static server of ``static_root``."""

    def __init__(self, exe, upstream_port, static_root):
        self.dir = mkdtemp("nginx")
        self.proxy_port, self.static_port = free_port(), free_port()
        site = readme_nginx_block()
        for old, new in (("127.0.0.1:3141", "127.0.0.1:%d" % upstream_port),
                         ("listen 80;", "listen 127.0.0.1:%d;" % self.proxy_port),
                         ("/var/cache/nginx/minidevpi", os.path.join(self.dir, "cache"))):
            if old not in site:
                raise RuntimeError("README's nginx block has no %r" % old)
            site = site.replace(old, new)
        site += ("\nserver {\n    listen 127.0.0.1:%d;\n    root %s;\n    sendfile on;\n"
                 "    tcp_nopush on;\n}\n" % (self.static_port, static_root))
        version = subprocess.run([exe, "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL).stdout.decode()
        temps = "".join("%s_temp_path %s/%s;\n" % (m, self.dir, m)
                        for m in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
                        if "--without-http_%s_module" % m not in version)
        conf = os.path.join(self.dir, "nginx.conf")
        with open(os.path.join(self.dir, "site.conf"), "w") as f:
            f.write(site)
        with open(conf, "w") as f:
            f.write("%sdaemon off;\nworker_processes 2;\npid %s/nginx.pid;\n"
                    "error_log %s/error.log warn;\nevents { worker_connections 1024; }\n"
                    "http {\naccess_log off;\n%sinclude %s/site.conf;\n}\n"
                    % ("user root;\n" if os.geteuid() == 0 else "", self.dir, self.dir, temps,
                       self.dir))
        self.proc = popen([exe, "-p", self.dir, "-c", conf], os.path.join(self.dir, "out.log"))
        for port in (self.proxy_port, self.static_port):
            wait_answered(port, self.proc, 20)

    def stop(self):
        stop_proc(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def run_nginx(target, cfg, data, R, problems):
    """minidevpi behind the README's nginx configuration, and nginx serving the 50 MB file
    from disk (the yardstick for minidevpi's own download rate)."""
    exe = find_nginx()
    if exe is None:
        say("  nginx not installed: nginx rows skipped (Debian: apt-get install nginx-light)")
        return
    static = mkdtemp("static")
    big_fn, big_bytes = data.big[2][:2]
    with open(os.path.join(static, big_fn), "wb") as f:
        f.write(big_bytes)
    nginx = Nginx(exe, target.port, static)
    try:
        R["nginx_static_dl"] = throughput(nginx.static_port, "/" + big_fn, cfg.dl_runs,
                                          len(big_bytes))
        page = target.simple_root() + "pagepkg/"
        rates, errs = [], 0
        warm = Client(nginx.proxy_port)
        warm.request("GET", page, headers={"Accept": HTML_ACCEPT})
        warm.close()
        for _ in range(cfg.load_runs):
            r, e = LOAD(nginx.proxy_port, page, {"Accept": HTML_ACCEPT}, 16, cfg.load_seconds)
            rates.append(r)
            errs += e
        R["nginx_page_rps"] = median(rates)
        if errs:
            problems.append("nginx in front: %d errors/non-2xx under load" % errs)
        links = [p for p in file_links(nginx.proxy_port, target.simple_root() + "bigpkg/")
                 if p.endswith(big_fn)]
        if links:
            throughput(nginx.proxy_port, links[0], 1, len(big_bytes))  # into nginx's cache
            R["nginx_proxy_dl"] = throughput(nginx.proxy_port, links[0], cfg.dl_runs,
                                             len(big_bytes))
        else:
            problems.append("nginx in front: no link to %s on the page" % big_fn)
        say("  nginx: static file %.0f MB/s; in front of minidevpi: page %.0f req/s, "
            "cached file %.0f MB/s" % (R["nginx_static_dl"], R["nginx_page_rps"],
                                       R.get("nginx_proxy_dl") or 0))
    finally:
        nginx.stop()
        shutil.rmtree(static, ignore_errors=True)


def run_installs(classes, python, cfg, data, pip_python, uv, results, problems):
    """pip and uv installs of the 30-package chain, side by side: a fresh server of each
    kind holding only the chain, all started at once, and the rounds interleaved (pip on
    A, B, C, then uv on A, B, C, ...), so that the machine's slow moments fall on every
    server alike. pip's wall time is mostly pip's own; measured one server after the
    other, minutes apart, the noise was as large as the differences."""
    servers = []
    try:
        for cls in classes:
            t = cls(python)
            t.start(fresh=True)
            t.setup()
            fill(t, data.chain, problems=problems)
            servers.append(t)
        times = {}
        for rnd in range(cfg.pip_runs + 1):  # round 0 warms up
            for tool in ("pip", "uv"):
                if tool == "uv" and not uv:
                    continue
                for t in servers:
                    url = "http://127.0.0.1:%d%s" % (t.port, t.simple_root())
                    try:
                        dt = install_times(tool, pip_python, uv, url, data.chain_names, 1,
                                           warm=False)
                    except Exception as e:
                        problems.append("%s: %s install: %s" % (t.name, tool, e))
                        continue
                    if rnd:
                        times.setdefault((t.name, tool), []).append(dt)
        for (name, tool), ts in times.items():
            results.setdefault(name, {})[tool] = median(ts)
            say("  %s, %s install %s (all %d): %.2fs" % (name, tool, data.chain_names[0], CHAIN,
                                                        median(ts)))
    finally:
        for t in servers:
            t.discard()


def run_target(target, cfg, data, results, problems):
    R = results.setdefault(target.name, {})
    name = target.name
    # 1. startup
    fresh, again = [], []
    for _ in range(cfg.start_runs):
        fresh.append(target.start(fresh=True))
        target.stop()
        again.append(target.start(fresh=False))
        target.discard()
    R["start_fresh"], R["start_again"] = median(fresh), median(again)
    say("  start: fresh %.3fs, existing dir %.3fs" % (R["start_fresh"], R["start_again"]))

    target.start(fresh=True)
    target.setup()
    fill(target, data.page, workers=1)
    fill(target, data.chain, problems=problems)
    first = 100 - 1 - CHAIN  # fillers to ~100 projects, with pagepkg and the chain
    fill(target, data.filler[:first], problems=problems)
    # 6a. growth baseline at ~100 projects
    page = target.simple_root() + "pagepkg/"
    R["g100_page"], _ = latency(target.port, page, cfg.lat_n // 2, {"Accept": HTML_ACCEPT})
    R["g100_upload"], f, notes = concurrent_uploads(target, data.growth_uploads("a", cfg.growth_up), 1)
    if f:
        problems.append("%s: growth uploads at 100 projects: %d failed: %s" % (name, f, notes[:2]))

    # 2. project page
    nfiles = len(file_links(target.port, page))
    if nfiles != 20:
        problems.append("%s: project page lists %d files, expected 20" % (name, nfiles))
    nj = count_json_files(target.port, page)
    if nj is not None and nj != 20:
        problems.append("%s: PEP 691 JSON project page lists %d files, expected 20" % (name, nj))
    for fmt, accept in (("html", HTML_ACCEPT), ("json", JSON_ACCEPT)):
        if fmt == "json" and nj is None:
            continue
        R["page_rps_" + fmt] = page_rate(target, page, accept, cfg, problems, "%s page" % fmt)
        R["page_lat_" + fmt], bad = latency(target.port, page, cfg.lat_n, {"Accept": accept})
        if bad:
            problems.append("%s: %d non-200 answers (%s page, 1 connection)" % (name, bad, fmt))
        say("  project page %s: %.0f req/s (16 conns), %.2f ms (1 conn)"
            % (fmt, R["page_rps_" + fmt], R["page_lat_" + fmt] * 1e3))

    # 3. uploads of 1 MB wheels
    for key, jobs, workers in (("up1", data.up1, 1), ("up8", data.up8, 8)):
        lat, fails, notes = concurrent_uploads(target, jobs, workers)
        R[key], R[key + "_fail"] = lat, fails
        if fails:
            problems.append("%s: %d of %d 1 MB uploads failed with %d uploaders: %s"
                            % (name, fails, len(jobs), workers, notes[:3]))
        say("  upload 1 MB, %d uploader(s): median %.1f ms, %d failed" % (workers, lat * 1e3, fails))

    # 4. 50 MB download
    fill(target, [data.big], workers=1)
    big_fn = data.big[2][0]
    links = [p for p in file_links(target.port, target.simple_root() + "bigpkg/")
             if p.endswith(big_fn)]
    if not links:
        problems.append("%s: no link to %s" % (name, big_fn))
    else:
        R["download"] = throughput(target.port, links[0], cfg.dl_runs, len(data.big[2][1]))
        say("  download %d MB: %.0f MB/s" % (cfg.dl_mb, R["download"]))

    if name == "minidevpi":
        run_nginx(target, cfg, data, R, problems)

    # 5. + 6b. many projects
    t = fill(target, data.filler[first:], problems=problems)
    say("  filled to %d projects in %.1fs (%.1f uploads/s, 8 uploaders)"
        % (cfg.many, t, len(data.filler[first:]) / t))
    R["fill_rate"] = len(data.filler[first:]) / t
    R["root"], bad = latency(target.port, target.simple_root(), cfg.root_n, {"Accept": HTML_ACCEPT})
    c = Client(target.port)
    st, body, _ = c.request("GET", target.simple_root(), headers={"Accept": HTML_ACCEPT})
    c.close()
    listed = body.count(b"<a ")
    if listed < cfg.many:
        problems.append("%s: root listing shows %d projects, expected >= %d" % (name, listed, cfg.many))
    say("  root listing, %d projects: %.1f ms (%d KB)" % (cfg.many, R["root"] * 1e3, len(body) // 1024))
    R["gN_page"], _ = latency(target.port, page, cfg.lat_n // 2, {"Accept": HTML_ACCEPT})
    R["gN_upload"], f, notes = concurrent_uploads(target, data.growth_uploads("b", cfg.growth_up), 1)
    if f:
        problems.append("%s: growth uploads at %d projects: %d failed: %s" % (name, cfg.many, f, notes[:2]))
    R["growth_page"] = R["gN_page"] / R["g100_page"]
    R["growth_upload"] = R["gN_upload"] / R["g100_upload"]
    say("  growth 100 -> %d: page %.2fx, upload %.2fx"
        % (cfg.many, R["growth_page"], R["growth_upload"]))
    R["rss"] = vm_hwm_mb(target.proc.pid)
    say("  peak RSS (VmHWM): %.1f MB" % R["rss"])
    target.discard()


# (key, label, unit, scale, kind) -- kind "time": lower is better (times, MB); "rate": higher
# is better; "count" and "info": no ratio
ROWS = [
    ("start_fresh", "start → first answer, fresh dir", "ms", 1e3, "time"),
    ("start_inproc", "  in-process minidevpi.Server (vs peers' subprocess)", "ms", 1e3, "time"),
    ("start_again", "start → first answer, existing dir", "ms", 1e3, "time"),
    ("page_rps_html", "project page, 20 files, HTML, 16 conns", "req/s", 1, "rate"),
    ("page_rps_json", "project page, 20 files, JSON, 16 conns", "req/s", 1, "rate"),
    ("page_lat_html", "project page HTML, 1 conn, median", "ms", 1e3, "time"),
    ("page_lat_json", "project page JSON, 1 conn, median", "ms", 1e3, "time"),
    ("up1", "upload 1 MB wheel, 1 uploader, median", "ms", 1e3, "time"),
    ("up1_fail", "  failures", "", 1, "count"),
    ("up8", "upload 1 MB wheel, 8 uploaders, median", "ms", 1e3, "time"),
    ("up8_fail", "  failures", "", 1, "count"),
    ("download", "download 50 MB file, 1 conn", "MB/s", 1, "rate"),
    ("nginx_static_dl", "  nginx serving the same file from disk", "MB/s", 1, "info"),
    ("nginx_proxy_dl", "  through nginx in front (README config), cached", "MB/s", 1, "info"),
    ("nginx_page_rps", "project page HTML, 16 conns, nginx in front", "req/s", 1, "info"),
    ("root", "root listing, {many} projects, median", "ms", 1e3, "time"),
    ("fill_rate", "fill: small uploads, 8 uploaders", "up/s", 1, "rate"),
    ("growth_page", "growth 100→{many}: project page latency", "x", 1, "info"),
    ("growth_upload", "growth 100→{many}: upload latency", "x", 1, "info"),
    ("rss", "peak RSS of the server (VmHWM)", "MB", 1, "info"),
    ("mirror_page_rps_html", "mirror project page, cached, 20 files, HTML, 16 conns", "req/s", 1, "rate"),
    ("mirror_page_rps_json", "mirror project page, cached, 20 files, JSON, 16 conns", "req/s", 1, "rate"),
    ("mirror_root_first", "mirror root listing, {upstream} upstream projects: first", "s", 1, "time"),
    ("mirror_root_html", "  later requests, HTML, median", "ms", 1e3, "time"),
    ("mirror_root_html_gz", "  later requests, HTML, gzip, median", "ms", 1e3, "time"),
    ("mirror_root_json", "  later requests, JSON, median", "ms", 1e3, "time"),
    ("mirror_root_json_gz", "  later requests, JSON, gzip, median", "ms", 1e3, "time"),
    ("mirror_rss", "  peak RSS of the mirror server (VmHWM)", "MB", 1, "time"),
    ("xfer_cp", "cp -r of a server dir with {xfer} files (reference)", "s", 1, "info"),
    ("xfer_export", "export {xfer} files", "s", 1, "info"),
    ("xfer_import", "import {xfer} files", "s", 1, "info"),
    ("pip", "pip install 30 packages (chain), warm index", "s", 1, "time"),
    ("uv", "uv pip install 30 packages (chain), warm index", "s", 1, "time"),
]

# key -> list of (description, check(results) -> bool or None when not measurable)


def targets(res):
    m = res.get("minidevpi", {})
    d = res.get("devpi-server", {})
    p = res.get("pypiserver", {})

    def ratio(peer, key):
        a, b = m.get(key), peer.get(key)
        if a is None or b is None or a == 0:
            return None
        return b / a
    out = {}

    def add(key, text, ok):
        out.setdefault(key, []).append((text, ok))
    r = ratio(d, "start_fresh")
    add("start_fresh", "≥20x devpi", None if r is None else r >= 20)
    r = ratio(p, "start_fresh")
    add("start_fresh", "< pypiserver", None if r is None else r > 1)
    for key, peer, label, need in (("page_rps_html", d, "devpi", 3), ("page_rps_html", p, "pypiserver", 5),
                                   ("page_rps_json", d, "devpi", 3)):
        a, b = m.get(key), peer.get(key)
        add(key, "≥%dx %s" % (need, label), None if a is None or b is None else a >= need * b)
    for key in ("page_lat_html", "page_lat_json", "root", "up1", "up8"):
        r = ratio(d, key)
        add(key, "< devpi", None if r is None else r > 1)
    for key in ("up1_fail", "up8_fail"):
        add(key, "= 0", None if m.get(key) is None else m[key] == 0)
    a, b = m.get("download"), d.get("download")
    add("download", "≥ devpi", None if a is None or b is None else a >= b)
    b = m.get("nginx_static_dl")
    add("download", "≥ nginx÷1.3", None if a is None or b is None else a * 1.3 >= b)
    for key in ("growth_page", "growth_upload"):
        add(key, "≤1.5x", None if m.get(key) is None else m[key] <= 1.5)
    add("rss", "< 60 MB", None if m.get("rss") is None else m["rss"] < 60)
    for fmt in ("html", "json"):
        a, b = m.get("mirror_page_rps_" + fmt), m.get("page_rps_" + fmt)
        r = None if a is None or not b else a / b
        add("mirror_page_rps_" + fmt, "≥0.8x private page" + ("" if r is None else ": %.2fx" % r),
            None if r is None else r >= 0.8)
    for key in ("mirror_root_html", "mirror_root_html_gz", "mirror_root_json", "mirror_root_json_gz"):
        add(key, "< 300 ms", None if m.get(key) is None else m[key] < 0.3)
    add("mirror_rss", "< 150 MB", None if m.get("mirror_rss") is None else m["mirror_rss"] < 150)
    for key in ("xfer_export", "xfer_import"):
        a, b = m.get(key), m.get("xfer_cp")
        r = None if a is None or not b else a / b
        add(key, "≤2x cp -r" + ("" if r is None else ": %.2fx" % r), None if r is None else r <= 2.0)
    for key in ("pip", "uv"):
        a, b = m.get(key), d.get(key)
        add(key, "≤ devpi", None if a is None or b is None else a <= b)
    return out


def fmt(v, scale, key):
    if v is None:
        return "-"
    v = v * scale
    if isinstance(v, int) or key.endswith("_fail"):
        return "%d" % v
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.2f" % v


def fmt_ratio(m, peer, kind):
    if m is None or peer is None or kind in ("count", "info") or m == 0 or peer == 0:
        return ""
    r = peer / m if kind == "time" else m / peer
    return "%.1fx" % r if r >= 1 else "%.2fx" % r


def print_table(res, cfg, names):
    tg = targets(res)
    head = ["scenario", "unit"]
    for n in names:
        head.append(n)
        if n != "minidevpi":
            head.append("ratio")
    head += ["target", "ok"]
    rows = []
    for key, label, unit, scale, kind in ROWS:
        label = label.format(many=cfg.many, upstream="{:,}".format(cfg.upstream_projects),
                             xfer="{:,}".format(cfg.xfer_files))
        row = [label, unit]
        for n in names:
            v = res.get(n, {}).get(key)
            if key == "start_inproc":
                v = res.get(n, {}).get("start_inproc" if n == "minidevpi" else "start_fresh")
            row.append(fmt(v, scale, key))
            if n != "minidevpi":
                mv = res.get("minidevpi", {}).get(key)
                if key == "start_inproc":
                    mv = res.get("minidevpi", {}).get("start_inproc")
                row.append(fmt_ratio(mv, v, kind))
        checks = tg.get(key, [])
        row.append(", ".join(t for t, _ in checks))
        row.append(", ".join("-" if ok is None else ("PASS" if ok else "FAIL") for _, ok in checks))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    print(line(head))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(line(r))
    print("\nratio: how many times better minidevpi is (peer ÷ minidevpi for times, "
          "minidevpi ÷ peer for rates); above 1 means minidevpi wins.")
    fails = [(k, t) for k, cs in tg.items() for t, ok in cs if ok is False]
    return fails


# ----------------------------------------------------------------------------------
# Cold mirror: minidevpi's root/pypi against a fake HTTPS upstream with latency
# ----------------------------------------------------------------------------------

def make_certs(d):
    """A CA and a server certificate for 127.0.0.1 made with the openssl command;
    returns (CA file, server cert, server key)."""
    ca_key, ca, key, csr, crt = (os.path.join(d, n) for n in
                                 ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem"))
    ext = os.path.join(d, "srv.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for cmd in (["req", "-x509"] + ec + ["-keyout", ca_key, "-out", ca, "-days", "2", "-subj",
                                         "/CN=minidevpi bench CA", "-addext",
                                         "basicConstraints=critical,CA:TRUE", "-addext",
                                         "keyUsage=critical,keyCertSign,cRLSign"],
                ["req"] + ec + ["-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
                ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                 "-out", crt, "-days", "2", "-extfile", ext]):
        subprocess.run(["openssl"] + cmd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return ca, crt, key


class TreeData:
    """~100 projects of a dependency tree: libraries bench-lib-NN (3 versions each, a wheel
    and an sdist per version, wheels of 8-200 KB), each requiring a few libraries further
    down; 16 apps (bench-app-NN) requiring overlapping sets of the top libraries; bench-big
    with 2 MB wheels for the time to first byte of a file."""

    def __init__(self, nlibs=83, napps=16):
        import random
        rnd = random.Random(15)
        self.files = {}     # filename -> bytes
        self.meta = {}      # filename -> METADATA bytes (wheels)
        self.projects = {}  # norm name -> [filename]
        self.requires = {}  # norm name -> [norm names]
        libs = ["bench-lib-%02d" % i for i in range(nlibs)]
        for i, name in enumerate(libs):
            later = libs[i + 1:i + 25]
            deps = rnd.sample(later, min(len(later), rnd.choice((0, 1, 2, 2, 3, 4))))
            self._add(name, deps, rnd.randint(8, 200) * 1024, rnd)
        tops = libs[:30]
        for k in range(napps):
            self._add("bench-app-%02d" % k, rnd.sample(tops, 8), 8 * 1024, rnd)
        self.big = []
        for v in range(5):
            fn = "bench_big-1.%d-py3-none-any.whl" % v
            self.files[fn] = make_wheel("bench-big", "1.%d" % v, os.urandom(2 << 20))[1]
            self.meta[fn] = self._metadata(fn)
            self.projects.setdefault("bench-big", []).append(fn)
            self.big.append(fn)
        self.apps = ["bench-app-%02d" % k for k in range(napps)]
        self.upload_time = {}
        for n, (name, fns) in enumerate(sorted(self.projects.items())):
            for j, fn in enumerate(fns):
                self.upload_time[fn] = "2024-%02d-%02dT10:%02d:00.000000Z" % (
                    1 + n % 12, 1 + j % 28, n % 60)

    def _metadata(self, fn):
        with zipfile.ZipFile(io.BytesIO(self.files[fn])) as zf:
            return zf.read([n for n in zf.namelist() if n.endswith(".dist-info/METADATA")][0])

    def _add(self, name, deps, size, rnd):
        self.requires[name] = deps
        for v in ("1.0", "1.1", "2.0"):
            reqs = ["%s>=1.0" % d for d in deps]
            fn, self.files[fn] = make_wheel(name, v, os.urandom(size), reqs)[:2]
            self.meta[fn] = self._metadata(fn)
            sd, self.files[sd] = make_sdist(name, v)[:2]
            self.projects.setdefault(name, []).extend([sd, fn])

    def closure(self, roots):
        out, todo = set(), list(roots)
        while todo:
            n = todo.pop()
            if n not in out:
                out.add(n)
                todo.extend(self.requires.get(n, ()))
        return out


class _TLSUpstreamHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as real servers: headers and body without delayed ACKs

    def log_message(self, *args):
        pass

    def setup(self):
        up = self.server.up
        with up.lock:
            up.connections[self.server.role] += 1
        time.sleep(up.latency * 2)  # TCP and TLS handshakes: two round trips
        try:
            self.request.do_handshake()
        except (OSError, ValueError):
            self.request.close()
            raise ConnectionError
        super().setup()

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, socket.timeout, OSError):
            pass

    def send_body(self, status, body, ctype, gz=False):
        enc = gz and "gzip" in (self.headers.get("Accept-Encoding") or "")
        if enc:
            body = gz if isinstance(gz, bytes) else gzip.compress(body, 6)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if enc:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Cache-Control", "max-age=600")
        self.end_headers()
        up = self.server.up
        step = 64 * 1024
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            if up.bandwidth and len(body) > step:
                time.sleep(step / up.bandwidth)

    def do_GET(self):
        up = self.server.up
        path = urlsplit(self.path).path
        with up.lock:
            up.hits[path] = up.hits.get(path, 0) + 1
        time.sleep(up.latency)  # one round trip to the answer's first byte
        data = up.data
        if self.server.role == "files":
            fn = path.rsplit("/", 1)[-1]
            if fn.endswith(".metadata") and fn[:-9] in data.meta:
                return self.send_body(200, data.meta[fn[:-9]], "application/octet-stream")
            if fn in data.files:
                return self.send_body(200, data.files[fn], "application/octet-stream")
            return self.send_body(404, b"no such file", "text/plain")
        m = re.match(r"^/simple/([^/]+)/$", path)
        if m and m.group(1) in data.projects:
            name = m.group(1)
            js = wants_json(self.headers.get("Accept"))
            body, ctype = up.pages[name][js], (JSON_ACCEPT if js else "text/html")
            return self.send_body(200, body, ctype, gz=up.gzipped[name][js])
        if m:
            return self.send_body(404, b"no such project", "text/plain", gz=True)
        return self.send_body(404, b"no", "text/plain")


class TLSUpstream:
    """Two HTTPS servers on 127.0.0.1, like a public index: pages (``/simple/``, PEP 691
    JSON or HTML, gzip when asked) on one port, files and their PEP 658 metadata on
    another. Every answer waits ``latency`` seconds (a round trip), a new connection two
    (TCP + TLS handshakes); files are sent at ``bandwidth`` bytes/s."""

    def __init__(self, data, cert, key, latency, bandwidth):
        import ssl
        self.data, self.latency, self.bandwidth = data, latency, bandwidth
        self.lock = threading.Lock()
        self.hits = {}
        self.connections = {"pages": 0, "files": 0}
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.servers = []
        for role in ("pages", "files"):
            s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TLSUpstreamHandler)
            s.daemon_threads = True
            s.request_queue_size = 128
            s.socket = ctx.wrap_socket(s.socket, server_side=True,
                                       do_handshake_on_connect=False)
            s.up, s.role = self, role
            s.handle_error = lambda *a: None
            self.servers.append(s)
            threading.Thread(target=s.serve_forever, daemon=True).start()
        self.url = "https://127.0.0.1:%d/simple/" % self.servers[0].server_address[1]
        self.files_port = self.servers[1].server_address[1]
        files_url = "https://127.0.0.1:%d/files/" % self.files_port
        self.pages, self.gzipped = {}, {}
        for name, fns in data.projects.items():
            entries = []
            for fn in fns:
                e = {"filename": fn, "url": files_url + fn,
                     "hashes": {"sha256": hashlib.sha256(data.files[fn]).hexdigest()},
                     "requires-python": ">=3.8", "size": len(data.files[fn]),
                     "upload-time": data.upload_time[fn], "yanked": False}
                if fn in data.meta:
                    e["core-metadata"] = {"sha256": hashlib.sha256(data.meta[fn]).hexdigest()}
                entries.append(e)
            versions = sorted({fn.split("-")[1].replace(".tar.gz", "") for fn in fns})
            js = json.dumps({"meta": {"api-version": "1.1"}, "name": name, "versions": versions,
                             "files": entries}).encode()
            page = "".join(
                '<a href="%s#sha256=%s" data-requires-python="&gt;=3.8"%s>%s</a><br>\n' % (
                    e["url"], e["hashes"]["sha256"],
                    ' data-core-metadata="sha256=%s"' % e["core-metadata"]["sha256"]
                    if "core-metadata" in e else "", e["filename"]) for e in entries)
            self.pages[name] = {True: js, False: ("<!DOCTYPE html><html><body><h1>Links for %s"
                                                  "</h1>\n%s</body></html>\n" % (name, page)
                                                  ).encode()}
            # (gzipped once beforehand: the upstream costs next to nothing while serving)
            self.gzipped[name] = {k: gzip.compress(v, 6) for k, v in self.pages[name].items()}

    def reset(self):
        with self.lock:
            self.hits = {}
            self.connections = {"pages": 0, "files": 0}

    def stop(self):
        for s in self.servers:
            s.shutdown()
            s.server_close()


class ColdMinidevpi(Minidevpi):
    """minidevpi whose root/pypi mirrors the fake HTTPS upstream (trusting its CA through
    SSL_CERT_FILE); ``script`` may be another minidevpi.py (an older one, to compare)."""

    def __init__(self, script, upstream_url, env, extra=()):
        super().__init__(sys.executable)
        self.script, self.upstream_url, self.env, self.extra = script, upstream_url, env, extra

    def launch(self, fresh):
        cmd = [sys.executable, self.script, "serve", "--serverdir", self.serverdir(),
               "--host", "127.0.0.1", "--port", str(self.port), "--no-access-log"]
        if fresh:
            cmd += ["--root-passwd", "pw"] + (
                ["--mirror-url", self.upstream_url] if self.upstream_url else [])
        self.proc = popen(cmd + list(self.extra), self.log(), self.env)


def timed_install(tool, python, uv, index_url, roots, expect, env, extra=()):
    """Seconds for a fresh install of ``roots`` into a new --target directory, no cache;
    every name of ``expect`` must be installed."""
    roots = [roots] if isinstance(roots, str) else list(roots)
    target_dir = mkdtemp("bench-%s-" % tool)
    if tool == "pip":
        cmd = [python, "-m", "pip", "install", "--isolated", "--no-cache-dir",
               "--disable-pip-version-check", "--no-input", "--quiet", "--target",
               target_dir, "--index-url", index_url] + list(extra) + roots
    else:
        cmd = [uv, "pip", "install", "--no-config", "--no-cache", "--quiet", "--python",
               python, "--target", target_dir, "--default-index", index_url] + roots
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, env=env, timeout=600, cwd=target_dir)
    dt = time.monotonic() - t0
    got = {normalize(e.split("-")[0]) for e in os.listdir(target_dir) if e.endswith(".dist-info")}
    shutil.rmtree(target_dir, ignore_errors=True)
    TMPDIRS.remove(target_dir)
    if r.returncode:
        raise RuntimeError("%s install of %s failed: %s" % (tool, " ".join(roots),
                                                           r.stdout.decode()[-1500:]))
    missing = {normalize(n) for n in expect or ()} - got
    if missing:
        raise RuntimeError("%s install of %s: %d missing" % (tool, " ".join(roots),
                                                             len(missing)))
    return dt


def ttfb(conn, path, headers=None):
    """Seconds from sending a GET on an open connection to the first body byte."""
    t0 = time.monotonic()
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    resp.read(1)
    dt = time.monotonic() - t0
    resp.read()
    assert resp.status == 200, (path, resp.status)
    return dt


def run_cold_mirror(args):
    """The cold mirror scenario (``--cold-mirror``); prints its own table."""
    import ssl
    python = sys.executable
    uv = find_uv()
    d = mkdtemp("bench-cold-")
    ca, cert, key = make_certs(d)
    say("generating the tree ...")
    data = TreeData()
    up = TLSUpstream(data, cert, key, args.latency_ms / 1000.0, args.bandwidth_mb * 1e6)
    script = os.path.abspath(args.minidevpi or MINIDEVPI)
    senv = dict(server_env(), SSL_CERT_FILE=ca)
    senv.pop("SSL_CERT_DIR", None)
    extra = ["--mirror-allow-host", "127.0.0.1:%d" % up.files_port]
    ienv = dict(installer_env(), SSL_CERT_FILE=ca)
    ienv.pop("SSL_CERT_DIR", None)
    pip_cert = ["--cert", ca]
    root = data.apps[0]
    tree = data.closure([root])
    say("fake upstream %s: %d projects, %d files (%.1f MB), latency %d ms, files at %.0f MB/s; "
        "install %s pulls in %d projects" % (up.url, len(data.projects), len(data.files),
                                             sum(map(len, data.files.values())) / 1e6,
                                             args.latency_ms, args.bandwidth_mb, root, len(tree)))
    R = {k: [] for k in ("uv_direct", "uv_cold", "uv_warm", "pip_direct", "pip_cold",
                         "pip_warm")}
    via = {}
    try:
        for rnd in range(args.rounds):
            say("round %d/%d" % (rnd + 1, args.rounds))
            for tool in (("uv", "pip") if uv else ("pip",)):
                srv = ColdMinidevpi(script, up.url, senv, extra)
                srv.start()
                mirror = "http://127.0.0.1:%d/root/pypi/+simple/" % srv.port
                R[tool + "_direct"].append(timed_install(tool, python, uv, up.url, root, tree,
                                                         ienv, pip_cert))
                up.reset()
                R[tool + "_cold"].append(timed_install(tool, python, uv, mirror, root, tree, ienv))
                via[tool] = (sum(up.hits.values()), dict(up.connections),
                             max(up.hits.values()))
                R[tool + "_warm"].append(timed_install(tool, python, uv, mirror, root, tree, ienv))
                srv.discard()
                say("  %s: direct %.2fs, cold %.2fs, warm %.2fs" % (
                    tool, R[tool + "_direct"][-1], R[tool + "_cold"][-1], R[tool + "_warm"][-1]))
        # time to first byte: a cold page and a cold 2 MB file, against the same direct
        say("time to first byte ...")
        srv = ColdMinidevpi(script, up.url, senv, extra)
        srv.start()
        ctx = ssl.create_default_context(cafile=ca)
        direct_pages = http.client.HTTPSConnection("127.0.0.1", up.servers[0].server_address[1],
                                                   context=ctx, timeout=60)
        direct_files = http.client.HTTPSConnection("127.0.0.1", up.files_port, context=ctx,
                                                   timeout=60)
        mine = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        accept = {"Accept": JSON_ACCEPT, "Accept-Encoding": "gzip"}
        # (one request first on every connection: the handshakes are not measured)
        ttfb(direct_pages, "/simple/bench-big/", accept)
        ttfb(direct_files, "/files/" + data.big[0] + ".metadata")
        ttfb(mine, "/root/pypi/+simple/bench-big/", accept)
        page_d, page_m, file_d, file_m = [], [], [], []
        libs = sorted(n for n in data.projects if n.startswith("bench-lib-"))[-5:]
        for name in libs:
            page_d.append(ttfb(direct_pages, "/simple/%s/" % name, accept))
            page_m.append(ttfb(mine, "/root/pypi/+simple/%s/" % name, accept))
        page = json.loads(mine_get(mine, "/root/pypi/+simple/bench-big/", JSON_ACCEPT))
        hrefs = {f["filename"]: urljoin("/root/pypi/+simple/bench-big/", f["url"])
                 for f in page["files"]}
        ttfb(mine, hrefs[data.big[0]])  # (minidevpi's connection to the file host too)
        for fn in data.big[1:]:
            file_d.append(ttfb(direct_files, "/files/" + fn))
            file_m.append(ttfb(mine, hrefs[fn]))
        for c in (direct_pages, direct_files, mine):
            c.close()
        srv.discard()
        # 16 concurrent cold installs of overlapping trees through one fresh server
        say("16 concurrent cold installs ...")
        srv = ColdMinidevpi(script, up.url, senv, extra)
        srv.start()
        mirror = "http://127.0.0.1:%d/root/pypi/+simple/" % srv.port
        up.reset()
        errors, times = [], []

        def one(app, tool):
            try:
                times.append(timed_install(tool, python, uv, mirror, app,
                                           data.closure([app]), ienv))
            except Exception as e:
                errors.append("%s (%s): %s" % (app, tool, str(e)[-300:]))
        tools = ["uv"] if uv else ["pip"]
        t0 = time.monotonic()
        threads = [threading.Thread(target=one, args=(app, tools[i % len(tools)]))
                   for i, app in enumerate(data.apps)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        needed = data.closure(data.apps)
        conc = {"wall": wall, "errors": errors, "requests": sum(up.hits.values()),
                "max_per_path": max(up.hits.values()), "pages": sum(
                    1 for p in up.hits if p.startswith("/simple/")),
                "projects": len(needed), "connections": dict(up.connections),
                "files": sum(1 for p in up.hits if p.startswith("/files/")
                             and not p.endswith(".metadata")),
                "metadata": sum(1 for p in up.hits if p.endswith(".metadata"))}
        srv.discard()
        real = "not run (--real-upstream not given)"
        if args.real_upstream:
            say("real upstream ...")
            try:
                real = real_upstream(args, python, uv, script)
            except Exception as e:
                real = "failed: %s" % str(e)[-300:]
    finally:
        up.stop()
    med = {k: statistics.median(v) for k, v in R.items() if v}
    print()
    print("cold mirror through minidevpi (%s), %d CPUs, Python %s, latency %d ms, files at "
          "%.0f MB/s, %d rounds, tree of %d projects from %s"
          % (os.path.relpath(script), os.cpu_count(), sys.version.split()[0], args.latency_ms,
             args.bandwidth_mb, args.rounds, len(tree), root))
    print("| install | direct | minidevpi cold | ratio | minidevpi warm | ratio | goal |")
    print("|---|---|---|---|---|---|---|")
    for tool, goal in (("uv", 1.3), ("pip", 1.2)):
        if tool + "_cold" not in med:
            continue
        dr, co, wa = med[tool + "_direct"], med[tool + "_cold"], med[tool + "_warm"]
        print("| %s | %.2f s | %.2f s | %.2fx | %.2f s | %.2fx | cold ≤ %.1fx: %s; warm ≤ 1x: %s |"
              % (tool, dr, co, co / dr, wa, wa / dr, goal, "met" if co / dr <= goal else "MISSED",
                 "met" if wa <= dr else "MISSED"))
    for tool, (n, conns, mx) in sorted(via.items()):
        print("cold %s via minidevpi: %d upstream requests, %d + %d connections (pages + files), "
              "each thing fetched at most %d time(s)" % (tool, n, conns["pages"], conns["files"], mx))
    print("time to first byte, median: cold page %.1f ms (direct %.1f ms); cold 2 MB file "
          "%.1f ms (direct %.1f ms)" % (statistics.median(page_m) * 1e3,
                                        statistics.median(page_d) * 1e3,
                                        statistics.median(file_m) * 1e3,
                                        statistics.median(file_d) * 1e3))
    print("16 concurrent cold installs (%s) of overlapping trees (%d projects in all): %.1f s, "
          "%d errors; upstream: %d requests (%d pages, %d files, %d metadata), each fetched at "
          "most %d time(s), %d + %d connections"
          % ("/".join(tools), conc["projects"], conc["wall"], len(conc["errors"]),
             conc["requests"], conc["pages"], conc["files"], conc["metadata"],
             conc["max_per_path"], conc["connections"]["pages"], conc["connections"]["files"]))
    for e in conc["errors"]:
        print("  - " + e)
    print("real upstream: " + real)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"installs": R, "via": via, "ttfb": {"page_direct": page_d,
                       "page_minidevpi": page_m, "file_direct": file_d,
                       "file_minidevpi": file_m}, "concurrent": conc, "real": real}, f, indent=1)
    return 0


def mine_get(conn, path, accept):
    conn.request("GET", path, headers={"Accept": accept})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, (path, resp.status)
    return body


def real_upstream(args, python, uv, script, rounds=2):
    """uv and pip cold through minidevpi against the index pip on this machine uses (the
    mirror's default), against the same direct; a line for the report. The upstream's
    name is never printed."""
    sys.path.insert(0, REPO)
    import minidevpi
    url = minidevpi.pip_index_url()
    if not url or not url.startswith("http"):
        return "skipped (pip on this machine names no HTTP index)"
    try:
        c = http.client.HTTPSConnection(urlsplit(url).hostname, urlsplit(url).port or 443,
                                        timeout=10) if url.startswith("https") else \
            http.client.HTTPConnection(urlsplit(url).hostname, urlsplit(url).port or 80,
                                       timeout=10)
        roots = args.real_upstream.split(",")
        c.request("GET", urlsplit(url).path.rstrip("/") + "/%s/" % normalize(roots[0]),
                  headers={"Accept": JSON_ACCEPT})
        resp = c.getresponse()
        status, body = resp.status, resp.read()
        c.close()
    except OSError as e:
        return "skipped (not reachable: %s)" % type(e).__name__
    if status != 200:
        return "skipped (not reachable: the project page answered %d)" % status
    # a separate file host whose name resolves to non-public addresses here (a proxy, a
    # sandbox) is refused by the mirror policy: it is allowed by name, as a user would
    extra, note = [], ""
    try:
        f = urlsplit(urljoin(url, json.loads(body)["files"][-1]["url"]))
        port = f.port or (443 if f.scheme == "https" else 80)
        if (f.hostname, port) != (urlsplit(url).hostname, urlsplit(url).port or 443) and not all(
                minidevpi.is_public_address(a[4][0]) for a in socket.getaddrinfo(f.hostname, port)):
            extra = ["--mirror-allow-host", "%s:%d" % (f.hostname, port)]
            note = " (the file host resolves to non-public addresses here: allowed with " \
                   "--mirror-allow-host)"
    except (OSError, ValueError, KeyError, IndexError):
        pass
    env = installer_env()
    tools = ("uv", "pip") if uv else ("pip",)
    ts = {(tool, how): [] for tool in tools for how in ("direct", "cold", "warm")}
    for rnd in range(rounds):
        for tool in tools:
            srv = ColdMinidevpi(script, None, server_env(), extra)
            srv.start()
            mirror = "http://127.0.0.1:%d/root/pypi/+simple/" % srv.port
            for how, index in (("direct", url), ("cold", mirror), ("warm", mirror)):
                ts[tool, how].append(timed_install(tool, python, uv, index, roots, None, env))
            srv.discard()
            say("  round %d/%d %s: direct %.2fs, cold %.2fs (%.2fx), warm %.2fs" % (
                rnd + 1, rounds, tool, ts[tool, "direct"][-1], ts[tool, "cold"][-1],
                ts[tool, "cold"][-1] / ts[tool, "direct"][-1], ts[tool, "warm"][-1]))
    out = []
    for tool in tools:
        med = {how: statistics.median(ts[tool, how]) for how in ("direct", "cold", "warm")}
        out.append("%s %.2f s cold via minidevpi vs %.2f s direct (%.2fx; rounds %s), warm "
                   "%.2f s (%.2fx)" % (
                       tool, med["cold"], med["direct"], med["cold"] / med["direct"],
                       ", ".join("%.2f" % (c / d) for c, d in zip(ts[tool, "cold"],
                                                                  ts[tool, "direct"])),
                       med["warm"], med["warm"] / med["direct"]))
    return "%s, %d rounds: %s%s" % (" ".join(roots), rounds, "; ".join(out), note)


def cleanup():
    for p in list(PROCS):
        try:
            stop_proc(p)
        except Exception:
            pass
    for d in list(TMPDIRS):
        shutil.rmtree(d, ignore_errors=True)
        TMPDIRS.remove(d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer runs, shorter loads, 1,000 instead of 10,000 projects")
    ap.add_argument("--peers-python", default="/tmp/benchvenv/bin/python",
                    help="python of the virtual environment holding devpi-server and pypiserver")
    ap.add_argument("--only", default="minidevpi,devpi-server,pypiserver",
                    help="comma-separated servers to run (default: all that are installed)")
    ap.add_argument("--projects", type=int, metavar="N",
                    help="projects for the root listing and growth scenarios "
                         "(default 10,000; 1,000 with --quick; at least 200)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results to FILE")
    g = ap.add_argument_group("cold mirror scenario (--cold-mirror runs only it)")
    g.add_argument("--cold-mirror", action="store_true",
                   help="uv and pip cold installs through minidevpi's root/pypi against a "
                        "fake HTTPS upstream, against the same direct")
    g.add_argument("--latency-ms", type=float, default=30,
                   help="the fake upstream's round trip (default 30 ms)")
    g.add_argument("--bandwidth-mb", type=float, default=50,
                   help="the fake upstream's file bandwidth, MB/s (default 50)")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    g.add_argument("--minidevpi", metavar="PATH",
                   help="another minidevpi.py to measure (an older one, for before/after)")
    g.add_argument("--real-upstream", metavar="REQS",
                   help="also install REQS (comma-separated) through root/pypi against the "
                        "index pip on this machine uses, against the same direct")
    g.add_argument("--real-only", action="store_true",
                   help="with --real-upstream: only that part, --rounds interleaved rounds "
                        "(no fake upstream)")
    g = ap.add_argument_group("scale scenario (--scale runs only it)")
    g.add_argument("--scale", action="store_true",
                   help="N = 1,000, 10,000, 100,000 projects x 3 versions x 2 files: import, "
                        "export (time, peak memory), start to first answer, page latencies; "
                        "devpi-server beside it up to --scale-peer-max")
    g.add_argument("--scale-million", action="store_true",
                   help="with --scale: also N = 1,000,000 (hours, and ~30 GB of disk)")
    g.add_argument("--scale-ns", metavar="N,N", help="with --scale: these N instead")
    g.add_argument("--scale-versions", type=int, default=3, metavar="V",
                   help="with --scale: versions of each project (default 3)")
    g.add_argument("--scale-wheels-only", action="store_true",
                   help="with --scale: a wheel a version, no sdist (a dump of N projects "
                        "with a third of the files: 1,000,000 projects in about an hour)")
    g.add_argument("--scale-peer-max", type=int, default=10000, metavar="N",
                   help="the largest N devpi-server is run at (default 10,000)")
    g = ap.add_argument_group("tail latency scenario (--tail runs only it)")
    g.add_argument("--tail", action="store_true",
                   help="a project page's p50/p99 and rate at many keep-alive connections, "
                        "then uploads and deletes under many downloaders of a 1 MB file; "
                        "minidevpi (--minidevpi) and devpi-server side by side")
    g.add_argument("--tail-conns", default="64,256", metavar="N,N",
                   help="connection counts of the page load (default 64,256)")
    g.add_argument("--tail-downloaders", type=int, default=200, metavar="N",
                   help="concurrent downloaders while 10 upload and 5 delete (default 200)")
    g.add_argument("--tail-seconds", type=int, default=10, help="seconds per load (default 10)")
    g.add_argument("--tail-projects", type=int, default=1000, metavar="N",
                   help="filler projects in the index (default 1,000)")
    g = ap.add_argument_group("several processes on PostgreSQL (--processes runs only it)")
    g.add_argument("--processes", action="store_true",
                   help="one serve on sqlite, then 1, 2, 4 serve processes on one PostgreSQL "
                        "database: simple page and file load over all their ports, uploads "
                        "spread over them, and the lag from an upload on one to its file on "
                        "another's page (needs pg8000 in the Python that runs it)")
    g.add_argument("--processes-counts", default="1,2,4", metavar="N,N",
                   help="process counts on PostgreSQL (default 1,2,4)")
    g.add_argument("--processes-seconds", type=int, default=10, metavar="N",
                   help="seconds per load and of the upload run (default 10)")
    g.add_argument("--processes-conns", type=int, default=64, metavar="N",
                   help="client connections of the page and file loads (default 64)")
    g.add_argument("--processes-uploaders", type=int, default=8, metavar="N",
                   help="concurrent uploaders (default 8)")
    g.add_argument("--processes-projects", type=int, default=200, metavar="N",
                   help="projects filled, 2 versions of one small wheel each (default 200)")
    g.add_argument("--processes-lag-rounds", type=int, default=20, metavar="N",
                   help="uploads whose cross-process lag is measured (default 20)")
    g.add_argument("--processes-pg", metavar="SPEC",
                   help="host=H,port=P,user=U of a PostgreSQL cluster to make the databases "
                        "in (default: a throwaway one started with .ci/postgres, fsync off)")
    args = ap.parse_args(argv)
    if args.processes:
        # (SIGTERM too stops the servers and the throwaway PostgreSQL cluster)
        signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            return run_processes(args)
        except KeyboardInterrupt:
            return 130
        finally:
            cleanup()
    if args.tail:
        args.tail_conns = [int(x) for x in args.tail_conns.split(",")]
        try:
            return run_tail(args)
        except KeyboardInterrupt:
            return 130
        finally:
            cleanup()
    if args.scale:
        try:
            return run_scale(args)
        except KeyboardInterrupt:
            return 130
        finally:
            cleanup()
    if args.real_only:
        if not args.real_upstream:
            ap.error("--real-only needs --real-upstream")
        try:
            print("real upstream: " + real_upstream(
                args, sys.executable, find_uv(), os.path.abspath(args.minidevpi or MINIDEVPI),
                args.rounds))
            return 0
        except KeyboardInterrupt:
            return 130
        finally:
            cleanup()
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    if args.cold_mirror:
        try:
            return run_cold_mirror(args)
        except KeyboardInterrupt:
            return 130
        finally:
            cleanup()
    cfg = Cfg(args.quick)
    if args.projects:
        cfg.many = max(200, args.projects)
    wanted = args.only.split(",")
    peers_bin = os.path.dirname(args.peers_python)
    names, tgts = [], []
    for cls, exe in ((Minidevpi, None), (DevpiServer, "devpi-server"), (PypiServer, "pypi-server")):
        if cls.name not in wanted:
            continue
        if exe and not os.access(os.path.join(peers_bin, exe), os.X_OK):
            say("%s: not installed in %s, skipped (see benchmarks/README.md)" % (cls.name, peers_bin))
            continue
        names.append(cls.name)
        tgts.append(cls(args.peers_python))
    pip_python = args.peers_python if os.access(args.peers_python, os.X_OK) else sys.executable
    if subprocess.run([pip_python, "-m", "pip", "--version"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode:
        say("pip not available; the pip and uv install scenarios are skipped")
        pip_python = None
    uv = find_uv()
    if pip_python and not uv:
        say("uv not found (/tmp/dv/bin/uv or PATH); the uv install scenario is skipped")
    say("load generator: %s; %s mode" % ("wrk" if LOAD is load_wrk else "threads (wrk not on PATH)",
                                         "quick" if cfg.quick else "full"))
    t_all = time.monotonic()
    say("generating distributions ...")
    data = Data(cfg)
    results, problems = {}, []
    upstream = None
    try:
        if any(isinstance(t, DevpiLike) for t in tgts):
            t0 = time.monotonic()
            upstream = FakeUpstream(cfg.upstream_projects)
            upstream.start()
            say("fake upstream with %d projects at %s (%.1fs to make, root listing %d MB HTML, "
                "%d MB JSON)" % (upstream.n, upstream.simple_url, time.monotonic() - t0,
                                 len(upstream.root_html) >> 20, len(upstream.root_json) >> 20))
        for t in tgts:
            say("%s:" % t.name)
            R = results.setdefault(t.name, {})
            phases = [("run", lambda: run_target(t, cfg, data, results, problems))]
            if isinstance(t, DevpiLike):
                phases.append(("mirror run", lambda: run_mirror(t, cfg, upstream, R, problems)))
            if t.name == "minidevpi":
                phases.append(("export/import run", lambda: run_export_import(cfg, R, problems)))
            for what, fn in phases:
                try:
                    fn()
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    problems.append("%s: %s aborted: %s" % (t.name, what, e))
                    say("  aborted: %s" % e)
                    try:
                        say("  server log tail: " + open(t.log(), errors="replace").read()[-1500:])
                    except (OSError, TypeError):
                        pass
                    t.discard()
            if t.name == "minidevpi":
                R["start_inproc"] = inprocess_start(cfg.start_runs)
        if pip_python and tgts:
            say("pip and uv installs, all servers side by side:")
            run_installs([type(t) for t in tgts], args.peers_python, cfg, data, pip_python, uv,
                         results, problems)
    except KeyboardInterrupt:
        say("interrupted; stopping servers and removing temporary directories")
        cleanup()
        return 130
    finally:
        if upstream is not None:
            upstream.stop()
        cleanup()
    print()
    print("minidevpi benchmarks (%s, %d CPUs, Python %s, load: %s), %.0fs"
          % ("quick" if cfg.quick else "full", os.cpu_count(), sys.version.split()[0],
             "wrk" if LOAD is load_wrk else "threads", time.monotonic() - t_all))
    fails = print_table(results, cfg, names)
    cold = results.get("minidevpi", {}).get("xfer_cold")
    if cold is not None:
        print("export/import and cp -r: " + ("page cache dropped before each timed step" if cold else
                                             "page cache NOT dropped (not permitted): warm-cache figures"))
    if fails:
        print("\nmissed targets: " + "; ".join("%s %s" % (k, t) for k, t in fails))
    return finish(problems, args.json, {"results": results, "problems": problems,
                                        "quick": cfg.quick})


if __name__ == "__main__":
    sys.exit(main())
