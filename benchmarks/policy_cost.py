#!/usr/bin/env python3
"""What the block and allow lists and the reserved namespaces cost (issue 25).

    python3 benchmarks/policy_cost.py [--projects 10000] [--rounds 2000]

Starts an in-process minidevpi on 127.0.0.1 in a temporary directory, fills alice/dev with
``--projects`` projects (registered in one transaction) and one project ``pkg`` with real
files, then measures over one kept-alive connection, without rules and with many rules
(1,000 block entries on alice/dev, 500 server-wide block entries, 200 reserved
namespaces, none of which matches ``pkg``; 499 of the block entries are plain names of
projects of the index, which its project list then leaves out): a cached simple page, a
page built afresh after a release of it changed and after a config change (which compiles
the rules again), a file, and the index's project list, cached and built again after a
config change. Prints medians.

Then the rules that act on a mirror and on writes, on a second server: an offline mirror
keeping 10,000 files, measured without and with upstream changes noted (a replaced file
noted for every tenth project, the ones asked: what no silent substitution and following
upstream deletions read), and uploads into the first server's index, each of which writes
an audit record, remembers its file's first hash and checks for `Private ::` classifiers,
with the audit log read back filtered by project.
"""
import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import minidevpi  # noqa: E402

AUTH = {"Authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}
ROOT = {"Authorization": "Basic " + base64.b64encode(b"root:rootpw").decode()}


def wheel(directory, name, version):
    path = os.path.join(directory, "%s-%s-py3-none-any.whl" % (name, version))
    info = "%s-%s.dist-info/" % (name, version)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: %s\nVersion: %s\n\n"
                   % (name, version))
        z.writestr(info + "WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(info + "RECORD", "")
    return path


def timed(conn, path, rounds, headers=None, before=None):
    times = []
    for _ in range(rounds):
        if before:
            before()
        t = time.perf_counter()
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        r.read()
        times.append(time.perf_counter() - t)
        assert r.status == 200, (path, r.status)
    return statistics.median(times) * 1000


def patch(conn, path, body, headers):
    conn.request("PATCH", path, body=json.dumps(body),
                 headers=dict(headers, **{"Content-Type": "application/json"}))
    r = conn.getresponse()
    r.read()
    assert r.status == 200, (path, r.status)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--projects", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        with minidevpi.Server(os.path.join(tmp, "srv"), root_password="rootpw",
                              mirror_url="http://127.0.0.1:9/simple/") as srv:
            srv.create_user("alice", "secret")
            srv.create_index("alice/dev")
            m = srv.model
            ix = m.get_index("alice/dev")
            t = time.perf_counter()
            with m.store.write():
                for i in range(args.projects):
                    m.register("alice", ix, "proj-%d" % i, "1.0", {})
            print("filled %d projects in %.1f s" % (args.projects, time.perf_counter() - t))
            for v in ("1.0", "2.0"):
                srv.upload("alice/dev", wheel(tmp, "pkg", v))
            conn = http.client.HTTPConnection("127.0.0.1", srv.port)
            conn.request("GET", "/alice/dev/+simple/pkg/",
                         headers={"Accept": "application/vnd.pypi.simple.v1+json"})
            files = json.loads(conn.getresponse().read())["files"]
            file_path = "/alice/dev/" + files[0]["url"].split("/alice/dev/", 1)[-1].split("#")[0]
            if files[0]["url"].startswith("../"):
                file_path = "/alice/dev/+f/" + files[0]["url"].split("+f/", 1)[1].split("#")[0]
            n = [0]

            def change():  # a config change: every page is built again
                n[0] += 1
                patch(conn, "/alice/dev", ["title=t%d" % n[0]], AUTH)

            def yank():  # a release change: the project's pages are built again
                n[0] += 1
                patch(conn, "/alice/dev/pkg/1.0", {"yanked": n[0] % 2 == 0}, AUTH)

            rules = {
                "index": ["block=" + ",".join(["proj-%d<1.0" % i for i in range(500)]
                                              + ["proj-%d" % i for i in range(500, 999)]
                                              + ["*.exe"])],
                "root": {"block": ["other-%d==2.0" % i for i in range(500)],
                         "reserved_namespaces": ["corp%d=alice/dev" % i for i in range(200)]},
            }
            results = {}
            for mode in ("no rules", "rules"):
                if mode == "rules":
                    patch(conn, "/alice/dev", rules["index"], AUTH)
                    patch(conn, "/root", rules["root"], ROOT)
                simple = {"Accept": "application/vnd.pypi.simple.v1+json"}
                results[mode] = (
                    timed(conn, "/alice/dev/+simple/pkg/", args.rounds, simple),
                    timed(conn, "/alice/dev/+simple/pkg/", max(50, args.rounds // 20),
                          simple, before=yank),
                    timed(conn, "/alice/dev/+simple/pkg/", max(50, args.rounds // 20),
                          simple, before=change),
                    timed(conn, file_path, args.rounds),
                    timed(conn, "/alice/dev/+simple/", max(50, args.rounds // 10), simple),
                    timed(conn, "/alice/dev/+simple/", max(20, args.rounds // 50), simple,
                          before=change),
                )
            print("%-28s %12s %12s" % ("median, ms", "no rules", "rules"))
            for i, what in enumerate(("simple page (cached)", "page built, release changed",
                                      "page built, config changed",
                                      "file (+f/)", "project list, %d (cached)"
                                      % args.projects, "project list built, config changed")):
                print("%-28s %12.3f %12.3f" % (what, results["no rules"][i],
                                               results["rules"][i]))
            uploads = []
            for i in range(max(20, args.rounds // 20)):
                path = wheel(tmp, "fresh_%d" % i, "1.0")
                t = time.perf_counter()
                srv.upload("alice/dev", path)
                uploads.append(time.perf_counter() - t)
            audit = timed(conn, "/+audit?project=fresh-7", max(50, args.rounds // 20),
                          dict(ROOT, Accept="application/x-ndjson"))
            print("%-28s %12.3f   (audit record, first hash, Private check; through "
                  "Server.upload)" % ("upload of a wheel", statistics.median(uploads) * 1000))
            print("%-28s %12.3f   (%d records)" % ("/+audit?project=NAME", audit,
                                                 m.store.conn().execute(
                                                     "SELECT COUNT(*) FROM audit").fetchone()[0]))
        mirror_part(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def mirror_part(tmp, args):
    """A mirror keeping ``--projects`` files (offline): a page built, a cached page and a
    kept file, without and then with upstream changes noted for the projects asked."""
    with minidevpi.Server(os.path.join(tmp, "mirror"), root_password="rootpw",
                          offline=True) as srv:
        m = srv.model
        m.store.sync_each_blob = False
        ix = m.require_index("root/pypi")
        kept = []
        t = time.perf_counter()
        for i in range(args.projects):
            name = "proj%05d" % i
            fn = "%s-1.0-py3-none-any.whl" % name
            data = b"x" * 200 + name.encode()
            sha = hashlib.sha256(data).hexdigest()
            f, path = m.store.new_tmp()
            with f:
                f.write(data)
            m.add_file(None, ix, name, "1.0", fn, path, sha, len(data), {}, uploaded=1.7e9,
                       log_entry={"what": "mirror", "who": None,
                                  "when": [2024, 1, 1, 0, 0, 0]}, as_listed=True)
            kept.append((name, fn, sha))
        print("kept %d mirrored files in %.1f s" % (args.projects, time.perf_counter() - t))
        conn = http.client.HTTPConnection("127.0.0.1", srv.port)
        simple = {"Accept": "application/vnd.pypi.simple.v1+json"}
        results = {}
        asked = kept[::10]
        for mode in ("no changes", "changes noted"):
            if mode == "changes noted":
                with m.store.write() as c:
                    for name, fn, sha in asked:
                        c.execute("INSERT INTO upstream_changes VALUES (?,?,?,?,?,?)",
                                  (ix.id, name, fn, "replaced", time.time(), "0" * 64))
            half = asked[:len(asked) // 2] if mode == "no changes" else asked[len(asked) // 2:]
            pages = ["/root/pypi/+simple/%s/" % n for n, _f, _s in half]
            results[mode] = (
                timed_each(conn, pages, simple), timed_each(conn, pages, simple),
                timed_each(conn, ["/" + minidevpi.file_relpath("root/pypi", sha, fn)
                                  for _n, fn, sha in half], {}))
        print("%-28s %12s %12s" % ("mirror, median, ms", "no changes", "changes noted"))
        for i, what in enumerate(("simple page, first built", "simple page (cached)",
                                  "kept file (+f/)")):
            print("%-28s %12.3f %12.3f" % (what, results["no changes"][i],
                                           results["changes noted"][i]))


def timed_each(conn, paths, headers):
    """The median in ms of one GET of each path."""
    times = []
    for path in paths:
        t = time.perf_counter()
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        r.read()
        times.append(time.perf_counter() - t)
        assert r.status == 200, (path, r.status)
    return statistics.median(times) * 1000


if __name__ == "__main__":
    main()
