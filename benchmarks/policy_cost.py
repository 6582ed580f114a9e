#!/usr/bin/env python3
"""What the block and allow lists and the reserved namespaces cost (issue 25).

    python3 benchmarks/policy_cost.py [--projects 10000] [--rounds 2000]

Starts an in-process minidevpi on 127.0.0.1 in a temporary directory, fills alice/dev with
``--projects`` projects (registered in one transaction) and one project ``pkg`` with real
files, then measures over one kept-alive connection, without rules and with many rules
(1,000 block entries on alice/dev, 500 server-wide block entries, 200 reserved
namespaces, none of which matches ``pkg``): a cached simple page, a page built afresh
after a release of it changed and after a config change (which compiles the rules
again), a file, and the index's project list. Prints medians.
"""
import argparse
import base64
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
                "index": ["block=" + ",".join(["proj-%d<1.0" % i for i in range(999)]
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
                )
            print("%-28s %12s %12s" % ("median, ms", "no rules", "rules"))
            for i, what in enumerate(("simple page (cached)", "page built, release changed",
                                      "page built, config changed",
                                      "file (+f/)", "project list, %d (cached)"
                                      % args.projects)):
                print("%-28s %12.3f %12.3f" % (what, results["no rules"][i],
                                               results["rules"][i]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
