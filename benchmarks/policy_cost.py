#!/usr/bin/env python3
"""What the policies in the index data cost: pages and files of a large index with and without.

    python3 benchmarks/policy_cost.py [--projects 10000] [--rounds 6] [--minidevpi PATH]

Starts minidevpi (this checkout's, or PATH) on 127.0.0.1 in a temporary directory, uploads
N projects (one wheel each; every tenth project has a second version) over HTTP, then
measures in interleaved rounds, the policies OFF and ON (ON: every kind at once, sized
as a large site would have them, none of them matching the measured projects, so both
rounds serve the same bytes):

  - the index's block list: 100 entries (40 project names, 40 specifiers on existing
    projects that match no version, 20 file name patterns)
  - its allow list: 3 patterns that let every measured file through
  - root's server-wide block list: 50 names; root's reserved namespaces: 20 prefixes
  - the audit log: every upload of the fill recorded (present in both rounds)

For each round: a simple project page built for the first time (p50 over distinct
projects, each asked once: the policy is decided while the page is built), the same page
cached (p50 of repeated requests), a file download (p50 over distinct files: the file URL
decides its guards on every request), the JSON API of a version, and a web version page
built for the first time. Prints one table; "ratio" is ON ÷ OFF (1.00: no cost).
Standard library only; reuses benchmarks/bench.py's helpers.
"""

import argparse
import json
import os
import statistics
import sys
import time

import bench
from bench import USER, PASSWORD, INDEX, Client, basic_auth, say

ROOT_AUTH = {"Authorization": basic_auth("root", "pw"), "Content-Type": "application/json",
             "Accept": "application/json"}


def name_of(i):
    return "pc-%05d" % i


def fill(target, n):
    jobs = []
    for i in range(n):
        name = name_of(i)
        jobs.append((name, "1.0", (lambda name=name: bench.make_wheel(name, "1.0"))))
        if i % 10 == 0:
            jobs.append((name, "2.0", (lambda name=name: bench.make_wheel(name, "2.0"))))
    return bench.fill(target, jobs, workers=4)


def policies(n):
    """(index config changes, root's user changes) of the ON rounds."""
    block = (["evil-%02d" % k for k in range(40)]
             + ["%s>=9.%d" % (name_of(k * (n // 40)), k) for k in range(40)]
             + ["*-cp27-*", "*.exe", "*.msi", "*-win32.whl", "*.egg", "*.rpm", "*.dmg",
                "*-macosx_10_6_*", "*.tar.bz2", "*.zip", "*-cp26-*", "*-cp33-*", "*-cp34-*",
                "*-cp35-*", "*-pp27-*", "*-py2-*", "*.tar.xz", "*-linux_i686.whl",
                "*-win_amd64.whl", "*.deb"])
    allow = ["*.whl", "*.tar.gz", "pc-*"]
    root = {"block": ["bad-%02d" % k for k in range(50)],
            "reserved_namespaces": ["acme%02d=root/pypi" % k for k in range(20)]}
    return {"block": block, "allow": allow}, root


def patch(c, path, changes):
    """PATCH as devpi-client sends it: a list of key=value strings (lists comma-joined)."""
    body = json.dumps(["%s=%s" % (k, ",".join(v) if isinstance(v, list) else v)
                       for k, v in changes.items()])
    st, data, _ = c.request("PATCH", path, body, ROOT_AUTH)
    if st != 200:
        raise RuntimeError("PATCH %s answered %s: %s" % (path, st, data[:300]))


def set_policies(c, on, n):
    ix, root = policies(n)
    if on:
        patch(c, "/%s/%s" % (USER, INDEX), ix)
        patch(c, "/root", root)
    else:
        patch(c, "/%s/%s" % (USER, INDEX), {k: "" for k in ix})
        patch(c, "/root", {k: "" for k in root})


def p50_ms(c, paths, headers=None):
    times = []
    for p in paths:
        t0 = time.perf_counter()
        st, body, _ = c.request("GET", p, headers=headers)
        times.append(time.perf_counter() - t0)
        if st != 200:
            raise RuntimeError("GET %s answered %s: %s" % (p, st, body[:300]))
    return statistics.median(times) * 1000


def file_paths(c, projects):
    out = []
    for name in projects:
        page = "/%s/%s/+simple/%s/" % (USER, INDEX, name)
        st, body, _ = c.request("GET", page, headers={"Accept": bench.JSON_ACCEPT})
        url = bench.urljoin(page, json.loads(body)["files"][0]["url"])
        out.append(bench.urlsplit(url).path)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--projects", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=6,
                    help="OFF/ON pairs, alternating which goes first (default 6)")
    ap.add_argument("--sample", type=int, default=300,
                    help="distinct projects asked per measurement (default 300)")
    ap.add_argument("--minidevpi", metavar="PATH", help="another minidevpi.py to measure")
    args = ap.parse_args(argv)
    if args.minidevpi:
        bench.MINIDEVPI = os.path.abspath(args.minidevpi)
    n, k = args.projects, args.sample
    if n < k * 2 * args.rounds * 2:
        ap.error("--projects must be at least 4 x --sample x --rounds")
    t = bench.Minidevpi(sys.executable)
    try:
        t.start()
        t.setup()
        say("filling %d projects ..." % n)
        say("  %.0f s" % fill(t, n))
        c = Client(t.port)
        rows = {}
        # each round takes fresh projects for the first-built pages, never one built before
        fresh = iter(range(0, n, 2))
        for rnd in range(args.rounds):
            for on in ((False, True) if rnd % 2 == 0 else (True, False)):
                set_policies(c, on, n)
                first = [name_of(next(fresh)) for _ in range(k)]
                web = [name_of(next(fresh)) for _ in range(k)]
                r = rows.setdefault(on, {})
                r.setdefault("simple page, first built", []).append(p50_ms(
                    c, ["/%s/%s/+simple/%s/" % (USER, INDEX, p) for p in first]))
                r.setdefault("simple page, cached", []).append(p50_ms(
                    c, ["/%s/%s/+simple/%s/" % (USER, INDEX, first[0])] * k))
                files = file_paths(c, first)
                r.setdefault("file download", []).append(p50_ms(c, files))
                r.setdefault("JSON API of a version", []).append(p50_ms(
                    c, ["/%s/%s/%s/1.0" % (USER, INDEX, p) for p in first],
                    {"Accept": "application/json"}))
                r.setdefault("web version page, first built", []).append(p50_ms(
                    c, ["/%s/%s/%s/1.0" % (USER, INDEX, p) for p in web],
                    {"Accept": "text/html"}))
                say("round %d, policies %s: %s" % (rnd + 1, "ON" if on else "OFF", ", ".join(
                    "%.2f" % v[-1] for v in r.values())))
        st, body, _ = c.request("GET", "/+audit?limit=1", headers=ROOT_AUTH)
        audit = "the audit log answers %s" % st
        c.close()
        t.stop()
    finally:
        bench.cleanup()
    print()
    print("policy cost on a %d-project index (%d CPUs, Python %s), p50 of %d requests "
          "each, median of %d rounds; %s" % (n, os.cpu_count(), sys.version.split()[0], k,
                                            args.rounds, audit))
    print("| request | policies off | policies on | ratio |")
    print("|---|---|---|---|")
    for what in rows[False]:
        off, on = statistics.median(rows[False][what]), statistics.median(rows[True][what])
        print("| %s | %.2f ms | %.2f ms | %.2f |" % (what, off, on, on / off))
    return 0


if __name__ == "__main__":
    sys.exit(main())
