#!/usr/bin/env python3
"""minidevpi: a private Python package index in one file.

Copy this file onto any machine with CPython 3.9 or newer and run::

    python3 minidevpi.py serve            # initialises ~/.minidevpi on first run, listens on :3141

It speaks devpi-server's HTTP API, so the real ``devpi`` client, pip, uv, twine and the
other publishers work against it unchanged: users and logins, indexes with bases
(inheritance), volatile, acl_upload and mirror whitelists, upload, install, list, remove,
push, yank, and the simple API as installers expect it (PEP 503, 691, 658/714, 592, 700).

Embed it in a test suite::

    with minidevpi.Server() as srv:
        srv.create_user("alice", "secret")
        srv.create_index("alice/dev")
        srv.upload("alice/dev", "dist/pkg-1.0-py3-none-any.whl")
        pip_index_url = srv.index_url("alice/dev")

The file reads top to bottom in sections; each builds only on those above it:

    1  header        imports, constants
    2  errors        MinidevpiError (a message for the user); HTTPError (with a status)
    3  names         PEP 503 names, PEP 440 versions, filenames, bounded archive reading
                     (core metadata), multipart and chunked request bodies
    3b descriptions  Markdown, reStructuredText and plain text to allow-listed, sanitized HTML
    4  storage       SQLite schema, connections, transactions, content-addressed blobs,
                     the lock that makes one process the server of a directory
    5  model         accounts (passwords, tokens, login throttling), index configuration,
                     policies (block and allow lists, reserved namespaces), the one walk
                     through bases, releases, files, push, change listeners, the audit
                     log (every change recorded in its own transaction)
    6  mirror        the upstream HTTP client and its address policy, then upstream pages
                     and files on demand, kept for offline use
    7  HTTP          simple pages from data, route table, negotiation, page cache (and
                     files for listings too large for it), request bodies and deadlines,
                     handler, threading server
    7b web pages     (within 7, before its route table) HTML for browsers at the API's
                     URLs, search, status, the stylesheet
    8  export/import devpi-server's dump format, both ways (dumps are untrusted input)
    9  embedding     Server: start on a free port in a thread, stop, test helpers
   10  command line  init, serve, export, import, passwd, audit; main()
"""

# ===================================================================================
# 1. header
# ===================================================================================

import argparse
import base64
import binascii
import bisect
import codecs
import collections
import contextlib
import email.parser
import email.utils
import fnmatch
import functools
import getpass
import gzip
import hashlib
import heapq
import hmac
import html
import html.parser
import io
import itertools
import json
import math
import mimetypes
import os
import posixpath
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import zipfile

try:
    import fcntl
except ImportError:  # not on Windows: msvcrt's lock instead
    fcntl = None
    import msvcrt
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__version__ = "0.1.0"

DEFAULT_PORT = 3141
DEFAULT_HOST = "127.0.0.1"
TOKEN_LIFETIME = 36000  # seconds, as devpi-server's login tokens
SESSION_LIFETIME = TOKEN_LIFETIME  # seconds a browser's login lasts (App.web_login)
SESSION_COOKIE = "minidevpi-session"  # a browser's login; "__Host-" before it over https
LOGIN_COOKIE = "minidevpi-login"  # the log-in form's CSRF nonce, likewise
LOGIN_FORM_LIFETIME = 3600  # seconds a log-in form stays good
DEFAULT_MAX_BODY = 2 * 1024 ** 3  # bytes an upload body may have; real wheels pass 1 GB
# tox results kept per release file: the newest; an older one goes (no longer served) when
# a new one comes. Anyone may post them by default (acl_toxresult_upload), 1 MiB each.
TOXRESULTS_KEPT = 10
DEVPI_API_VERSION = "2"
DEVPI_SERVER_VERSION = "6.20.3"  # the devpi-server whose API this one speaks
COPY_CHUNK = 1024 * 1024  # bytes read at a time where files are hashed or copied
SCHEMA_VERSION = 4
DB_NAME = "minidevpi.sqlite3"
# the thread switch interval (seconds) of a serving process while a write waits or runs
# (Store._write_turns); the interpreter's default, 5 ms, the rest of the time
WRITE_SWITCH_INTERVAL = 0.0005
SECRET_NAME = "secret"
LOCK_NAME = ".lock"  # held (flock) by the one process that serves a server directory
FILES_DIR = "+files"
TMP_DIR = "+tmp"
JSON_TYPE = "application/json"
AUDIT_TYPE = "application/x-ndjson"  # JSON lines: GET /+audit
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"
SIMPLE_HTML = "application/vnd.pypi.simple.v1+html"
HTML_TYPE = "text/html; charset=utf-8"
# A request whose User-Agent names one of these tools comes from an installer: as in
# devpi-server, /USER/INDEX and /USER/INDEX/PROJECT then answer with the simple page.
INSTALLER_UA = re.compile(r"^([^ ]* )*(distribute|setuptools|pip|pex|uv)/")


def utcnow_iso(ts=None):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def log(msg):
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def plural(n, thing, things=None):
    """``n`` things as a person writes it: '1 index', '2 indexes', '0 files' (``things``:
    the plural, where adding 's' is not it)."""
    return "%d %s" % (n, thing if n == 1 else things or thing + "s")


# ===================================================================================
# 2. errors
# ===================================================================================


class MinidevpiError(Exception):
    """Something to tell the user, not a bug: the storage, export and import raise it,
    and the command line prints its message (no traceback)."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class HTTPError(MinidevpiError):
    """A client-visible failure of a request: an HTTP status and a message for the user.

    ``challenge``: a 401 that asks the client for credentials (pip then tries its keyring
    and netrc); ``retry_after``: seconds until trying again makes sense. ``headers``: more
    response headers, set by the HTTP layer itself (Location).
    """

    def __init__(self, status, message, headers=None, challenge=False, retry_after=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.challenge = challenge
        self.retry_after = retry_after


def bad_request(message):
    return HTTPError(400, message)


def not_found(message):
    return HTTPError(404, message)


def forbidden(message):
    return HTTPError(403, message)


def unauthorized():
    """401 for an anonymous request that needs a user: clients then send credentials."""
    return HTTPError(401, "Unauthorized", challenge=True)


# ===================================================================================
# 3. names, versions, files
# ===================================================================================

_NORMALIZE_RE = re.compile(r"[-_.]+")
USER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
INDEX_NAME_RE = USER_NAME_RE
PROJECT_NAME_RE = re.compile(r"^([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9])$")


def normalize_name(name):
    """PEP 503 normalised project name."""
    return _NORMALIZE_RE.sub("-", name).lower()


def check_user_name(name):
    if not name or len(name) > 100 or not USER_NAME_RE.fullmatch(name):
        raise bad_request(
            "username %r contains characters that aren't allowed. "
            "Any ascii symbol besides -.@_ is blocked." % name)


def check_index_name(name):
    if not name or len(name) > 100 or not INDEX_NAME_RE.fullmatch(name):
        raise bad_request(
            "indexname %r contains characters that aren't allowed. "
            "Any ascii symbol besides -.@_ is blocked." % name)


def check_project_name(name):
    if not name or len(name) > 200 or not PROJECT_NAME_RE.fullmatch(name):
        raise bad_request("invalid project name %r" % (name,))


# A version names a folder in an export (devpi's layout), so it must never read as a path.
# devpi takes versions that are not PEP 440 (1.0-r1, 2013b, 1.0+local.7 pass here too):
# letters, digits and . _ + ! -, starting with a letter or digit.
VERSION_CHARS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+!-]*")


def check_version(version):
    if not isinstance(version, str) or not version or len(version) > 200 \
            or not VERSION_CHARS_RE.fullmatch(version):
        raise bad_request(
            "invalid version %r: a version is letters, digits and . _ + ! - (at most 200), "
            "starting with a letter or digit" % (version,))


_VERSION_RE = re.compile(
    r"""^\s*v?
    (?:(?P<epoch>[0-9]+)!)?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?:[-_.]?(?P<pre_l>a|b|c|rc|alpha|beta|pre|preview)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?:(?:-(?P<post_n1>[0-9]+))|(?:[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?))?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*$""", re.VERBOSE | re.IGNORECASE)

_INF = float("inf")
_PRE_ALIASES = {"alpha": "a", "beta": "b", "c": "rc", "pre": "rc", "preview": "rc"}  # PEP 440


def is_prerelease(version):
    """Whether a version is a pre-release or development release (PEP 440); an
    unparseable one counts as one."""
    m = _VERSION_RE.match(version)
    return not m or bool(m.group("pre_l") or m.group("dev_l"))


def version_key(version):
    """A sort key ordering versions by PEP 440; unparseable ones sort first, by text."""
    m = _VERSION_RE.match(version)
    if not m:
        return (-1, (), version)
    release = tuple(int(x) for x in m.group("release").split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    pre_l = (m.group("pre_l") or "").lower()
    pre_l = _PRE_ALIASES.get(pre_l, pre_l)
    post = m.group("post_n1") or m.group("post_n2")
    if post is None and m.group("post_l"):
        post = "0"
    dev = m.group("dev_n") or ("0" if m.group("dev_l") else None)
    if pre_l:
        pre = (pre_l, int(m.group("pre_n") or 0))
    elif dev is not None and post is None:
        pre = ("", -1)  # 1.0.dev0 sorts before 1.0a0
    else:
        pre = ("z", 0)
    post_k = (-1,) if post is None else (int(post),)
    dev_k = (_INF,) if dev is None else (int(dev),)
    local = m.group("local")
    local_k = () if not local else tuple(
        (1, int(p), "") if p.isdigit() else (0, 0, p) for p in re.split(r"[-_.]", local.lower()))
    return (int(m.group("epoch") or 0), release, pre, post_k, dev_k, local_k)


def normalize_version(version):
    """Canonical spelling of a PEP 440 version (for comparing names in filenames)."""
    m = _VERSION_RE.match(version)
    if not m:
        return version.strip().lower()
    out = ""
    if m.group("epoch") and int(m.group("epoch")):
        out += "%d!" % int(m.group("epoch"))
    out += ".".join(str(int(x)) for x in m.group("release").split("."))
    pre_l = (m.group("pre_l") or "").lower()
    if pre_l:
        pre_l = _PRE_ALIASES.get(pre_l, pre_l)
        out += "%s%d" % (pre_l, int(m.group("pre_n") or 0))
    post = m.group("post_n1") or m.group("post_n2")
    if post is not None or m.group("post_l"):
        out += ".post%d" % int(post or 0)
    if m.group("dev_l"):
        out += ".dev%d" % int(m.group("dev_n") or 0)
    if m.group("local"):
        out += "+" + re.sub(r"[-_]", ".", m.group("local").lower())
    return out


# PEP 440 version specifiers (``>=1,<2``, ``==2.2.*``, ``~=1.4``), as the block and allow
# lists of an index take them: matched on version_key, the one ordering of versions.
_SPECIFIER_RE = re.compile(r"^\s*(===|==|!=|~=|<=|>=|<|>)\s*([A-Za-z0-9][^\s,;]*)\s*$")


def parse_specifiers(text):
    """[(operator, version)] of a PEP 440 specifier set such as ``>=1,<2``; ValueError
    naming the piece that is not one."""
    out = []
    for piece in text.split(","):
        m = _SPECIFIER_RE.match(piece)
        if not m:
            raise ValueError("%r is not a version specifier (==, !=, <, <=, >, >=, ~=, ===)"
                             % piece.strip())
        op, v = m.groups()
        if op != "===":
            wildcard = v.endswith(".*")
            base = _VERSION_RE.match(v[:-2] if wildcard else v)
            if base is None:
                raise ValueError("%r is not a PEP 440 version" % v)
            if wildcard and (op not in ("==", "!=") or any(base.group(g) for g in (
                    "pre_l", "post_l", "post_n1", "dev_l", "local"))):
                raise ValueError("%s%s: a .* wildcard goes with == or != after release "
                                 "numbers only" % (op, v))
            if base.group("local") and op not in ("==", "!="):
                raise ValueError("%s%s: a local version goes with == or != only" % (op, v))
            if op == "~=" and "." not in base.group("release"):
                raise ValueError("~=%s needs at least two release numbers" % v)
        out.append((op, v))
    return out


def _release_prefix_matches(m, prefix):
    """Whether the parsed version ``m`` has the epoch and leading release numbers of the
    version text ``prefix`` (``==1.2.*``; missing numbers count as 0)."""
    pm = _VERSION_RE.match(prefix)
    want = [int(x) for x in pm.group("release").split(".")]
    have = [int(x) for x in m.group("release").split(".")]
    have += [0] * (len(want) - len(have))
    return (int(m.group("epoch") or 0) == int(pm.group("epoch") or 0)
            and have[:len(want)] == want)


def version_matches(version, specifiers):
    """Whether ``version`` is in the specifier set (parse_specifiers' [(op, version)])
    as PEP 440 says: ``<V`` leaves out V's pre-releases, ``>V`` its post-releases and local
    versions (unless V is one), ``==V``/``!=V`` without a local label ignore the
    candidate's. A version that is not PEP 440 matches ``===`` only."""
    m = _VERSION_RE.match(version)
    public = version.split("+", 1)[0]
    for op, spec in specifiers:
        if op == "===":
            hit = version.strip().lower() == spec.strip().lower()
        elif m is None:
            hit = False
        elif spec.endswith(".*"):
            hit = _release_prefix_matches(m, spec[:-2]) == (op == "==")
        elif op in ("==", "!="):
            same = version_key(version if "+" in spec else public) == version_key(spec)
            hit = same == (op == "==")
        else:
            key, skey = version_key(public), version_key(spec)
            same_release = key[:2] == skey[:2]  # (epoch, release numbers)
            if op == "<=":
                hit = key <= skey
            elif op == ">=":
                hit = key >= skey
            elif op == "<":
                hit = key < skey and not (same_release and is_prerelease(version)
                                          and not is_prerelease(spec))
            elif op == ">":
                hit = key > skey and not (same_release and key[3] != (-1,)
                                          and skey[3] == (-1,))  # (key[3]: the post number)
            else:  # ~=: >= V and == V without its last release number .*
                sm = _VERSION_RE.match(spec)
                prefix = ((sm.group("epoch") + "!") if sm.group("epoch") else "") + \
                    ".".join(sm.group("release").split(".")[:-1])
                hit = key >= skey and _release_prefix_matches(m, prefix)
        if not hit:
            return False
    return True


SDIST_EXTS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".tar")
OTHER_EXTS = (".egg", ".exe", ".msi", ".rpm", ".dmg")


_PLATFORM = (r"(?:win32|win-amd64|win-arm64|win-arm32|linux-[a-z0-9_]+|macosx-[0-9._]+-[a-z0-9_]+"
             r"|cygwin-[0-9a-z._]+-[a-z0-9_]+|freebsd-[0-9a-z._]+-[a-z0-9_]+)")
_DUMB_SUFFIX_RE = re.compile(r"\.%s$" % _PLATFORM)
_RPM_SUFFIX_RE = re.compile(r"-[0-9][a-z0-9_]*\.[a-z0-9_]+$")  # -release.arch
_BINARY_SUFFIX_RE = re.compile(  # egg, exe, msi: -pyX.Y and/or a platform
    r"(?:(?:[.-]%s)?-py\d+(?:\.\d+)?(?:-%s)?|[.-]%s)$" % (_PLATFORM, _PLATFORM, _PLATFORM))


_FILENAME_CONTROL_RE = re.compile("[\x00-\x1f]")


def check_filename(filename):
    """Refuse file names that could escape a directory or confuse a URL."""
    if (not filename or len(filename) > 255 or "/" in filename or "\\" in filename
            or filename in (".", "..") or filename.startswith(".")
            or _FILENAME_CONTROL_RE.search(filename)):
        raise bad_request("invalid filename %r" % (filename,))


def file_relpath(index_path, sha256, filename):
    """A stored file's path below the server root, devpi's layout:
    user/index/+f/<3 hex>/<13 hex>/name, from the file's sha256 (or its first 16 digits)."""
    return "%s/+f/%s/%s/%s" % (index_path, sha256[:3], sha256[3:16], filename)


def split_filename(filename, version_hint=None):
    """(project part, version, kind) of a distribution filename, or None.

    kind is 'wheel', 'sdist', 'doczip' or 'other'. Old sdists may have dashes in the name,
    so the version the uploader states (version_hint) is used to split when it fits.
    """
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        if len(parts) not in (5, 6):
            return None
        return parts[0], parts[1], "wheel"
    if filename.endswith(".doc.zip"):
        stem = filename[:-8]
        kind = "doczip"
    else:
        for ext in SDIST_EXTS + OTHER_EXTS:
            if filename.endswith(ext):
                stem = filename[:-len(ext)]
                kind = "sdist" if ext in SDIST_EXTS else "other"
                break
        else:
            return None
        if kind == "other":
            # eggs, installers, rpms: name-version then -pyX.Y, a platform, an rpm release
            stem = (_RPM_SUFFIX_RE if ext == ".rpm" else _BINARY_SUFFIX_RE).sub("", stem)
        elif _DUMB_SUFFIX_RE.search(stem):
            # bdist_dumb: an archive name-version.platform.tar.gz, not an sdist
            stem = _DUMB_SUFFIX_RE.sub("", stem)
            kind = "other"
    if version_hint and stem.endswith("-" + version_hint):
        return stem[:-len(version_hint) - 1], version_hint, kind
    if version_hint:
        # tolerate a differently spelled but equal version (1.0.0 vs 1.0)
        name, _, ver = stem.rpartition("-")
        if name and normalize_version(ver) == normalize_version(version_hint):
            return name, ver, kind
        return None
    name, _, ver = stem.rpartition("-")
    if not name or not ver:
        return None
    return name, ver, kind


def filename_version(filename):
    """The version in a distribution's file name ('' when the name has none)."""
    split = split_filename(filename)
    return split[1] if split else ""


def copy_hashed(fin, fout, *hashes):
    """Read ``fin`` to its end, feeding every hash and writing to ``fout`` (if not None);
    returns the number of bytes."""
    size = 0
    for chunk in iter(lambda: fin.read(COPY_CHUNK), b""):
        for h in hashes:
            h.update(chunk)
        if fout is not None:
            fout.write(chunk)
        size += len(chunk)
    return size


# Core metadata fields, as devpi keeps them per version (lists are multiple-use fields).
METADATA_LIST_FIELDS = (
    "classifiers", "platform", "supported_platform", "provides", "requires", "obsoletes",
    "project_urls", "provides_dist", "obsoletes_dist", "requires_dist", "requires_external",
    "provides_extras", "dynamic", "license_file")
METADATA_STR_FIELDS = (
    "metadata_version", "summary", "home_page", "author", "author_email", "maintainer",
    "maintainer_email", "license", "description", "keywords", "download_url", "comment",
    "requires_python", "description_content_type", "license_expression")
# upload-form spellings that differ from devpi's keys
FORM_ALIASES = {"classifier": "classifiers", "provides_extra": "provides_extras",
                "project_url": "project_urls", "license_files": "license_file",
                "platforms": "platform", "supported_platforms": "supported_platform"}
# core-metadata header (lower case, dashes to underscores) to devpi key
HEADER_ALIASES = {"classifier": "classifiers", "provides_extra": "provides_extras",
                  "project_url": "project_urls", "supported_platform": "supported_platform",
                  "license_file": "license_file", "platform": "platform"}


def metadata_from_form(fields):
    """devpi's version metadata from upload form fields (a list of (name, value))."""
    meta = {}
    for key, value in fields:
        key = FORM_ALIASES.get(key, key)
        if key in METADATA_LIST_FIELDS:
            if value != "":
                meta.setdefault(key, []).append(value)
        elif key in METADATA_STR_FIELDS:
            meta[key] = value
    return meta


def metadata_from_pkginfo(data):
    """devpi's version metadata from the bytes of a METADATA / PKG-INFO file."""
    msg = email.parser.BytesParser().parsebytes(data)
    meta = {}
    for header, value in msg.items():
        key = header.lower().replace("-", "_")
        key = HEADER_ALIASES.get(key, key)
        value = str(value)
        if key in METADATA_LIST_FIELDS:
            meta.setdefault(key, []).append(value)
        elif key in METADATA_STR_FIELDS or key in ("name", "version"):
            meta[key] = value
    body = msg.get_payload()
    if isinstance(body, str) and body.strip() and not meta.get("description"):
        meta["description"] = body
    return meta


def full_metadata(name, version, meta):
    """Every key devpi shows for a version: strings default to '', lists to []."""
    out = {"name": name, "version": version}
    for key in METADATA_STR_FIELDS:
        out[key] = meta.get(key, "")
    for key in METADATA_LIST_FIELDS:
        out[key] = list(meta.get(key, []))
    return out


MAX_METADATA_BYTES = 16 * 1024 * 1024
# How far an uploaded archive is looked into for its metadata (PKG-INFO / METADATA): at
# most this many members (headers, for a tar), and for a tar at most this many bytes
# decompressed on the way (its members are read in order, so a bomb is never unpacked
# whole). Memory stays small whatever the archive: members are looked at one at a time,
# and only the one metadata member (at most MAX_METADATA_BYTES) is ever held.
MAX_ARCHIVE_MEMBERS = 200000
MAX_TAR_SCAN_BYTES = 512 * 1024 * 1024


class ArchiveTooLarge(ValueError):
    """An archive past MAX_ARCHIVE_MEMBERS or MAX_TAR_SCAN_BYTES: not looked into further."""


def zip_entries(f):
    """The central directory of the zip file ``f`` (open, binary), one entry at a time:
    (name, flags, method, crc, compressed size, size, local header offset, external
    attributes: a Unix mode in the high 16 bits). Nothing is kept between entries.
    Raises zipfile.BadZipFile for a broken zip, ArchiveTooLarge past MAX_ARCHIVE_MEMBERS
    entries."""
    import struct
    f.seek(0, 2)
    end = f.tell()
    tail_len = min(end, 22 + 65535)
    f.seek(end - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or tail_len - pos < 22:
        raise zipfile.BadZipFile("no end of central directory")
    count, cd_size, cd_offset = struct.unpack("<10xHII2x", tail[pos:pos + 22])
    records = end - tail_len + pos  # where the end records start
    if records >= 76:
        f.seek(records - 20)
        locator = f.read(20)
        if locator[:4] == b"PK\x06\x07":  # zip64: the real numbers are in its own record
            f.seek(records - 76)
            rec = f.read(56)
            if len(rec) != 56 or rec[:4] != b"PK\x06\x06":
                raise zipfile.BadZipFile("broken zip64 end of central directory")
            count, cd_size, cd_offset = struct.unpack("<32xQQQ", rec)
            records -= 76
    concat = records - cd_size - cd_offset  # bytes in front of the zip (as zipfile allows)
    if concat < 0:
        raise zipfile.BadZipFile("central directory out of place")
    if count > MAX_ARCHIVE_MEMBERS:
        raise ArchiveTooLarge("more than %d members" % MAX_ARCHIVE_MEMBERS)
    f.seek(cd_offset + concat)
    for _ in range(count):
        head = f.read(46)
        if len(head) != 46 or head[:4] != b"PK\x01\x02":
            raise zipfile.BadZipFile("broken central directory")
        (flags, method, crc, csize, size, nlen, elen, clen, attrs,
         offset) = struct.unpack("<8xHH4xIIIHHH4xII", head)
        name = f.read(nlen).decode("utf-8" if flags & 0x800 else "cp437", "replace")
        extra = f.read(elen)
        f.seek(clen, 1)
        if 0xFFFFFFFF in (size, csize, offset):  # zip64 extra field: the large ones, in order
            i = 0
            while i + 4 <= len(extra):
                xid, xlen = struct.unpack("<HH", extra[i:i + 4])
                if xid == 1:
                    raw = extra[i + 4:i + 4 + xlen]
                    vals = list(struct.unpack("<%dQ" % (len(raw) // 8), raw[:len(raw) // 8 * 8]))
                    if size == 0xFFFFFFFF and vals:
                        size = vals.pop(0)
                    if csize == 0xFFFFFFFF and vals:
                        csize = vals.pop(0)
                    if offset == 0xFFFFFFFF and vals:
                        offset = vals.pop(0)
                    break
                i += 4 + xlen
        yield name, flags, method, crc, csize, size, offset + concat, attrs


def _zip_member_start(f, entry, limit):
    """Check one zip member (an entry of zip_entries) and seek ``f`` to its data:
    ArchiveTooLarge when it is larger than ``limit``, zipfile.BadZipFile unless stored or
    deflated (what wheels and sdists use), unencrypted, with a local header."""
    import struct
    name, flags, method, crc, csize, size, offset = entry[:7]
    if size > limit:
        raise ArchiveTooLarge("%s is larger than %d bytes" % (name, limit))
    if flags & 1:
        raise zipfile.BadZipFile("%s is encrypted" % name)
    if method not in (0, 8):
        raise zipfile.BadZipFile("%s uses compression method %d (stored and deflated are "
                                 "read)" % (name, method))
    f.seek(offset)
    head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile("broken local header of %s" % name)
    nlen, elen = struct.unpack("<26xHH", head)
    f.seek(nlen + elen, 1)


def zip_member_chunks(f, entry, limit, chunk=COPY_CHUNK):
    """The bytes of one zip member (an entry of zip_entries) in pieces of at most
    ``chunk`` bytes, as they are inflated: never more than the stated size, and the size
    and CRC checked before the last piece (zipfile.BadZipFile then). Two pieces are held.
    The checks of _zip_member_start come first."""
    import zlib
    name, _flags, method, crc, csize, size = entry[:6]
    _zip_member_start(f, entry, limit)
    inflate = zlib.decompressobj(-15) if method == 8 else None
    got, left, pending, running = 0, csize, b"", 0
    held = b""  # the last piece goes once the CRC is checked: a bad member is never whole
    while True:
        if not pending and left > 0:
            pending = f.read(min(left, 64 * 1024))
            if not pending:
                raise zipfile.BadZipFile("%s is cut short" % name)
            left -= len(pending)
        if inflate is None:
            piece, pending = pending[:chunk], pending[chunk:]
        else:
            piece = inflate.decompress(pending, min(chunk, size - got + 1))
            pending = inflate.unconsumed_tail
        if not piece and not pending and left <= 0:
            break
        got += len(piece)
        if got > size:
            raise zipfile.BadZipFile("%s is larger than its stated size" % name)
        running = zlib.crc32(piece, running)
        if piece:
            if held:
                yield held
            held = piece
    if got != size or running != crc:
        raise zipfile.BadZipFile("%s: CRC or size mismatch" % name)
    if held:
        yield held


def _zip_member(f, entry, limit):
    """The bytes of one zip member (an entry of zip_entries), or ArchiveTooLarge when it
    is larger than ``limit``. Stored and deflated members (what wheels and sdists use) are
    read; never more than the stated size is inflated, and the CRC is checked."""
    return b"".join(zip_member_chunks(f, entry, limit))


# PEP 770: the SBOMs of a wheel are the files below its ``.dist-info/sboms/``. At most
# SBOMS_LISTED of one wheel are listed (names up to SBOM_NAME_MAX characters), each served
# up to SBOM_MAX_BYTES, inflated as it is sent (as a documentation page is).
SBOMS_LISTED = 100
SBOM_NAME_MAX = 200
SBOM_MAX_BYTES = 64 * 1024 * 1024


def wheel_sboms(f):
    """PEP 770: {name: zip entry} of the SBOM files of the wheel open as ``f`` (binary):
    the members below a top-level ``*.dist-info/sboms/``, named relative to it
    (subdirectories kept). Directories, symlinks, names with an empty, ``.`` or ``..``
    segment or a backslash, and those past SBOM_NAME_MAX are left out; the first
    SBOMS_LISTED in the zip's order are kept. Raises as zip_entries does."""
    found = {}
    for entry in zip_entries(f):
        top, sep, rest = entry[0].partition("/")
        if not (sep and top.endswith(".dist-info") and rest.startswith("sboms/")):
            continue
        name = rest[len("sboms/"):]
        if (not name or len(name) > SBOM_NAME_MAX or "\\" in name
                or any(s in ("", ".", "..") for s in name.split("/"))
                or (entry[7] >> 16) & 0o170000 == 0o120000):
            continue
        found[name] = entry
        if len(found) >= SBOMS_LISTED:
            break
    return found


# A documentation zip is an untrusted archive served member by member: it may hold at
# most this many members and this many bytes unpacked (the sum of the members' stated
# sizes; a member is never inflated past its stated size), and a member at most
# MAX_DOC_MEMBER_BYTES (a member is served as it is inflated, a piece at a time).
MAX_DOC_MEMBERS = 50000
# Serving a doc member: it is inflated DOC_PIECE bytes at a time while sent, at most
# DOC_INFLATE_SLOTS pieces at once in the process (a request waits up to DOC_SLOT_WAIT
# seconds for a slot, then gets 503 with Retry-After); the member lists of the zips last
# read are kept, DOC_CACHE_MEMBERS entries in all.
DOC_PIECE = 256 * 1024
DOC_INFLATE_SLOTS = 4
DOC_SLOT_WAIT = 10
DOC_CACHE_MEMBERS = 200000
MAX_DOC_BYTES = 1024 * 1024 * 1024
MAX_DOC_MEMBER_BYTES = 128 * 1024 * 1024
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def doc_zip_members(f):
    """{member name: zip entry} of the documentation zip ``f`` (open, binary), directories
    left out. Raises ValueError naming the problem for a member outside the zip's root
    (absolute, a drive, a ``..`` segment), a symlink, an encrypted member or one not stored
    or deflated, past the MAX_DOC_* bounds;
    zipfile.BadZipFile for a broken zip. An empty file is documentation without pages
    (devpi-client uploads one, and devpi-server keeps it)."""
    members = {}
    total = 0
    count = 0
    f.seek(0, io.SEEK_END)
    if f.tell() == 0:
        return members
    f.seek(0)
    for entry in zip_entries(f):
        name, flags, method, _crc, _csize, size, _offset, attrs = entry
        count += 1
        if count > MAX_DOC_MEMBERS:
            raise ValueError("more than %d members" % MAX_DOC_MEMBERS)
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or _DRIVE_RE.match(name) or ".." in parts \
                or "\0" in name:
            raise ValueError("a member outside its root: %r" % name[:200])
        if stat.S_ISLNK(attrs >> 16):
            raise ValueError("a symlink: %r" % name[:200])
        if name.endswith("/"):
            continue
        if flags & 1:
            raise ValueError("an encrypted member: %r" % name[:200])
        if method not in (0, 8):
            raise ValueError("member %r uses compression method %d (stored and deflated "
                             "are served)" % (name[:200], method))
        if size > MAX_DOC_MEMBER_BYTES:
            raise ValueError("member %r larger than %d bytes" % (name[:200],
                                                                  MAX_DOC_MEMBER_BYTES))
        total += size
        if total > MAX_DOC_BYTES:
            raise ValueError("more than %d bytes unpacked" % MAX_DOC_BYTES)
        members[name] = entry
    return members


def _tar_number(field):
    if field[:1] in (b"\x80", b"\xff"):  # base-256 (GNU), for sizes past 8 GiB
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _tar_open(raw):
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic[:3] == b"BZh":
        import bz2
        return bz2.BZ2File(raw)
    if magic == b"\xfd7zXZ\x00":
        import lzma
        return lzma.LZMAFile(raw)
    return raw


def _tar_pkg_info(path):
    """The first ``<dir>/PKG-INFO`` of a (compressed) tar, read as a stream: None when it
    is not there, larger than MAX_METADATA_BYTES, or past the scan limits."""
    with open(path, "rb") as raw:
        f = _tar_open(raw)
        budget = MAX_TAR_SCAN_BYTES

        def read(n):
            nonlocal budget
            if n > budget:
                raise ArchiveTooLarge("more than %d bytes to read" % MAX_TAR_SCAN_BYTES)
            data = f.read(n)
            if len(data) != n:
                raise EOFError("tar cut short")
            budget -= n
            return data

        long_name = pax = None
        for _ in range(MAX_ARCHIVE_MEMBERS):
            head = read(512)
            if head == bytes(512):
                return None
            want = _tar_number(head[148:156])
            unsigned = 256 + sum(head[:148]) + sum(head[156:])
            if want != unsigned and want != unsigned - 512 * sum(
                    1 for b in head[:148] + head[156:] if b >= 128):
                return None  # not a tar header: garbage
            kind = head[156:157]
            size = _tar_number(head[124:136])
            if pax and "size" in pax and kind not in (b"x", b"g", b"L", b"K"):
                size = int(pax["size"])
            if size < 0:
                return None
            padded = -(-size // 512) * 512
            if kind in (b"x", b"g", b"L", b"K"):  # pax and GNU long-name headers
                if size > 1024 * 1024:
                    return None
                data = read(padded)[:size]
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                elif kind == b"x":
                    pax = _pax_records(data)
                continue
            name = head[:100].split(b"\0", 1)[0]
            prefix = head[345:500].split(b"\0", 1)[0]
            if prefix and kind != b"S":
                name = prefix + b"/" + name
            if long_name is not None:
                name = long_name
            if pax and "path" in pax:
                name = pax["path"].encode("utf-8", "surrogateescape")
            long_name = pax = None
            regular = kind in (b"0", b"\0", b"7")
            if regular and name.count(b"/") == 1 and name.endswith(b"/PKG-INFO"):
                return read(size) if size <= MAX_METADATA_BYTES else None
            if regular or kind not in (b"1", b"2", b"3", b"4", b"5", b"6"):
                while padded:  # skip the member's data
                    n = min(padded, 1024 * 1024)
                    read(n)
                    padded -= n
        return None


def _pax_records(data):
    """``path`` and ``size`` of a pax extended header ("<len> key=value\\n" records)."""
    out, pos = {}, 0
    while pos < len(data):
        m = re.match(rb"(\d{1,8}) ", data[pos:pos + 10])
        if not m or int(m.group(1)) <= len(m.group(0)):
            break
        record = data[pos + len(m.group(0)):pos + int(m.group(1)) - 1]
        pos += int(m.group(1))
        key, _, value = record.partition(b"=")
        if key in (b"path", b"size"):
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
    return out


def read_core_metadata(path, filename):
    """The core metadata bytes inside a wheel or sdist at ``path``, or None.

    For a wheel these are what PEP 658 serves as ``<file>.metadata``.
    Raises HTTPError 400 for a wheel that is not a readable zip with a METADATA file.
    An sdist whose PKG-INFO can't be found within the limits above (too large, too many
    members, too much to decompress, broken) has None: it is taken without metadata of
    its own (the upload form's fields still count).
    """
    try:
        if filename.endswith(".whl"):
            with open(path, "rb") as f:
                found = []
                for entry in zip_entries(f):
                    name = entry[0]
                    if name.count("/") == 1 and name.endswith(".dist-info/METADATA"):
                        found.append(entry)
                        if len(found) > 1:
                            break
                if len(found) != 1:
                    raise bad_request("%s: wheel has no single *.dist-info/METADATA" % filename)
                try:
                    return _zip_member(f, found[0], MAX_METADATA_BYTES)
                except ArchiveTooLarge:
                    raise bad_request("%s: METADATA too large" % filename)
        if filename.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")):
            return _tar_pkg_info(path)
        if filename.endswith(".zip") and not filename.endswith(".doc.zip"):
            with open(path, "rb") as f:
                for entry in zip_entries(f):
                    name = entry[0]
                    if name.count("/") == 1 and name.endswith("/PKG-INFO"):
                        return _zip_member(f, entry, MAX_METADATA_BYTES)
            return None
    except HTTPError:
        raise
    except ArchiveTooLarge as e:
        if filename.endswith(".whl"):
            raise bad_request("%s: %s: not looked into" % (filename, e))
        return None
    except Exception:  # whatever a broken archive makes zipfile or a decompressor raise
        if filename.endswith(".whl"):
            raise bad_request("%s: not a valid wheel (zip) file" % filename)
        return None
    return None


def parse_header_params(value):
    """'form-data; name="a"; filename="b"' -> ('form-data', {'name': 'a', ...})."""
    parts = _split_params(value)
    main = parts[0].strip().lower() if parts else ""
    params = {}
    for item in parts[1:]:
        k, sep, v = item.partition("=")
        if not sep:
            continue
        k = k.strip().lower()
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        if k.endswith("*"):  # RFC 5987 filename*=utf-8''name
            k = k[:-1]
            _, _, v = v.partition("''")
            v = urllib.parse.unquote(v)
        params[k] = v
    return main, params


def _split_params(value):
    out, cur, quoted, i = [], [], False, 0
    while i < len(value):
        c = value[i]
        if c == '"':
            quoted = not quoted
        elif c == "\\" and quoted and i + 1 < len(value):
            cur.append(c)
            i += 1
            c = value[i]
        elif c == ";" and not quoted:
            out.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


class MultipartPart:
    def __init__(self, name, filename, headers):
        self.name = name
        self.filename = filename
        self.headers = headers
        self.value = None      # text of a plain field
        self.path = None       # temporary file of a file field
        self.size = 0
        self.sha256 = None


MAX_FIELDS_BYTES = 64 * 1024 * 1024
MAX_PARTS = 10000


def parse_multipart(stream, boundary, length, tmpdir):
    """Parse a multipart/form-data body of ``length`` bytes from ``stream`` (``length``
    None: up to the end of ``stream``, a reader that ends where the body ends).

    Plain fields are kept as text (bounded in total); file fields are streamed into a
    temporary file under ``tmpdir`` while their sha256 is computed. Returns the parts in
    order. The caller removes the temporary files (``part.path``) it does not keep.
    """
    if not boundary or len(boundary) > 200:
        raise bad_request("multipart body without a valid boundary")
    delim = b"\r\n--" + boundary.encode("latin-1")
    reader = _BoundedReader(stream, length)
    buf = b"\r\n" + reader.read(65536)
    # preamble up to the first delimiter
    while True:
        idx = buf.find(delim)
        if idx >= 0:
            buf = buf[idx + len(delim):]
            break
        if reader.remaining == 0 or len(buf) > 65536 * 4:
            raise bad_request("malformed multipart body: no boundary found")
        buf = buf[-len(delim):] + reader.read(65536)
    parts = []
    field_bytes = 0
    try:
        while True:
            while len(buf) < 2 and reader.remaining:
                buf += reader.read(65536)
            if buf.startswith(b"--"):
                break  # final delimiter
            # headers
            while b"\r\n\r\n" not in buf:
                if not reader.remaining or len(buf) > 65536:
                    raise bad_request("malformed multipart body: bad part headers")
                buf += reader.read(65536)
            head, buf = buf.split(b"\r\n\r\n", 1)
            headers = {}
            for line in head.split(b"\r\n"):
                if not line.strip():
                    continue
                k, sep, v = line.decode("utf-8", "replace").partition(":")
                if not sep:
                    raise bad_request("malformed multipart body: bad part header line")
                headers[k.strip().lower()] = v.strip()
            disp, params = parse_header_params(headers.get("content-disposition", ""))
            if disp != "form-data" or "name" not in params:
                raise bad_request("malformed multipart body: part without form-data name")
            part = MultipartPart(params["name"], params.get("filename"), headers)
            if len(parts) >= MAX_PARTS:
                raise bad_request("too many fields in multipart body")
            parts.append(part)
            sink = None
            chunks = []
            if part.filename is not None:
                fd, part.path = tempfile.mkstemp(dir=tmpdir, prefix="upload-")
                sink = os.fdopen(fd, "wb")
                digest = hashlib.sha256()
            try:
                while True:
                    idx = buf.find(delim)
                    if idx >= 0:
                        data, buf = buf[:idx], buf[idx + len(delim):]
                    else:
                        keep = len(delim)
                        data, buf = buf[:-keep], buf[-keep:]
                    if data:
                        if sink is not None:
                            sink.write(data)
                            digest.update(data)
                            part.size += len(data)
                        else:
                            field_bytes += len(data)
                            if field_bytes > MAX_FIELDS_BYTES:
                                raise HTTPError(413, "form fields too large")
                            chunks.append(data)
                    if idx >= 0:
                        break
                    if not reader.remaining:
                        raise bad_request("malformed multipart body: truncated")
                    buf += reader.read(256 * 1024)
            finally:
                if sink is not None:
                    sink.close()
            if sink is not None:
                part.sha256 = digest.hexdigest()
            else:
                part.value = b"".join(chunks).decode("utf-8", "replace")
        reader.drain()
    except BaseException:
        for p in parts:
            if p.path:
                _unlink_quiet(p.path)
        raise
    return parts


class _BoundedReader:
    """Reads exactly ``length`` bytes, or (length None) until the stream ends."""

    def __init__(self, stream, length):
        self.stream = stream
        self.until_eof = length is None
        self.remaining = 1 << 62 if length is None else length

    @property
    def complete(self):
        """Read to its end: every byte of the body, and nothing beyond it."""
        return self.remaining == 0

    def read(self, n):
        if self.remaining <= 0:
            return b""
        data = self.stream.read(min(n, self.remaining))
        if not data:
            if self.until_eof:
                self.remaining = 0
                return b""
            raise bad_request("request body shorter than its Content-Length")
        self.remaining -= len(data)
        return data

    def drain(self):
        while self.remaining > 0:
            self.read(65536)


# RFC 9112 §7.1: chunk-size is hex digits only (no sign, no "0x", no spaces), then any
# number of ";name" or ";name=value" extensions (ignored), then CRLF.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*\r\n\Z"
    % (_TOKEN, _TOKEN, _QUOTED))
CHUNK_LINE_MAX = 4096       # a chunk-size line with its extensions
TRAILERS_MAX = 32           # trailer fields after the last chunk (all ignored) ...
TRAILERS_MAX_BYTES = 16384  # ... and their bytes in all


class ChunkedReader:
    """Decodes a ``Transfer-Encoding: chunked`` request body, bounded by ``limit``.
    ``complete`` once the last chunk and the trailers were read: only then does the
    stream stand at the next request."""

    def __init__(self, stream, limit):
        self.stream = stream
        self.limit = limit
        self.total = 0
        self.left = 0
        self.done = False

    @property
    def complete(self):
        return self.done

    def _line(self, limit, what):
        line = self.stream.readline(limit + 1)
        if not line:
            raise bad_request("truncated chunked body")
        if len(line) > limit or not line.endswith(b"\r\n"):
            raise bad_request("malformed chunked body: %s" % what)
        return line

    def read(self, n):
        if self.done:
            return b""
        if self.left == 0:
            m = CHUNK_SIZE_LINE.match(self._line(CHUNK_LINE_MAX, "bad chunk size line"))
            if m is None:
                raise bad_request("malformed chunked body: bad chunk size line")
            size = int(m.group(1), 16)
            if size == 0:
                self._trailers()
                return b""
            if self.total + size > self.limit:
                raise HTTPError(413, "request body larger than the limit of %d bytes"
                                % self.limit)
            self.left = size
            self.total += size
        data = self.stream.read(min(n, self.left))
        if not data:
            raise bad_request("truncated chunked body")
        self.left -= len(data)
        if self.left == 0 and self.stream.read(2) != b"\r\n":
            raise bad_request("malformed chunked body: chunk data not followed by CRLF")
        return data

    def _trailers(self):
        count = size = 0
        while True:
            line = self._line(TRAILERS_MAX_BYTES, "trailer line too long")
            if line == b"\r\n":
                break
            count += 1
            size += len(line)
            if count > TRAILERS_MAX or size > TRAILERS_MAX_BYTES:
                raise bad_request("malformed chunked body: too many trailers")
        self.done = True


def _unlink_quiet(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(path):
    """Make a rename in ``path`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ===================================================================================
# 3b. descriptions
# ===================================================================================
# A release's description is untrusted input shown on web pages. render_description()
# turns it into an HTML fragment by its Description-Content-Type: Markdown (CommonMark
# with GFM tables, strikethrough and bare-URL autolinks), reStructuredText (the subset
# READMEs use) or plain text. Every renderer's output then passes sanitize_html(), an
# allow-list on the standard library's HTMLParser, so raw HTML written into a README is
# never passed through as written. All of it is pure functions of text, bounded in time:
# no regular expression that can backtrack far, nothing rescanned per character, nesting
# capped, input capped; and output linear in input (table padding included, see
# _pad_table_rows): the tests hold every construct at its worst to 48 bytes per byte.

DESCRIPTION_MAX_CHARS = 1024 * 1024  # longer descriptions: their start as plain text
DESCRIPTION_MAX_DEPTH = 16  # nested quotes, lists, directives; deeper ones are text
DESCRIPTION_MAX_INLINE = 50000  # inline markup characters looked at; the rest is text
DESCRIPTION_MAX_TAGS = 50000  # tags the sanitizer reads; the rest is shown as text


_RENDERED = {}  # (sha256 of a description, its content type): the fragment, recently shown
_RENDERED_LOCK = threading.Lock()
RENDERED_CACHE_CHARS = 16 * 1024 * 1024  # what the fragments kept may add up to


def render_description(text, content_type):
    """render_description_uncached, remembered: a project's pages are built again after
    each change to the project, and its descriptions rarely change with them."""
    if isinstance(text, str):
        key = (hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), content_type)
        found = _RENDERED.get(key)
        if found is None:
            found = render_description_uncached(text, content_type)
            with _RENDERED_LOCK:
                if sum(map(len, _RENDERED.values())) + len(found) > RENDERED_CACHE_CHARS:
                    _RENDERED.clear()
                _RENDERED[key] = found
        return found
    return render_description_uncached(text, content_type)


def render_description_uncached(text, content_type):
    """A safe HTML fragment for a description of the given Description-Content-Type.

    ``text/markdown`` (any variant), ``text/x-rst``, ``text/plain``; a missing type is
    reStructuredText, or plain text when it is not valid reStructuredText (inconsistent
    section titles), as the big index does; an unknown type is plain text. Descriptions over
    ``DESCRIPTION_MAX_CHARS`` show their start as plain text, with a note.
    """
    if text is None:
        text = ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _DESC_CONTROL.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))
    if len(text) > DESCRIPTION_MAX_CHARS:
        return sanitize_html(_plain_html(text[:DESCRIPTION_MAX_CHARS]) + (
            '<p><em>(description truncated: %d characters in all)</em></p>' % len(text)))
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "text/markdown":
        fragment = markdown_to_html(text)
    elif kind in ("text/x-rst", ""):
        try:
            fragment = rst_to_html(text, strict=not kind)
        except _RstError:
            fragment = _plain_html(text)
    else:
        fragment = _plain_html(text)
    return sanitize_html(fragment)


_DESC_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


def _esc_text(s):
    return s.replace("&", "&amp;").replace("<", "&lt;")


def _esc(s):
    return (s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _plain_html(text):
    return "<pre>%s</pre>" % _esc_text(text)


def _pad_table_rows(rows, width, chars):
    """The rows (lists of cells) padded with empty cells to the table's width, as GFM and
    docutils do, while the cells added to the whole table stay within half of chars, the
    number of characters the table was written with (a cell takes two to write: ``x|``);
    past that a short row stays short (a browser shows it so anyway). A wide header over
    many short rows thus adds at most one cell per two characters of input, never header
    width times rows."""
    chars //= 2
    for cells in rows:
        add = min(width - len(cells), chars)
        if add > 0:
            cells.extend([""] * add)
            chars -= add
    return rows


# --- Markdown ------------------------------------------------------------------------

_MD_ATX = re.compile(r" {0,3}(#{1,6})(?=[ \t]|$)(.*)$")
_MD_FENCE = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)$")
_MD_SETEXT = re.compile(r" {0,3}(=+|-+)[ \t]*$")
_MD_LIST = re.compile(r"( {0,3})([-+*]|(\d{1,9})[.)])( +|$)")
_MD_QUOTE = re.compile(r" {0,3}>")
_MD_REFDEF = re.compile(r" {0,3}\[([^\]]{1,999})\]:[ \t]*(<[^<>\n]*>|\S+)"
                        r"""(?:[ \t]+("[^"]*"|'[^']*'|\([^()]*\)))?[ \t]*$""")
_MD_ATTR = r"""(?:\s+[A-Za-z_:][\w.:-]*(?:\s*=\s*(?:[^\s"'=<>`]+|'[^']*'|"[^"]*"))?)"""
_MD_OPEN_TAG = re.compile(r"<[A-Za-z][A-Za-z0-9-]*" + _MD_ATTR + r"*\s*/?>")
_MD_CLOSE_TAG = re.compile(r"</[A-Za-z][A-Za-z0-9-]*\s*>")
_MD_HTML_START = re.compile(r" {0,3}<(/?)([A-Za-z][A-Za-z0-9-]*)(?=[\s/>]|$)")
_MD_HTML_BLOCK_TAGS = frozenset(
    "address article aside blockquote body caption center col colgroup dd details dialog "
    "dir div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 head header hr "
    "html iframe legend li main menu nav ol optgroup option p picture section summary "
    "table tbody td tfoot th thead title tr ul".split())
_MD_SPECIAL = re.compile(r"[\\`*_~\[\]!<&\n]|(?<![\w/.@-])(?:https?://|www\.)")
_MD_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6});")
_MD_AUTOLINK = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*)>")
_MD_EMAIL = re.compile(r"<([\w.+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){0,8})>")
_MD_BARE_URL = re.compile(r"(?:https?://|www\.)[^\s<>]*")
_MD_BACKTICKS = re.compile(r"`+")
_MD_DEST = re.compile(r"(?:[^\s()\\]|\\.|\((?:[^\s()\\]|\\.)*\))*")  # parens: one level
_MD_CELL_SEP = re.compile(r"(?<!\\)\|")
_MD_ESCAPABLE = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def markdown_to_html(text):
    """Markdown (CommonMark, GFM tables, strikethrough and autolinks) to an HTML fragment.

    Raw HTML is kept for sanitize_html(), which render_description() always applies."""
    parser = _MdBlocks()
    nodes = parser.parse([line.expandtabs(4) for line in text.split("\n")], 0)
    refs, budget = parser.refs, [DESCRIPTION_MAX_INLINE]

    def inline(t):
        if _MD_SPECIAL.search(t):
            return _MdInline(t, refs, budget).render()
        budget[0] -= bool(t)  # what _MdInline does with text without markup, less the work
        return _esc_text(t)
    return _render_blocks(nodes, inline, False)


def _md_hr(line):
    s = line.lstrip(" ")
    c = s[:1]
    if c not in ("-", "*", "_") or len(line) - len(s) > 3:
        return False
    t = s.replace(" ", "").rstrip()
    return len(t) >= 3 and not t.strip(c)


def _md_fence(line):
    m = _MD_FENCE.match(line)
    if m and not (m.group(2)[0] == "`" and "`" in m.group(3)):
        return m
    return None


def _md_html_start(line, interrupting):
    """The end marker of the HTML block the line starts ("" for a blank line), or None."""
    s = line.lstrip(" ")
    if s.startswith("<!--"):
        return "-->"
    m = _MD_HTML_START.match(line)
    if not m:
        return None
    name = m.group(2).lower()
    if not m.group(1) and name in ("script", "pre", "style", "textarea"):
        return "</" + name
    if name in _MD_HTML_BLOCK_TAGS:
        return ""
    s = s.rstrip()
    if not interrupting and (_MD_OPEN_TAG.fullmatch(s) or _MD_CLOSE_TAG.fullmatch(s)):
        return ""
    return None


def _md_interrupts(line):
    """Whether the line starts a block that ends a paragraph."""
    s = line.lstrip(" ")
    if not s or len(line) - len(s) > 3:
        return False
    c = s[0]
    if c == "#":
        return bool(_MD_ATX.match(line))
    if c in "`~":
        return bool(_md_fence(line))
    if c == ">":
        return True
    if c == "<":
        return _md_html_start(line, True) is not None
    if c in "-*_" and _md_hr(line):
        return True
    if c not in "-+*" and not c.isdigit():
        return False
    m = _MD_LIST.match(line)
    return bool(m and line[m.end():].strip() and (m.group(3) is None or m.group(3) == "1"))


def _md_lazy(line):
    """A lazy continuation line, which stays paragraph text (no setext underline)."""
    return "\\" + line.lstrip() if _MD_SETEXT.match(line) else line


def _md_table_cells(line):
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    return [c.strip() for c in _MD_CELL_SEP.split(s)] if "|" in s else [s.strip()]


def _md_table_head(lines, i):
    """Alignments of a GFM table whose header row is lines[i], or None."""
    if "|" not in lines[i] or i + 1 >= len(lines) or "-" not in lines[i + 1]:
        return None
    delims = _md_table_cells(lines[i + 1])
    if not all(re.fullmatch(r":?-+:?", d) for d in delims):
        return None
    if len(delims) != len(_md_table_cells(lines[i])):
        return None
    return [("center" if d[-1] == ":" else "left") if d[0] == ":" else
            ("right" if d[-1] == ":" else None) for d in delims]


class _MdBlocks:
    """Markdown's block structure as nodes: ("p", text), ("h", level, text), ("code",
    language, text), ("hr",), ("html", raw), ("quote", nodes), ("list", ordered, start,
    tight, [nodes...]), ("table", aligns, [head], rows). Link definitions go to refs."""

    def __init__(self):
        self.refs = {}

    def parse(self, lines, depth):
        if depth > DESCRIPTION_MAX_DEPTH:
            return [("p", "\n".join(line.strip() for line in lines if line.strip()))]
        if len(lines) == 1 and lines[0][:1].isalpha():  # one line of text (a list item's)
            return [("p", lines[0].rstrip())]
        nodes, i, n = [], 0, len(lines)
        while i < n:
            line = lines[i]
            s = line.lstrip(" ")
            if not s:
                i += 1
                continue
            indent = len(line) - len(s)
            if indent >= 4:  # indented code
                j = i
                while j < n and (not lines[j].strip() or lines[j].startswith("    ")):
                    j += 1
                body = [l[4:] for l in lines[i:j]]
                while body and not body[-1].strip():
                    body.pop()
                nodes.append(("code", "", "\n".join(body)))
                i = j
                continue
            c = s[0]  # what a block can start with, before any regular expression is tried
            m = _md_fence(line) if c in "`~" else None
            if m:
                fence, lang = m.group(2), m.group(3).strip()
                lang = _md_unescape(lang.split()[0]) if lang else ""
                body, i = [], i + 1
                while i < n:
                    t = lines[i].strip()
                    if (len(lines[i]) - len(lines[i].lstrip(" ")) < 4 and t
                            and t == fence[0] * len(t) and len(t) >= len(fence)):
                        i += 1
                        break
                    l = lines[i]
                    body.append(l[min(len(m.group(1)), len(l) - len(l.lstrip(" "))):])
                    i += 1
                nodes.append(("code", lang, "\n".join(body)))
                continue
            m = _MD_ATX.match(line) if c == "#" else None
            if m:
                t = m.group(2).strip()
                u = t.rstrip("#")
                if not u or u[-1] in " \t":
                    t = u.rstrip()
                nodes.append(("h", len(m.group(1)), t))
                i += 1
                continue
            if c in "-*_" and _md_hr(line):
                nodes.append(("hr",))
                i += 1
                continue
            if c == ">":
                inner = []
                while i < n:
                    l = lines[i]
                    m = _MD_QUOTE.match(l)
                    if m:
                        rest = l[m.end():]
                        inner.append(rest[1:] if rest.startswith(" ") else rest)
                    elif (l.strip() and inner and inner[-1].strip() and not _md_interrupts(l)
                          and not _MD_LIST.match(l)):
                        inner.append(_md_lazy(l))  # a lazy continuation line
                    else:
                        break
                    i += 1
                nodes.append(("quote", self.parse(inner, depth + 1)))
                continue
            m = _MD_LIST.match(line) if c in "-+*" or c.isdigit() else None
            if m:
                i = self._list(lines, i, depth, nodes, m)
                continue
            end = _md_html_start(line, False) if c == "<" else None
            if end is not None:
                j = i
                while j < n:
                    l = lines[j]
                    if not end and not l.strip():
                        break
                    j += 1
                    if end and end in l.lower():
                        break
                nodes.append(("html", "\n".join(lines[i:j])))
                i = j
                continue
            m = _MD_REFDEF.match(line) if c == "[" else None
            if m:  # a link reference definition (it cannot interrupt a paragraph)
                label = " ".join(m.group(1).split()).casefold()
                dest = m.group(2)[1:-1] if m.group(2)[0] == "<" else m.group(2)
                title = m.group(3)[1:-1] if m.group(3) else None
                if label:
                    self.refs.setdefault(label, (_md_unescape(dest),
                                                 _md_unescape(title) if title else None))
                i += 1
                continue
            aligns = _md_table_head(lines, i)
            if aligns:
                head = _md_table_cells(line)
                rows, i, chars = [], i + 2, len(line) + len(lines[i + 1])
                while i < n and lines[i].strip() and not _md_interrupts(lines[i]):
                    rows.append(_md_table_cells(lines[i])[:len(aligns)])
                    chars += len(lines[i])
                    i += 1
                nodes.append(("table", aligns, [head], _pad_table_rows(rows, len(aligns), chars)))
                continue
            i = self._paragraph(lines, i, nodes)
        return nodes

    def _paragraph(self, lines, i, nodes):
        para, level, n = [lines[i]], 0, len(lines)
        i += 1
        while i < n:
            l = lines[i]
            if not l.strip():
                break
            if _MD_SETEXT.match(l):
                level = 1 if "=" in l else 2
                i += 1
                break
            if _md_interrupts(l) or _md_table_head(lines, i):
                break
            para.append(l)
            i += 1
        text = "\n".join(l.lstrip() for l in para).rstrip()
        nodes.append(("h", level, text) if level else ("p", text))
        return i

    def _list(self, lines, i, depth, nodes, first):
        ordered, marker = first.group(3) is not None, first.group(2)[-1]
        start = int(first.group(3)) if ordered else 1
        items, loose, n, m = [], False, len(lines), first

        def same_list(line):
            c = line.lstrip(" ")[:1]
            if not (c.isdigit() if ordered else c == marker):
                return None
            m = _MD_LIST.match(line)
            return (m if m and not _md_hr(line) and (m.group(3) is not None) == ordered
                    and m.group(2)[-1] == marker else None)
        while i < n:
            m = m or same_list(lines[i])  # (the first line: matched by the caller)
            if not m:
                break
            rest, spaces = lines[i][m.end():], len(m.group(4))
            if not rest.strip():
                width, rest = m.end(2) + 1, ""
            elif spaces > 4:
                width, rest = m.end(2) + 1, " " * (spaces - 1) + rest
            else:
                width = m.end()
            m = None
            item, i = [rest], i + 1
            while i < n and (rest.strip() or lines[i].strip() or len(item) > 1):
                l = lines[i]
                s = l.lstrip(" ")
                if not s:
                    item.append("")
                elif len(l) - len(s) >= width:
                    item.append(l[width:])
                elif (item[-1].strip() and not _md_interrupts(l) and not _MD_LIST.match(l)
                      and not _md_fence(item[-1].lstrip())):
                    item.append(_md_lazy(l))  # a lazy continuation line
                else:
                    break
                i += 1
            trailing = 0
            while len(item) > 1 and not item[-1].strip():
                item.pop()
                trailing += 1
            children = self.parse(item, depth + 1)
            if "" in item and len(children) > 1:
                loose = True
            items.append(children)
            if trailing and i < n and same_list(lines[i]):
                loose = True
        nodes.append(("list", ordered, start, not loose, items))
        return i


def _md_unescape(s):
    """Backslash escapes and entities of a link destination, title or info string."""
    s = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", s)
    return _MD_ENTITY.sub(lambda m: html.unescape(m.group()), s)


def _md_url(url):
    return _esc(urllib.parse.quote(url, safe="%/:=&?~#+!$,;'@()*[]"))


def _render_blocks(nodes, inline, tight):
    """HTML of the block nodes both parsers make; inline renders a text's inline markup."""
    out = []
    for nd in nodes:
        kind = nd[0]
        if kind == "p":
            out.append(inline(nd[1]) if tight else "<p>%s</p>" % inline(nd[1]))
        elif kind == "h":
            out.append("<h%d>%s</h%d>" % (nd[1], inline(nd[2]), nd[1]))
        elif kind == "code":
            lang = re.sub(r"[^\w+#.-]", "", nd[1])[:40]
            out.append('<pre><code%s>%s</code></pre>' % (
                ' class="language-%s"' % lang if lang else "",
                _esc_text(nd[2] + "\n" if nd[2] else "")))
        elif kind == "hr":
            out.append("<hr>")
        elif kind == "html":
            out.append(nd[1])
        elif kind == "quote":
            out.append("<blockquote>\n%s\n</blockquote>" % _render_blocks(nd[1], inline, False))
        elif kind == "list":
            ordered, start, items_tight, items = nd[1:]
            tag = "ol" if ordered else "ul"
            out.append("<%s%s>" % (tag, ' start="%d"' % start if ordered and start != 1 else ""))
            for item in items:
                out.append("<li>%s</li>" % _render_blocks(item, inline, items_tight))
            out.append("</%s>" % tag)
        elif kind == "dl":
            out.append("<dl>\n%s\n</dl>" % "\n".join(
                "<dt>%s</dt>\n<dd>%s</dd>" % (inline(term), _render_blocks(body, inline, False))
                for term, body in nd[1]))
        elif kind == "div":
            out.append('<div class="%s">\n%s%s\n</div>' % (
                nd[1], '<p class="admonition-title">%s</p>\n' % _esc(nd[2]) if nd[2] else "",
                _render_blocks(nd[3], inline, False)))
        elif kind == "lines":
            out.append("<p>%s</p>" % "<br>\n".join(inline(t) for t in nd[1]))
        elif kind == "table":
            aligns, heads, rows = nd[1:]

            opens = {tag: ["<%s%s>" % (tag, ' align="%s"' % a if a else "") for a in aligns]
                     for tag in ("th", "td")}

            def row(cells, tag):
                close = "</%s>" % tag
                return "<tr>%s</tr>" % "".join(
                    [o + inline(c) + close for o, c in zip(opens[tag], cells)])
            out.append("<table>")
            if heads:
                out.append("<thead>\n%s\n</thead>" % "\n".join(row(r, "th") for r in heads))
            if rows:
                out.append("<tbody>\n%s\n</tbody>" % "\n".join(row(r, "td") for r in rows))
            out.append("</table>")
        else:  # "raw": a function that makes its HTML
            out.append(nd[1]())
    return "\n".join(out)


def _md_punct(c):
    return c in _MD_ESCAPABLE or (c > "\x7f" and unicodedata.category(c)[0] in "PS")


class _MdDelim:
    """A run of ``*``, ``_`` or ``~``: the tags it opens and closes once matched."""

    __slots__ = ("char", "count", "orig", "can_open", "can_close", "opens", "closes")

    def __init__(self, char, count, can_open, can_close):
        self.char, self.count, self.orig = char, count, count
        self.can_open, self.can_close = can_open, can_close
        self.opens, self.closes = [], []

    def __str__(self):
        return ("".join("</%s>" % t for t in self.closes) + self.char * self.count
                + "".join("<%s>" % t for t in reversed(self.opens)))


class _MdBracket:
    __slots__ = ("node", "image", "src", "delim", "text")

    def __init__(self, node, image, src, delim):
        self.node, self.image, self.src, self.delim = node, image, src, delim
        self.text = "![" if image else "["

    def __str__(self):
        return self.text


class _MdInline:
    """CommonMark's inline parsing, one pass with a delimiter and a bracket stack; every
    look-ahead is bounded, and emphasis matching keeps CommonMark's openers_bottom, so
    the work stays linear however the delimiters are arranged."""

    def __init__(self, text, refs, budget):
        self.text, self.refs, self.budget = text, refs, budget
        self.nodes, self.delims, self.brackets = [], [], []
        self.inactive = 0  # brackets below this index are inside a link: no links there
        self.ticks = None

    def render(self):
        text, nodes, n, pos = self.text, self.nodes, len(self.text), 0
        while pos < n:
            m = _MD_SPECIAL.search(text, pos)
            self.budget[0] -= 1
            if not m or self.budget[0] < 0:  # the end, or too much markup: the rest is text
                nodes.append(_esc_text(text[pos:]))
                break
            start = m.start()
            if start > pos:
                chunk = text[pos:start]
                if text[start] == "\n":
                    stripped = chunk.rstrip(" ")
                    nodes.append(_esc_text(stripped))
                    if len(chunk) - len(stripped) >= 2:
                        nodes.append("<br>")
                else:
                    nodes.append(_esc_text(chunk))
            pos = self._special(start)
        self._emphasis(self.delims)
        return "".join(map(str, nodes))

    def _special(self, pos):
        text, nodes, c = self.text, self.nodes, self.text[pos]
        if c == "\n":
            nodes.append("\n")
            return pos + 1
        if c == "\\":
            nxt = text[pos + 1:pos + 2]
            if nxt == "\n":
                nodes.append("<br>\n")
                return pos + 2
            if nxt and nxt in _MD_ESCAPABLE:
                nodes.append(_esc_text(nxt))
                return pos + 2
            nodes.append("\\")
            return pos + 1
        if c == "`":
            return self._code(pos)
        if c in "*_~":
            return self._delim(pos)
        if c == "[":
            self.brackets.append(_MdBracket(len(nodes), False, pos + 1, len(self.delims)))
            nodes.append(self.brackets[-1])
            return pos + 1
        if c == "!":
            if text.startswith("[", pos + 1):
                self.brackets.append(_MdBracket(len(nodes), True, pos + 2, len(self.delims)))
                nodes.append(self.brackets[-1])
                return pos + 2
            nodes.append("!")
            return pos + 1
        if c == "]":
            return self._close_bracket(pos)
        if c == "&":
            m = _MD_ENTITY.match(text, pos)
            if m:
                nodes.append(_esc_text(html.unescape(m.group())))
                return m.end()
            nodes.append("&amp;")
            return pos + 1
        if c == "<":
            end = min(len(text), pos + 4096)
            m = _MD_AUTOLINK.match(text, pos, end)
            if m:
                url = m.group(1)
                nodes.append('<a href="%s">%s</a>' % (_md_url(url), _esc_text(url)))
                return m.end()
            m = _MD_EMAIL.match(text, pos, end)
            if m:
                nodes.append('<a href="mailto:%s">%s</a>' % (_esc(m.group(1)), _esc(m.group(1))))
                return m.end()
            m = _MD_OPEN_TAG.match(text, pos, end) or _MD_CLOSE_TAG.match(text, pos, end)
            if m:
                nodes.append(m.group())  # raw HTML, for the sanitizer
                return m.end()
            if text.startswith("<!--", pos):
                close = text.find("-->", pos + 4, end)
                if close != -1:
                    return close + 3  # a comment
            nodes.append("&lt;")
            return pos + 1
        # a bare URL (GFM's autolink extension)
        m = _MD_BARE_URL.match(text, pos, min(len(text), pos + 4096))
        url = m.group().rstrip("?!.,:*_~'\"")
        # unmatched trailing ")" are not part of it (counted once: runs of ")" stay linear)
        unmatched = url.count(")") - url.count("(")
        if unmatched > 0:
            url = url[:len(url) - min(unmatched, len(url) - len(url.rstrip(")")))]
        if len(url) <= 8 or self.brackets:
            nodes.append(_esc_text(text[pos]))
            return pos + 1
        href = url if url[0] == "h" else "http://" + url
        nodes.append('<a href="%s">%s</a>' % (_md_url(href), _esc_text(url)))
        return pos + len(url)

    def _code(self, pos):
        text = self.text
        run = _MD_BACKTICKS.match(text, pos).end() - pos
        if self.ticks is None:
            self.ticks = {}
            for m in _MD_BACKTICKS.finditer(text):
                self.ticks.setdefault(m.end() - m.start(), []).append(m.start())
        starts = self.ticks.get(run, [])
        k = bisect.bisect_right(starts, pos)
        if k == len(starts):
            self.nodes.append("`" * run)
            return pos + run
        code = text[pos + run:starts[k]].replace("\n", " ")
        if len(code) > 2 and code[0] == " " and code[-1] == " " and code.strip():
            code = code[1:-1]
        self.nodes.append("<code>%s</code>" % _esc_text(code))
        return starts[k] + run

    def _delim(self, pos):
        text, c = self.text, self.text[pos]
        end = pos
        while end < len(text) and text[end] == c:
            end += 1
        count = end - pos
        before = text[pos - 1] if pos else " "
        after = text[end] if end < len(text) else " "
        left = not after.isspace() and (not _md_punct(after) or before.isspace()
                                        or _md_punct(before))
        right = not before.isspace() and (not _md_punct(before) or after.isspace()
                                          or _md_punct(after))
        if c == "_":
            can_open = left and (not right or _md_punct(before))
            can_close = right and (not left or _md_punct(after))
        else:
            can_open, can_close = left, right
        if c == "~" and count > 2 or not (can_open or can_close):
            self.nodes.append(c * count)
        else:
            d = _MdDelim(c, count, can_open, can_close)
            self.nodes.append(d)
            self.delims.append(d)
        return end

    def _close_bracket(self, pos):
        text, nodes = self.text, self.nodes
        if not self.brackets:
            nodes.append("]")
            return pos + 1
        b = self.brackets.pop()
        if not b.image and len(self.brackets) < self.inactive:
            self.inactive = len(self.brackets)  # b was inactive: stays text
            nodes.append("]")
            return pos + 1
        self.inactive = min(self.inactive, len(self.brackets))
        link, end = None, pos + 1
        if text.startswith("(", pos + 1):
            link = _md_link_tail(text, pos + 2)
            if link:
                end = link[2]
        if link is None:
            key = None
            if text.startswith("[", pos + 1):
                close = text.find("]", pos + 2, pos + 1002)
                if close != -1 and "[" not in text[pos + 2:close]:
                    key = text[pos + 2:close] if text[pos + 2:close].strip() else None
                    if key is None and pos - b.src <= 999:
                        key = text[b.src:pos]
                    end = close + 1
            elif pos - b.src <= 999:
                key = text[b.src:pos]
            if key is not None:
                link = self.refs.get(" ".join(key.split()).casefold())
        if link is None:
            nodes.append("]")
            return pos + 1
        dest, title = link[0], link[1]
        title = ' title="%s"' % _esc(title) if title else ""
        self._emphasis(self.delims[b.delim:])
        del self.delims[b.delim:]
        if b.image:
            inner = "".join(map(str, nodes[b.node + 1:]))
            alt = _esc(html.unescape(re.sub(r"<[^>]*>", "", inner)))
            del nodes[b.node:]
            nodes.append('<img src="%s" alt="%s"%s>' % (_md_url(dest), alt, title))
        else:
            b.text = '<a href="%s"%s>' % (_md_url(dest), title)
            nodes.append("</a>")
            self.inactive = len(self.brackets)  # no links inside a link
        return end

    @staticmethod
    def _emphasis(delims):
        """CommonMark's "process emphasis" over delimiter runs in text order."""
        stack, bottom = [], {}
        for closer in delims:
            while closer.can_close and closer.count:
                key = (closer.char, closer.can_open, closer.orig % 3)
                j, lo, found = len(stack) - 1, bottom.get(key, 0), None
                while j >= lo:
                    op = stack[j]
                    if op.char == closer.char and (
                            op.count == closer.count if op.char == "~" else not (
                                (op.can_close or closer.can_open)
                                and (op.orig + closer.orig) % 3 == 0
                                and (op.orig % 3 or closer.orig % 3))):
                        found = j
                        break
                    j -= 1
                if found is None:
                    bottom[key] = len(stack)
                    break
                op = stack[found]
                del stack[found + 1:]
                if op.char == "~":
                    use, tag = op.count, "del"
                else:
                    use = 2 if op.count >= 2 and closer.count >= 2 else 1
                    tag = "strong" if use == 2 else "em"
                op.count -= use
                closer.count -= use
                op.opens.append(tag)
                closer.closes.append(tag)
                if not op.count:
                    stack.pop()
                for k in bottom:
                    bottom[k] = min(bottom[k], len(stack))
            if closer.count and closer.can_open:
                stack.append(closer)


def _md_link_tail(text, p):
    """(destination, title, end) of an inline link's ``(...)`` part from p, or None."""
    n = len(text)
    while p < n and text[p] in " \t\n":
        p += 1
    if p < n and text[p] == "<":
        q = p + 1
        while q < n and text[q] not in "<>\n":
            q += 2 if text[q] == "\\" else 1
        if q >= n or text[q] != ">":
            return None
        dest, p = text[p + 1:q], q + 1
    else:
        q = _MD_DEST.match(text, p).end()
        if q < n and text[q] not in " \t\n)":
            return None
        dest, p = text[p:q], q
    q = p
    while q < n and text[q] in " \t\n":
        q += 1
    title = None
    if q > p and q < n and text[q] in "\"'(":
        close, r, limit = ")" if text[q] == "(" else text[q], q + 1, min(n, q + 4096)
        while r < limit and text[r] != close:
            if text[q] == "(" and text[r] == "(":
                return None
            r += 2 if text[r] == "\\" else 1
        if r >= limit:
            return None
        title, q = text[q + 1:r], r + 1
        while q < n and text[q] in " \t\n":
            q += 1
    if q < n and text[q] == ")":
        return _md_unescape(dest), _md_unescape(title) if title is not None else None, q + 1
    return None


# --- reStructuredText ----------------------------------------------------------------


class _RstError(Exception):
    """Not valid reStructuredText: a section title whose level is inconsistent."""


_RST_ADORN = re.compile(r"([!-/:-@\[-`{-~])\1+$")
_RST_BULLET = re.compile("([-*+\u2022\u2023\u2043])(?: +|$)")
_RST_ENUM = re.compile(r"(?:(\d{1,9}|#)[.)]|\((\d{1,9}|#)\))(?: +|$)")
_RST_FIELD = re.compile(r":([^:\s][^:]{0,80}):(?: +|$)")
_RST_EXPLICIT = re.compile(r"\.\.(?: |$)")
_RST_TARGET = re.compile(r"_(`[^`]{1,200}`|[^:`\s][^:]{0,200}|_):(?: +|$)")
_RST_SUBST = re.compile(r"\|([^|\s][^|]{0,100})\| +([\w-]+)::(?: +|$)")
_RST_DIRECTIVE = re.compile(r"([\w-]+(?::[\w-]+)?)::(?: +|$)")
_RST_OPTION = re.compile(r":([\w-]+):(?: +(.*)|$)")
_RST_GRID = re.compile(r"\+(?:[-=]+\+)+$")
_RST_SIMPLE = re.compile(r"=+(?: +=+)+$")
_RST_INLINE = re.compile(r"\\|\*\*|\*|``|`|\|(?=\S)|:[A-Za-z][\w+.:-]{0,40}:`")
_RST_FOLLOW = r"""(?:[\s'")\]}>/:.,;!?\\-]|$)"""
_RST_ENDS = {
    "**": re.compile(r"(?<=\S)(?<!\\)\*\*(?=%s)" % _RST_FOLLOW),
    "*": re.compile(r"(?<=\S)(?<!\\)\*(?=%s)" % _RST_FOLLOW),
    "``": re.compile(r"(?<=\S)``(?=%s)" % _RST_FOLLOW),
    "`": re.compile(r"(?<=\S)(?<!\\)`(?=(?:__?)?%s)" % _RST_FOLLOW),
    "|": re.compile(r"(?<=\S)(?<!\\)\|(?=(?:__?)?%s)" % _RST_FOLLOW),
}
_RST_BEFORE = frozenset("'\"([{<-/:\u2018\u201c\u2019\u00ab\u00a1\u00bf")
_RST_ADMONITIONS = frozenset("attention caution danger error hint important note tip warning "
                             "seealso".split())
_RST_TEXT_ROLES = frozenset("ref doc term any download numref keyword option envvar token "
                            "title-reference t title".split())


def rst_to_html(text, strict=False):
    """reStructuredText (the constructs READMEs use) to an HTML fragment. Directives other
    than images, figures, code blocks, admonitions and a few containers are skipped, never
    run (``raw`` and ``include`` among them). With strict, an inconsistent section title
    raises _RstError (render_description then shows plain text)."""
    doc = _RstDoc(strict)
    nodes = doc.parse([line.expandtabs(8).rstrip() for line in text.split("\n")], 0)
    return _render_blocks(nodes, doc.inline, False)


def _rst_indented(lines, i):
    """The indented block from lines[i] (blank lines inside kept), dedented; its end."""
    if i < len(lines) and lines[i] and lines[i][0] != " ":
        return [], i  # none (a list item or field of one line)
    j = i
    while j < len(lines) and (not lines[j] or lines[j][0] == " "):
        j += 1
    block = lines[i:j]
    while block and not block[-1]:
        block.pop()
    indent = min([len(l) - len(l.lstrip(" ")) for l in block if l] or [0])
    return [l[indent:] for l in block], j


def _rst_dedent(lines):
    indent = min([len(l) - len(l.lstrip(" ")) for l in lines if l.strip()] or [0])
    return [l[indent:] for l in lines]


def _rst_list_item(line):
    """(style, start, width) of a list item's first line, or None."""
    m = _RST_BULLET.match(line)
    if m:
        return m.group(1), None, m.end()
    m = _RST_ENUM.match(line)
    if m:
        num = m.group(1) or m.group(2)
        style = re.sub(r"\d+|#", "N", m.group().strip())
        return style, 1 if num == "#" else int(num), m.end()
    return None


def _rst_directive_parts(first, block):
    """A directive's arguments (one string), options (a dict) and content lines."""
    args, k = [first.strip()] if first.strip() else [], 0
    while k < len(block) and block[k] and not _RST_OPTION.match(block[k]):
        args.append(block[k].strip())
        k += 1
    options = {}
    while k < len(block) and block[k] and _RST_OPTION.match(block[k]):
        m = _RST_OPTION.match(block[k])
        options[m.group(1).lower()] = (m.group(2) or "").strip()
        k += 1
    while k < len(block) and not block[k]:
        k += 1
    return " ".join(args), options, block[k:]


def _rst_name(name):
    return " ".join(name.lower().split())


def _rst_unescape(s):
    return re.sub(r"\\(.)", r"\1", re.sub(r"\\\s", "", s))


class _RstDoc:
    """reStructuredText's blocks as the nodes _render_blocks() takes, then inline markup
    with the hyperlink targets and substitutions the whole document defines."""

    def __init__(self, strict):
        self.strict, self.targets, self.anonymous, self.anon_used = strict, {}, [], 0
        self.subs, self.styles, self.level = {}, [], 0
        self.budget = DESCRIPTION_MAX_INLINE

    def parse(self, lines, depth):
        if depth > DESCRIPTION_MAX_DEPTH:
            return [("code", "", "\n".join(lines))]
        if len(lines) == 1 and lines[0][:1].isalpha() and not lines[0].endswith("::"):
            return [("p", lines[0])]  # one line of text (a list item's, a field's)
        nodes, i, n = [], 0, len(lines)
        while i < n:
            line = lines[i]
            if not line:
                i += 1
                continue
            if line[0] == " ":
                block, i = _rst_indented(lines, i)
                nodes.append(("quote", self.parse(block, depth + 1)))
                continue
            if _RST_EXPLICIT.match(line):
                i = self._explicit(lines, i, depth, nodes)
                continue
            if line.startswith("__ "):  # an anonymous target, short form
                block, i = _rst_indented(lines, i + 1)
                self.anonymous.append("".join(x.strip() for x in [line[3:]] + block))
                continue
            nxt = lines[i + 1] if i + 1 < n else ""
            if line[0] == "+" and _RST_GRID.match(line):
                i = self._grid_table(lines, i, nodes)
                continue
            if line[0] == "=" and _RST_SIMPLE.match(line):
                i = self._simple_table(lines, i, nodes)
                continue
            if _RST_ADORN.match(line):
                if (i + 2 < n and nxt.strip() and lines[i + 2][:1] == line[0]
                        and _RST_ADORN.match(lines[i + 2])):
                    nodes.append(self._title((line[0], True), nxt.strip()))
                    i += 3
                    continue
                if len(line) >= 4 and not nxt:
                    nodes.append(("hr",))
                    i += 1
                    continue
            if nxt and _RST_ADORN.match(nxt) and (len(nxt) >= 4 or len(nxt) >= len(line)):
                nodes.append(self._title((nxt[0], False), line.strip()))
                i += 2
                continue
            item = _rst_list_item(line)
            if item:
                i = self._list(lines, i, depth, nodes, item)
                continue
            if _RST_FIELD.match(line):
                items = []
                while i < n and lines[i] and _RST_FIELD.match(lines[i]):
                    m = _RST_FIELD.match(lines[i])
                    first = lines[i][m.end():]
                    block, i = _rst_indented(lines, i + 1)
                    items.append((m.group(1), self.parse([first] + block, depth + 1)))
                nodes.append(("dl", items))
                continue
            if line.startswith(">>>"):
                j = i
                while j < n and lines[j]:
                    j += 1
                nodes.append(("code", "pycon", "\n".join(lines[i:j])))
                i = j
                continue
            if line == "|" or line.startswith("| "):
                texts = []  # each line's parts, joined once (not copied per continuation)
                while i < n and lines[i] and (lines[i][0] == "|" or lines[i][0] == " "):
                    l = lines[i]
                    if l[0] == "|":
                        texts.append([l[2:]])
                    elif texts:
                        texts[-1].append(l.strip())
                    i += 1
                nodes.append(("lines", [" ".join(parts) for parts in texts]))
                continue
            if nxt and nxt[0] == " " and nxt.strip():
                items = []
                while (i + 1 < n and lines[i] and lines[i][0] != " " and lines[i + 1][:1] == " "
                       and not _RST_EXPLICIT.match(lines[i]) and not _rst_list_item(lines[i])
                       and not _RST_FIELD.match(lines[i])):
                    term = lines[i].split(" : ")[0]
                    block, i = _rst_indented(lines, i + 1)
                    items.append((term, self.parse(block, depth + 1)))
                nodes.append(("dl", items))
                continue
            i = self._paragraph(lines, i, nodes)
        return nodes

    def _paragraph(self, lines, i, nodes):
        j, n = i, len(lines)
        while j < n and lines[j] and lines[j][0] != " ":
            j += 1
        text = "\n".join(lines[i:j])
        if not text.endswith("::"):
            nodes.append(("p", text))
            return j
        text = text[:-2].rstrip() if text == "::" or text[-3].isspace() else text[:-1]
        if text.strip():
            nodes.append(("p", text))
        k = j
        while k < n and not lines[k]:
            k += 1
        if k < n and lines[k][0] == " ":  # a literal block
            block, j = _rst_indented(lines, k)
            nodes.append(("code", "", "\n".join(block)))
        return j

    def _title(self, style, text):
        if style in self.styles:
            level = self.styles.index(style) + 1
        else:
            self.styles.append(style)
            level = len(self.styles)
        if level > self.level + 1 and self.strict:
            raise _RstError("section title level inconsistent: %r" % text)
        self.level = level
        return ("h", min(level, 6), text)

    def _list(self, lines, i, depth, nodes, first):
        style, start, n, items = first[0], first[1], len(lines), []
        while i < n:
            item = _rst_list_item(lines[i])
            if not item or item[0] != style:
                break
            first = lines[i][item[2]:]
            block, i = _rst_indented(lines, i + 1)
            items.append(self.parse([first] + block, depth + 1))
        tight = all([nd[0] for nd in it].count("p") <= 1 and all(
            nd[0] in ("p", "list") for nd in it) for it in items)
        nodes.append(("list", start is not None, start or 1, tight, items))
        return i

    def _explicit(self, lines, i, depth, nodes):
        body = lines[i][3:]
        block, j = _rst_indented(lines, i + 1)
        m = _RST_TARGET.match(body)
        if m:
            uri = "".join(x.strip() for x in [body[m.end():]] + block)
            if m.group(1) == "_":
                self.anonymous.append(uri)
            elif uri:
                self.targets.setdefault(_rst_name(m.group(1).strip("`")), uri)
            return j
        m = _RST_SUBST.match(body)
        if m:
            args, options, content = _rst_directive_parts(body[m.end():], block)
            kind = m.group(2).lower()
            if kind == "image":
                self.subs[m.group(1)] = ("img", args, options)
            elif kind == "replace":
                self.subs[m.group(1)] = ("text", " ".join([args] + content).strip())
            return j
        m = _RST_DIRECTIVE.match(body)
        if m:
            self._directive(m.group(1).lower(), body[m.end():], block, nodes, depth)
            return j
        m = re.match(r"\[([^\]\s]{1,40})\](?: +|$)", body)
        if m:  # a footnote or citation
            nodes.append(("dl", [("[%s]" % m.group(1),
                                  self.parse([body[m.end():]] + block, depth + 1))]))
        return j  # anything else is a comment

    def _directive(self, name, first, block, nodes, depth):
        name = name.split(":")[-1]
        if name in _RST_ADMONITIONS:
            title = "See also" if name == "seealso" else name.capitalize()
            content = ([first.strip()] if first.strip() else []) + block
            nodes.append(("div", "admonition " + name, title, self.parse(content, depth + 1)))
            return
        args, options, content = _rst_directive_parts(first, block)
        if name in ("admonition", "topic", "sidebar"):
            nodes.append(("div", "admonition", args, self.parse(content, depth + 1)))
        elif name in ("image", "figure"):
            nodes.append(("raw", lambda: "<p>%s</p>" % self._image(args, options)))
            if name == "figure":
                nodes.extend(self.parse(content, depth + 1))
        elif name in ("code-block", "code", "sourcecode"):
            nodes.append(("code", args.split()[0] if args else "",
                          "\n".join(_rst_dedent(content))))
        elif name == "rubric":
            nodes.append(("p", "**%s**" % args))
        elif name in ("container", "compound", "epigraph", "highlights", "pull-quote",
                      "table", "only", "tab", "class"):
            nodes.extend(self.parse(content, depth + 1))
        # raw, include, contents, toctree, meta, unknown ones...: skipped, never run

    def _grid_table(self, lines, i, nodes):
        j, n = i, len(lines)
        while j < n and lines[j][:1] in ("+", "|"):
            j += 1
        cols = [k for k, c in enumerate(lines[i]) if c == "+"]
        heads, rows, cur = [], [], None
        for line in lines[i + 1:j]:
            if line[0] == "+":
                if cur is not None:
                    rows.append(["\n".join(x for x in cell if x) for cell in cur])
                if "=" in line and not heads:
                    heads, rows = rows, []
                cur = None
                continue
            cur = [] if cur is None else cur
            # only the columns the line reaches: a short line under a wide border is no work
            reach = min(len(cols) - 1, bisect.bisect_left(cols, len(line) - 1))
            cur.extend([] for _ in range(reach - len(cur)))
            for k in range(reach):
                cur[k].append(line[cols[k] + 1:cols[k + 1]].strip(" |"))
        width = len(cols) - 1
        _pad_table_rows(heads + rows, width, sum(len(line) for line in lines[i:j]))
        nodes.append(("table", [None] * width, heads, rows))
        return j

    def _simple_table(self, lines, i, nodes):
        cols = [m.start() for m in re.finditer(r"=+", lines[i])]
        heads, rows, j, n = [], [], i + 1, len(lines)
        while j < n:
            line = lines[j]
            j += 1
            if _RST_SIMPLE.match(line):
                if j >= n or not lines[j]:
                    break
                heads, rows = rows, []
            elif line:  # the columns the line reaches (the last takes the rest of it)
                reach = bisect.bisect_left(cols, len(line))
                cells = [line[a:b].strip() for a, b in zip(cols, cols[1:reach] + [len(line)])
                         ] if reach > 1 else [line.strip()]
                if rows and not cells[0]:
                    rows[-1].append(cells)  # a continuation line: joined below, once
                else:
                    rows.append([cells])

        def joined(row_lines):
            if len(row_lines) == 1:
                return row_lines[0]
            cells = [[] for _ in range(max(map(len, row_lines)))]
            for line in row_lines:
                for cell, part in zip(cells, line):
                    if part:
                        cell.append(part)
            return ["\n".join(cell) for cell in cells]
        heads, rows = [joined(r) for r in heads], [joined(r) for r in rows]
        _pad_table_rows(heads + rows, len(cols), sum(len(line) for line in lines[i:j]))
        nodes.append(("table", [None] * len(cols), heads, rows))
        return j

    # inline markup

    def inline(self, text):
        if not _RST_INLINE.search(text):  # as the loop below would, less the work
            self.budget -= bool(text)
            return self._text(text)
        out, pos, n, ends = [], 0, len(text), {}
        while pos < n:
            m = _RST_INLINE.search(text, pos)
            self.budget -= 1
            if not m or self.budget < 0:
                out.append(self._text(text[pos:]))
                break
            p, start = m.start(), m.group()
            if p > pos:
                out.append(self._text(text[pos:p]))
            q = p + len(start)
            if start == "\\":
                c = text[q:q + 1]
                if c and not c.isspace():
                    out.append(_esc_text(c))
                pos = q + 1
                continue
            before = text[p - 1] if p else " "
            if not (before.isspace() or before in _RST_BEFORE) or q >= n or text[q].isspace():
                out.append(_esc_text(start))
                pos = q
                continue
            key = "`" if start[0] == ":" else start
            found = ends.get(key)
            if found is None:
                found = ends[key] = [e.start() for e in _RST_ENDS[key].finditer(text)]
            k = bisect.bisect_left(found, q + 1)
            if k == len(found):
                out.append(_esc_text(start))
                pos = q
                continue
            e = found[k]
            content = text[q:e]
            pos = e + len(key)
            if key == "**":
                out.append("<strong>%s</strong>" % _esc_text(_rst_unescape(content)))
            elif key == "*":
                out.append("<em>%s</em>" % _esc_text(_rst_unescape(content)))
            elif key == "``":
                out.append("<code>%s</code>" % _esc_text(content))
            elif start[0] == ":":
                out.append(self._role(start[1:-2], content))
            else:
                suffix = "__" if text.startswith("__", pos) else "_" if text.startswith(
                    "_", pos) else ""
                pos += len(suffix)
                if key == "|":
                    out.append(self._substitution(content, suffix))
                elif suffix:
                    out.append(self._reference(content, suffix))
                else:
                    out.append("<cite>%s</cite>" % _esc_text(_rst_unescape(content)))
        return "".join(out)

    def _text(self, chunk):
        """Plain text: standalone URLs and ``name_`` references become links."""
        if "_" not in chunk and ":" not in chunk:
            return _esc_text(chunk)
        parts = re.split(r"(\s+)", chunk)
        for idx in range(0, len(parts), 2):
            tok = parts[idx]
            core = tok.lstrip("(\"'<[")
            lead, word = tok[:len(tok) - len(core)], core.rstrip(".,;:!?\"')>]")
            unclosed = word.count("(") - word.count(")")
            if unclosed > 0:  # a ")" stripped above that closes one in the word is kept
                rest = core[len(word):]
                word += ")" * min(unclosed, len(rest) - len(rest.lstrip(")")))
            url, label = None, word
            if word.startswith(("http://", "https://", "mailto:")) and len(word) > 8:
                url = word
            elif word.endswith("_") and re.fullmatch(r"\w[\w.+-]*?__?", word):
                label = word.rstrip("_")
                url = self._anon() if word.endswith("__") else self._target(label)
            if url is None:
                parts[idx] = _esc_text(tok)
            else:
                parts[idx] = "%s<a href=\"%s\">%s</a>%s" % (
                    _esc_text(lead), _esc(url), _esc_text(label), _esc_text(core[len(word):]))
        return "".join(parts)

    def _target(self, name):
        for _ in range(8):  # a target may name another target
            uri = self.targets.get(_rst_name(name))
            if uri is None or not uri.endswith("_") or ":" in uri:
                return uri
            name = uri[:-1].strip("`")
        return None

    def _anon(self):
        self.anon_used += 1
        return (self.anonymous[self.anon_used - 1] if self.anon_used <= len(self.anonymous)
                else None)

    def _reference(self, content, suffix):
        if content.endswith(">") and "<" in content:  # `text <url>`_
            lt = content.rfind("<")
            uri, label = "".join(content[lt + 1:-1].split()), content[:lt].strip() or None
            url = self._target(uri[:-1]) if uri.endswith("_") and ":" not in uri else uri
            label = label or uri
            if suffix == "_" and url:
                self.targets.setdefault(_rst_name(label), url)
        else:
            label = content
            url = self._target(label) if suffix == "_" else self._anon()
        label = _esc_text(_rst_unescape(label))
        return '<a href="%s">%s</a>' % (_esc(url), label) if url else label

    def _substitution(self, name, suffix):
        sub = self.subs.get(name) or self.subs.get(next(
            (k for k in self.subs if k.lower() == name.lower()), None))
        if sub is None:
            return _esc_text("|%s|%s" % (name, suffix))
        if sub[0] == "text":
            return _esc_text(sub[1])
        options = sub[2]
        if suffix and "target" not in options:
            url = self._target(name) if suffix == "_" else self._anon()
            if url:
                return '<a href="%s">%s</a>' % (_esc(url), self._image(sub[1], options))
        return self._image(sub[1], options)

    def _image(self, uri, options):
        uri = "".join(uri.split())
        img = '<img src="%s" alt="%s"' % (_esc(uri), _esc(options.get("alt") or uri))
        for attr in ("width", "height"):
            value = options.get(attr, "")
            if re.fullmatch(r"\d{1,4}(?:px)?|\d{1,3}%", value):
                img += ' %s="%s"' % (attr, value.replace("px", ""))
        if options.get("align") in ("left", "center", "right"):
            img += ' align="%s"' % options["align"]
        img += ">"
        target = options.get("target")
        if target:
            url = self._target(target[:-1].strip("`")) if target.endswith("_") else target
            if url:
                img = '<a href="%s">%s</a>' % (_esc("".join(url.split())), img)
        return img

    def _role(self, role, content):
        role = role.split(":")[-1].lower()
        text = _rst_unescape(content)
        if role in _RST_TEXT_ROLES or role in ("pep", "rfc"):
            if text.endswith(">") and "<" in text:
                text = text[:text.rfind("<")].strip()
            prefix = {"pep": "PEP ", "rfc": "RFC "}.get(role, "")
            return ("<cite>%s</cite>" if role.startswith("t") and role not in (
                "term", "token") else "%s") % _esc_text(prefix + text)
        tag = {"emphasis": "em", "strong": "strong", "sub": "sub", "subscript": "sub",
               "sup": "sup", "superscript": "sup", "abbr": "abbr"}.get(role)
        if tag:
            return "<%s>%s</%s>" % (tag, _esc_text(text), tag)
        if text.endswith(">") and "<" in text:
            text = text[:text.rfind("<")].strip()
        if text.startswith("~"):
            text = text[1:].rsplit(".", 1)[-1]
        return "<code>%s</code>" % _esc_text(text)


# --- the sanitizer -------------------------------------------------------------------

_SAN_ALIGN = ("align",)
_SAN_TAGS = {  # tag -> attributes kept (besides title); anything else is dropped
    "a": ("href",), "abbr": (), "b": (), "blockquote": (), "br": (), "caption": (),
    "cite": (), "code": ("class",), "dd": (), "del": (), "details": ("open",),
    "div": ("class", "align"), "dl": (), "dt": (), "em": (), "figcaption": (), "figure": (),
    "h1": _SAN_ALIGN, "h2": _SAN_ALIGN, "h3": _SAN_ALIGN, "h4": _SAN_ALIGN, "h5": _SAN_ALIGN,
    "h6": _SAN_ALIGN, "hr": (), "i": (), "img": ("src", "alt", "width", "height", "align"),
    "ins": (), "kbd": (), "li": (), "mark": (), "ol": ("start",), "p": ("class", "align"),
    "pre": (), "q": (), "s": (), "samp": (), "small": (), "span": (), "strike": (),
    "strong": (), "sub": (), "summary": (), "sup": (), "table": (), "tbody": (),
    "td": ("align", "colspan", "rowspan"), "tfoot": (), "th": ("align", "colspan", "rowspan"),
    "thead": (), "tr": (), "tt": (), "u": (), "ul": (), "var": (),
}
_SAN_VOID = frozenset("br hr img area base col embed input keygen link meta param source "
                      "track wbr".split())
# dropped with everything inside them (not only the tags)
_SAN_DROP = frozenset("script style iframe object applet noscript noembed noframes template "
                      "textarea title svg math select xmp frameset head".split())
_SAN_CLASSES = frozenset("admonition admonition-title note warning tip hint important "
                         "caution danger attention error seealso".split())
_SAN_MAX_DEPTH = 64
_SAN_URL_JUNK = re.compile("[\x00-\x20\x7f-\xa0\u1680\u180e\u2000-\u200f\u2028-\u202f"
                           "\u205f-\u206f\u3000\ufeff]")
_SAN_DATA_IMAGE = re.compile(r"data:image/(?:png|gif|jpeg|webp)[;,]")
_SAN_NUMBER = re.compile(r"\d{1,4}%?")


def safe_url(url, image=False):
    """The URL as it may appear in href (or img src), or None: http, https, mailto,
    relative and #fragment URLs; for images also data:image/png|gif|jpeg|webp. The scheme
    is judged after entity decoding (HTMLParser's) with whitespace and controls removed."""
    url = re.sub("[\x00-\x1f\x7f]", "", url).strip()
    bare = _SAN_URL_JUNK.sub("", url)
    colon = bare.find(":")
    if colon != -1 and not any(c in bare[:colon] for c in "/?#"):
        scheme = bare[:colon].lower()
        if scheme not in ("http", "https", "mailto") and not (
                image and _SAN_DATA_IMAGE.match(bare.lower())):
            return None
        if image and scheme == "mailto":
            return None
    return url


class _Sanitizer(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.stack, self.skip, self.skip_depth = [], [], None, 0

    def handle_starttag(self, tag, attrs):
        if self.skip:
            self.skip_depth += tag == self.skip
            return
        if tag in _SAN_DROP:
            self.skip, self.skip_depth = tag, 1
            return
        allowed = _SAN_TAGS.get(tag)
        if allowed is None or len(self.stack) >= _SAN_MAX_DEPTH and tag not in _SAN_VOID:
            return
        kept, seen = [], set()
        for name, value in attrs:
            if name in seen or (name not in allowed and name != "title"):
                continue
            seen.add(name)
            value = value or ""
            if name in ("href", "src"):
                value = safe_url(value, image=name == "src")
                if value is None:
                    continue
            elif name in ("width", "height", "colspan", "rowspan", "start"):
                if not _SAN_NUMBER.fullmatch(value.strip()):
                    continue
                value = value.strip()
            elif name == "align":
                value = value.strip().lower()
                if value not in ("left", "right", "center", "justify"):
                    continue
            elif name == "class":
                value = " ".join(c for c in value.split() if c in _SAN_CLASSES or (
                    c.startswith("language-") and re.fullmatch(r"language-[\w+#.-]{1,40}", c)))
                if not value:
                    continue
            elif name == "open":
                kept.append(" open")
                continue
            kept.append(' %s="%s"' % (name, _esc(value)))
        if tag == "img" and not any(k.startswith(' src="') for k in kept):
            return  # an image without an acceptable source is dropped
        if tag == "a":
            kept.append(' rel="nofollow noopener"')
        self.out.append("<%s%s>" % (tag, "".join(kept)))
        if tag not in _SAN_VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if self.skip or tag in _SAN_DROP:
            return  # <svg/> holds nothing
        depth = len(self.stack)
        self.handle_starttag(tag, attrs)
        if len(self.stack) > depth:
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip:
                self.skip_depth -= 1
                if not self.skip_depth:
                    self.skip = None
            return
        if tag in self.stack:
            while True:
                t = self.stack.pop()
                self.out.append("</%s>" % t)
                if t == tag:
                    break

    def handle_data(self, data):
        if not self.skip:
            self.out.append(_esc(data))

    def result(self):
        self.close()
        self.out.extend("</%s>" % t for t in reversed(self.stack))
        return "".join(self.out)


def _san_lex(fragment):
    """The fragment with only complete tags left for HTMLParser: any other "<" becomes text;
    comments, declarations and processing instructions are dropped. (HTMLParser of some
    CPython versions rescans an unfinished construct to the end for each "<" after it.)
    After DESCRIPTION_MAX_TAGS tags, the rest is text: returned apart, as the second of
    the pair, for it needs no parsing (it may be most of a page of tags)."""
    out, pos, n, no_gt, tags = [], 0, len(fragment), False, 0
    while True:
        p = fragment.find("<", pos)
        if p == -1:
            out.append(fragment[pos:])
            break
        if tags >= DESCRIPTION_MAX_TAGS:  # too many tags: the rest is text
            out.append(fragment[pos:p])
            return "".join(out), fragment[p:]
        out.append(fragment[pos:p])
        end = min(n, p + 65536)
        m = _MD_OPEN_TAG.match(fragment, p, end) or _MD_CLOSE_TAG.match(fragment, p, end)
        if m:
            out.append(m.group())
            pos, tags = m.end(), tags + 1
            continue
        if fragment.startswith("<!--", p):
            close = fragment.find("-->", p + 4)
            if close == -1:
                break  # a comment to the end
            pos = close + 3
            continue
        if fragment.startswith(("<!", "<?"), p) and not no_gt:
            close = fragment.find(">", p)
            if close != -1:
                pos = close + 1
                continue
            no_gt = True
        out.append("&lt;")
        pos = p + 1
    return "".join(out), ""


def sanitize_html(fragment):
    """The fragment with only allow-listed tags and attributes, safe URLs,
    ``rel="nofollow noopener"`` on links, everything closed, quoted and escaped; comments,
    scripts, styles, frames, forms and event handlers dropped."""
    s = _Sanitizer()
    head, rest = _san_lex(fragment)
    s.feed(head)
    if rest:
        s.close()  # what was fed, all handled; then the rest is text where the parser stands
        s.handle_data(rest)
    return s.result()


# ===================================================================================
# 4. storage
# ===================================================================================

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    pwhash TEXT NOT NULL,
    config TEXT NOT NULL,           -- JSON: email, title, description, custom_data
    created TEXT NOT NULL,
    modified TEXT
);
CREATE TABLE IF NOT EXISTS indexes (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name TEXT NOT NULL,
    config TEXT NOT NULL,           -- JSON, devpi's index config
    UNIQUE (user, name)
);
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    name TEXT NOT NULL,             -- PEP 503 normalised
    display TEXT NOT NULL,          -- as first uploaded
    UNIQUE (index_id, name)
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    project_id INTEGER NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    version TEXT NOT NULL,
    metadata TEXT NOT NULL,         -- JSON, core metadata as devpi keeps it
    yanked TEXT,                    -- NULL, or the reason ('' for none given)
    created REAL NOT NULL,
    UNIQUE (project_id, version)
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    rel TEXT NOT NULL,              -- releasefile, doczip, toxresult
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    uploaded REAL NOT NULL,         -- PEP 700 upload-time
    requires_python TEXT NOT NULL DEFAULT '',
    core_metadata TEXT,             -- sha256 of the PEP 658 metadata blob, or NULL
    for_filename TEXT,              -- a toxresult's release file
    log TEXT NOT NULL DEFAULT '[]', -- JSON, devpi's upload/push/overwrite log
    UNIQUE (index_id, filename)
);
CREATE INDEX IF NOT EXISTS files_version ON files(version_id);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE INDEX IF NOT EXISTS files_core_metadata ON files(core_metadata);
-- (schema 4) a release file's tox results, found without a walk of the index's files
CREATE INDEX IF NOT EXISTS files_for_filename ON files(for_filename)
    WHERE for_filename IS NOT NULL;
CREATE TABLE IF NOT EXISTS mirror_pages (  -- cached upstream project pages (a cache)
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    project TEXT NOT NULL,          -- normalised
    fetched REAL NOT NULL,          -- when upstream last confirmed it
    status INTEGER NOT NULL,        -- 200, or 404 for a project upstream does not have
    etag TEXT,
    last_modified TEXT,
    display TEXT,
    files TEXT NOT NULL,            -- JSON list of the upstream's files
    PRIMARY KEY (index_id, project)
);
CREATE TABLE IF NOT EXISTS project_status (  -- PEP 792 status of a project on an index
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    project TEXT NOT NULL,          -- normalised
    status TEXT NOT NULL,           -- archived, quarantined, deprecated (active: no row)
    reason TEXT,                    -- or NULL; on a mirror both are upstream's
    PRIMARY KEY (index_id, project)
);
CREATE TABLE IF NOT EXISTS provenance (  -- PEP 740 documents kept with mirrored files
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    project TEXT NOT NULL,          -- normalised
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,           -- the blob holding the document as upstream gave it
    PRIMARY KEY (index_id, filename)
);
CREATE TABLE IF NOT EXISTS yank_history (  -- PEP 592 states of a release over time
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    at REAL,                        -- NULL: the state before the first recorded change
    yanked TEXT                     -- NULL (not yanked), or the reason ('' for none)
);
CREATE INDEX IF NOT EXISTS yank_history_version ON yank_history(version_id);
CREATE TABLE IF NOT EXISTS tokens (  -- devpi-tokens' tokens (macaroons), schema 3
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    id TEXT NOT NULL,
    key TEXT NOT NULL,              -- random; the root key is derived from it and pwhash
    restrictions TEXT NOT NULL,     -- JSON list of the caveats it was created with
    created TEXT NOT NULL,
    PRIMARY KEY (user, id)
);
CREATE TABLE IF NOT EXISTS gone (  -- deleted files: their URLs answer 410
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (index_id, filename, sha256)
);
CREATE TABLE IF NOT EXISTS search (  -- one row a project of an index (SearchIndex; derived)
    project_id INTEGER PRIMARY KEY REFERENCES projects(id) ON DELETE CASCADE,
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    name TEXT NOT NULL,             -- normalised
    display TEXT NOT NULL,
    version TEXT NOT NULL,          -- the latest (PEP 440; a final release before a pre-release)
    summary TEXT NOT NULL,
    keywords TEXT NOT NULL,
    words TEXT NOT NULL,            -- the description's distinct words, lower case
    uploaded REAL
);
CREATE INDEX IF NOT EXISTS search_name ON search(name);
CREATE INDEX IF NOT EXISTS search_index_name ON search(index_id, name);
CREATE TABLE IF NOT EXISTS audit (  -- the audit log, schema 4: appended by Model.audit only
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- increases, never reused
    at REAL NOT NULL,               -- epoch seconds; never less than the row before's
    actor TEXT NOT NULL,            -- user name, ':anonymous:' or '(command line)'
    action TEXT NOT NULL,           -- user.create, index.modify, file.upload, ...
    index_path TEXT,                -- 'user/name' the change is on, or NULL
    project TEXT,                   -- normalised, or NULL
    record TEXT NOT NULL            -- the JSON line /+audit answers
);
CREATE INDEX IF NOT EXISTS audit_at ON audit(at, id);
CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor, id);
CREATE INDEX IF NOT EXISTS audit_action ON audit(action, id);
CREATE INDEX IF NOT EXISTS audit_index ON audit(index_path, id);
CREATE INDEX IF NOT EXISTS audit_project ON audit(project, id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS first_hashes (  -- the first sha256 an index kept under a name, schema 4
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (index_id, filename)
);
CREATE INDEX IF NOT EXISTS first_hashes_filename ON first_hashes(filename);
CREATE TABLE IF NOT EXISTS upstream_changes (  -- a mirror's kept files upstream removed or
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,  -- replaced, schema 4
    project TEXT NOT NULL,          -- normalised
    filename TEXT NOT NULL,
    what TEXT NOT NULL,             -- 'removed' (not listed any more) or 'replaced'
    since REAL NOT NULL,            -- when a refresh first saw it
    sha256 TEXT,                    -- 'replaced': the hash upstream lists now
    PRIMARY KEY (index_id, filename)
);
CREATE INDEX IF NOT EXISTS upstream_changes_project ON upstream_changes(index_id, project);
"""
# What a migration to schema 4 fills in (bounded: one pass over the files table, once).
FILL_FIRST_HASHES = ("INSERT INTO first_hashes SELECT index_id, filename, sha256 "
                     "FROM files WHERE rel='releasefile' ORDER BY id ON CONFLICT DO NOTHING")


def audit_line(id, record):
    """The JSON line (text, newline ended) of the stored audit ``record`` (JSON text of an
    object) with its ``id`` first: what /+audit answers and an export's audit.jsonl holds."""
    return '{"id": %d, %s\n' % (id, record[1:])


class Store:
    """The server directory: one SQLite database, a secret, content-addressed blobs.

    Reads use one connection per thread; writes are serialised by a lock and run in one
    ``BEGIN IMMEDIATE`` transaction each, so a crash loses at most the unfinished change.
    Blob files are complete on disk (written to a temporary name, flushed, renamed)
    before any row that names them is committed.
    """

    def __init__(self, serverdir):
        self.serverdir = os.path.abspath(serverdir)
        self.db_path = os.path.join(self.serverdir, DB_NAME)
        self.files_dir = os.path.join(self.serverdir, FILES_DIR)
        self.tmp_dir = os.path.join(self.serverdir, TMP_DIR)
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._conns = []
        self._idle = []
        self._conns_lock = threading.Lock()
        self._lock_file = None
        # seconds of sys.setswitchinterval while a write waits or runs (None: left alone;
        # the serve command sets WRITE_SWITCH_INTERVAL): see _write_turns
        self.write_switch_interval = None
        self._writers = 0  # writes waiting for the write lock or holding it
        self._writers_lock = threading.Lock()
        self._saved_switch_interval = None
        # each blob is fsynced before it is named; an import, which builds a whole new
        # server beside its target, turns this off and syncs everything once at the end
        self.sync_each_blob = True

    # -- life cycle ---------------------------------------------------------------

    def is_initialised(self):
        return os.path.exists(self.db_path)

    def create(self):
        """Create the directory layout and an empty database. Refuses an initialised dir."""
        if self.is_initialised():
            raise MinidevpiError("server directory %s is already initialised" % self.serverdir)
        os.makedirs(self.serverdir, exist_ok=True)
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.lock()
        secret_path = os.path.join(self.serverdir, SECRET_NAME)
        if not os.path.exists(secret_path):
            fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
                f.flush()
                os.fsync(f.fileno())
        conn = self._connect()
        with conn:
            conn.executescript(self.schema_sql())
            self.set_meta(conn, "schema_version", str(SCHEMA_VERSION))
            conn.execute("INSERT INTO meta VALUES ('uuid', ?) ON CONFLICT DO NOTHING",
                         (secrets.token_hex(16),))
            conn.execute("INSERT INTO meta VALUES ('serial', '0') ON CONFLICT DO NOTHING")
        conn.close()

    def open(self, readonly=False):
        """Open an initialised server directory: migrate, clean leftovers, load the secret.
        ``readonly`` (export, beside a running server): no migration, no cleaning."""
        if not self.is_initialised():
            raise MinidevpiError("server directory %s is not initialised" % self.serverdir)
        if not readonly:
            self.lock()
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        conn = self.conn()
        self.secret = self._load_secret(conn)
        self.serial = int(conn.execute("SELECT value FROM meta WHERE key='serial'").fetchone()[0])
        version = int(conn.execute(
            "SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise MinidevpiError("server directory was written by a newer minidevpi "
                                 "(schema %d, this one knows %d)" % (version, SCHEMA_VERSION))
        if version < SCHEMA_VERSION and readonly:
            raise MinidevpiError("server directory needs an upgrade: start the server once")
        if version < SCHEMA_VERSION:
            # migrations so far only add tables and indexes, which SCHEMA creates if missing
            # (the search rows a new table lacks are filled by SearchIndex.prepare below)
            conn.executescript(self.schema_sql())
            with self.write() as c:
                if version < 4:
                    c.execute(FILL_FIRST_HASHES)
                c.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                          (str(SCHEMA_VERSION),))
        self.uuid = conn.execute("SELECT value FROM meta WHERE key='uuid'").fetchone()[0]
        if not readonly:
            self.clean_tmp()
            SearchIndex(self).prepare()

    def _load_secret(self, conn):
        with open(os.path.join(self.serverdir, SECRET_NAME)) as f:
            return f.read().strip().encode()

    @staticmethod
    def schema_sql():
        """The tables, as this storage's engine spells them."""
        return SCHEMA

    def lock(self):
        """Make this process the one that writes the directory: a second server on it
        would clean the first one's uploads in flight as leftovers. The lock goes with
        the process (or ``close``); a crash leaves nothing to clean up."""
        if self._lock_file is not None:
            return
        f = open(os.path.join(self.serverdir, LOCK_NAME), "a+")
        try:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            f.seek(0)
            pid = f.read(20).strip()
            f.close()
            raise MinidevpiError("server directory %s is in use by another minidevpi "
                                 "process%s" % (self.serverdir, " (pid %s)" % pid if pid else ""))
        f.seek(0)
        f.truncate()
        f.write("%d\n" % os.getpid())
        f.flush()
        self._lock_file = f

    def clean_tmp(self):
        """Remove temporary files left by a crashed process."""
        for name in os.listdir(self.tmp_dir):
            _unlink_quiet(os.path.join(self.tmp_dir, name))

    def close(self):
        with self._conns_lock:
            for c in self._conns:
                try:
                    c.close()
                except sqlite3.Error:
                    pass
            self._conns = []
            self._idle = []
        self._local = threading.local()
        if self._lock_file is not None:
            self._lock_file.close()  # (closing releases the lock)
            self._lock_file = None

    # -- connections and transactions -----------------------------------------------

    def _connect(self):
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=60000")
        conn.execute("PRAGMA cache_size=-1024")  # 1 MiB a connection; the OS caches the rest
        conn.row_factory = sqlite3.Row  # rows by column name (and still by position)
        return conn

    def conn(self):
        """This thread's connection, taken from the idle ones or opened."""
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = self._take_conn()
        return c

    def _take_conn(self):
        with self._conns_lock:
            c = self._idle.pop() if self._idle else None
        if c is None:
            c = self._connect()
            with self._conns_lock:
                self._conns.append(c)
        return c

    def release_conn(self):
        """A thread that ends gives its connection back (threads come and go with client
        connections; SQLite connections should not)."""
        c = getattr(self._local, "conn", None)
        if c is None:
            return
        self._local.conn = None
        with self._conns_lock:
            if len(self._idle) < 8:
                self._idle.append(c)
                return
            if c in self._conns:
                self._conns.remove(c)
        try:
            c.close()
        except sqlite3.Error:
            pass

    @contextlib.contextmanager
    def _write_turns(self):
        """While any write waits for the write lock or holds it, the interpreter switches
        threads every ``write_switch_interval`` seconds instead of every 5 ms. A write
        transaction gives the GIL up at every SQLite statement (~25 for an upload) and
        waits to get it back; with 200 threads serving downloads, each of those waits was
        a full switch interval or several, so one write held the lock for 0.1-1.3 s and
        the writes behind it queued for seconds. Only while writes are about: pages and
        files keep the default (fewer switches, more throughput) the rest of the time."""
        if self.write_switch_interval is None or getattr(self._local, "in_write", False):
            yield
            return
        with self._writers_lock:
            self._writers += 1
            if self._writers == 1:
                self._saved_switch_interval = sys.getswitchinterval()
                sys.setswitchinterval(self.write_switch_interval)
        try:
            yield
        finally:
            with self._writers_lock:
                self._writers -= 1
                if self._writers == 0:
                    sys.setswitchinterval(self._saved_switch_interval)

    @contextlib.contextmanager
    def write(self):
        """One write transaction; bumps the serial. Nested use joins the outer one."""
        c = self.conn()
        with self._write_turns(), self._write_lock:
            if getattr(self._local, "in_write", False):
                yield c
                return
            self._local.in_write = True
            self._local.after_commit = []
            self._local.before_commit = []
            self._local.notes = []
            try:
                self._begin(c)
                try:
                    yield c
                    for fn in self._local.before_commit:
                        fn(c)
                    self.serial = self._commit(c)
                except BaseException:
                    self._rollback(c)
                    raise
                for fn in self._local.after_commit:
                    fn(c)
            finally:
                self._local.in_write = False
                self._local.after_commit = []
                self._local.before_commit = []
                self._local.notes = []

    def _begin(self, c):
        c.execute("BEGIN IMMEDIATE")  # (SQLite: one writer at a time, this one now)

    def _commit(self, c):
        """Bump the serial and commit; returns the new serial."""
        c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='serial'")
        c.execute("COMMIT")
        return self.serial + 1

    def _rollback(self, c):
        c.execute("ROLLBACK")

    def notify(self, note):
        """Tell the other processes that share this storage about a change of the current
        write transaction (a JSON-able ``note``; they get it once it committed, see
        ``listen``). One process owns a SQLite directory: there is nobody to tell."""

    def listen(self, fn):
        """Call ``fn(notes)`` in a thread of its own for each commit another process made
        (``notes``: the list of what it told with ``notify``, None for "anything may have
        changed"). With SQLite no other process writes."""

    # the HTTP layer gives a thread's connection back after each request (PostgreSQL's
    # connections are a bounded pool; a SQLite connection stays with its thread)
    pooled = False
    backend = "SQLite"
    fts5 = True  # (where this sqlite3 has it: SearchIndex probes)

    def fix_ids(self):
        """(PostgreSQL's identity columns; SQLite numbers rows after the largest id.)"""

    @staticmethod
    def rows(c, sql, params=()):
        """The rows of a query over many, a few at a time (an export's walk of a table):
        sqlite3's cursor reads them as they are iterated."""
        return c.execute(sql, params)

    @staticmethod
    def flight_lock(key, wait):
        """A context that holds ``key`` against the other processes sharing the storage
        (at most ``wait`` seconds to get it): none share a SQLite directory."""
        return contextlib.nullcontext()

    def database_size(self):
        size = 0
        for suffix in ("", "-wal"):
            try:
                size += os.stat(self.db_path + suffix).st_size
            except OSError:
                pass
        return size

    def where(self):
        """Where the server's data is, as its status page tells root."""
        return self.serverdir

    def before_commit(self, fn):
        """Run fn(conn) at the end of the current write transaction, in it (derived rows
        of what it changed, written once however many changes it made)."""
        self._local.before_commit.append(fn)

    def after_commit(self, fn):
        """Run fn(conn) once the current write transaction committed (lock still held)."""
        self._local.after_commit.append(fn)

    # -- rows that more than one part writes --------------------------------------------

    @staticmethod
    def set_meta(c, key, value):
        c.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                  "value=excluded.value", (key, value))

    @staticmethod
    def project_status(c, index_id, norm):
        """(status, reason) of a project on an index (PEP 792), or None for active."""
        row = c.execute("SELECT status, reason FROM project_status WHERE index_id=? AND "
                        "project=?", (index_id, norm)).fetchone()
        return (row[0], row[1]) if row is not None else None

    @staticmethod
    def set_project_status(c, index_id, norm, status):
        """Store ``status``, a (status, reason) or None for active."""
        c.execute("DELETE FROM project_status WHERE index_id=? AND project=?", (index_id, norm))
        if status is not None:
            c.execute("INSERT INTO project_status VALUES (?,?,?,?)",
                      (index_id, norm) + tuple(status))

    @staticmethod
    def insert_index(c, user, name, config):
        """A new index row (``config``: a dict); returns its id."""
        return c.execute("INSERT INTO indexes (user, name, config) VALUES (?,?,?)",
                         (user, name, json.dumps(config))).lastrowid

    @staticmethod
    def insert_file(c, index_id, version_id, filename, rel, sha256, size, uploaded,
                    requires_python="", core_metadata=None, for_filename=None, log=(),
                    replace=False):
        """A file row, its bytes already in place; its URL is no longer a deleted file's.
        ``replace``: a row of the same name on the index goes (else that is an error)."""
        if replace:
            c.execute("DELETE FROM files WHERE index_id=? AND filename=?", (index_id, filename))
        c.execute(
            "INSERT INTO files (index_id, "
            "version_id, filename, rel, sha256, size, uploaded, requires_python, "
            "core_metadata, for_filename, log) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (index_id, version_id, filename, rel, sha256, size, uploaded, requires_python,
             core_metadata, for_filename, json.dumps(list(log))))
        c.execute("DELETE FROM gone WHERE index_id=? AND filename=? AND sha256=?",
                  (index_id, filename, sha256))
        if rel == "releasefile":  # (no silent substitution: the first hash is remembered)
            c.execute("INSERT INTO first_hashes VALUES (?,?,?) ON CONFLICT DO NOTHING",
                      (index_id, filename, sha256))

    @staticmethod
    def insert_audit(c, at, actor, action, index_path, project, record, id=None):
        """An audit record (``record``: a dict without its id, which the row gives it);
        ``id``: an imported record's own. Rows are only ever added (see Model.audit)."""
        row = (at, actor, action, index_path, project, json.dumps(record))  # (ASCII)
        if id is None:  # (numbered by the table, as rows of the log come)
            c.execute("INSERT INTO audit (at, actor, action, index_path, project, record) "
                      "VALUES (?,?,?,?,?,?)", row)
        else:
            c.execute("INSERT INTO audit (id, at, actor, action, index_path, project, "
                      "record) VALUES (?,?,?,?,?,?,?)", (id,) + row)

    # -- blobs ------------------------------------------------------------------------

    def _blob_file(self, sha256):
        """Where the blob ``sha256`` lies in this server directory."""
        return os.path.join(self.files_dir, sha256[:2], sha256[2:4], sha256)

    def blob_path(self, sha256):
        """The file to read the blob ``sha256`` from (it may not exist: no such blob)."""
        return self._blob_file(sha256)

    def new_tmp(self):
        fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-")
        return os.fdopen(fd, "wb"), path

    def place_blob(self, tmp_path, sha256):
        """Move a complete temporary file into its content address (fsynced first)."""
        dest = self._blob_file(sha256)
        if os.path.exists(dest):
            self._share_blob(sha256, dest)
            _unlink_quiet(tmp_path)
            return dest
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if self.sync_each_blob:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dest)
        self._share_blob(sha256, dest)
        return dest

    def _share_blob(self, sha256, path):
        """Make a blob about to be named by a row readable by every process that shares
        this storage (in the current write transaction, if any). A SQLite directory's
        blobs are its own files already."""

    def stage_blob(self, tmp_path, sha256):
        """Put a complete temporary file (fsynced already, if ``sync_each_blob``) at its
        content address ahead of the write transaction whose row will name it: a hard
        link, so the temporary file stays, and ``place_blob`` in that transaction finds the
        blob in place and only drops the temporary name. The file system's work then
        waits under no write lock. Should the blob go meanwhile (another transaction
        dropped an unused blob of the same bytes), ``place_blob`` puts it back from the
        temporary file. Where hard links fail, it is all left to ``place_blob``."""
        dest = self._blob_file(sha256)
        if os.path.exists(dest):
            return
        try:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.chmod(tmp_path, 0o644)
            os.link(tmp_path, dest)
        except OSError:
            pass

    def put_bytes(self, data):
        """Store bytes as a blob; returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        path = self._blob_file(sha)
        if os.path.exists(path):
            self._share_blob(sha, path)
        else:
            f, tmp = self.new_tmp()
            with f:
                f.write(data)
            self.place_blob(tmp, sha)
        return sha

    def drop_unused_blobs(self, shas):
        """After the current transaction commits, unlink blobs no row refers to."""
        shas = set(s for s in shas if s)
        if shas:
            self.after_commit(lambda c: self._drop_blobs(c, shas))

    def _drop_blobs(self, c, shas):
        for sha in shas:
            if c.execute("SELECT 1 FROM files WHERE sha256=? OR core_metadata=? LIMIT 1",
                         (sha, sha)).fetchone() is None:
                _unlink_quiet(self._blob_file(sha))


# -- PostgreSQL: the same tables on a database several processes share -----------------
#
# ``--storage pg8000[:host=H,port=P,database=D,user=U,password=PW,unix_sock=S,ssl_...]``
# (devpi-postgresql's own spelling) or ``--pg-url postgresql://user:pw@host:port/db``. The
# SQL above is the SQL PostgreSQL runs: upserts (ON CONFLICT) and the rest are spelled as
# both engines take them, and the few differences have one owner, ``pg_statement`` (a
# statement's placeholders, the column named "user" that PostgreSQL reserves, the id an
# INSERT gave its row) and ``pg_schema`` (the types, the audit log's triggers). Every
# process keeps a server directory of its own for what is local: a cache of the blobs (the
# bytes live in the database, so that it is the only state processes share), temporary
# files and its lock.

PG_SETTINGS = ("database", "host", "port", "unix_sock", "user", "password",
               "ssl_check_hostname", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
PG_DEFAULTS = {"host": "localhost", "port": 5432, "database": "devpi"}  # devpi-postgresql's
PG_CHANNEL = "minidevpi"       # LISTEN/NOTIFY channel of the commits (Store.listen)
PG_WRITE_LOCK = 0x6D696E6964   # advisory lock every write transaction holds to its commit
PG_MAX_CONNECTIONS = 32        # a process's connections; a request waits for a free one
PG_CONNECTION_WAIT = 30        # seconds a request waits for a connection before a 503
PG_CHUNK = 1024 * 1024         # bytes of a blob one row of blob_chunks holds
PG_NOTE_MAX = 7000             # bytes of a commit's notification (PostgreSQL: < 8000)
PG_FETCH = 2000                # rows a cursor fetches at a time (Store.rows)
PG_ONLY_TABLES = """
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blob_chunks (
    sha256 TEXT NOT NULL, n INTEGER NOT NULL, data BYTEA NOT NULL, PRIMARY KEY (sha256, n));
CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
DROP TRIGGER IF EXISTS audit_no_change ON audit;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE PROCEDURE audit_append_only();
"""


def parse_storage(spec, pg_url=None):
    """The pg8000 connection settings of ``--storage``/``--pg-url``, or None for SQLite
    (``spec`` None or 'sqlite' and no URL). ValueError says what is wrong."""
    if spec in (None, "", "sqlite"):
        if pg_url:
            spec = "pg8000"
        else:
            return None
    kind, _, rest = spec.partition(":")
    if kind != "pg8000":
        raise ValueError("--storage %s: minidevpi stores in sqlite (the default) or "
                         "pg8000 (PostgreSQL)" % spec)
    settings = dict(PG_DEFAULTS)
    if pg_url:
        u = urllib.parse.urlsplit(pg_url)
        if u.scheme not in ("postgresql", "postgres") or u.query or u.fragment:
            raise ValueError("--pg-url %s: expected postgresql://USER[:PASSWORD]@HOST[:PORT]"
                             "/DATABASE" % re.sub(r":[^:@/]*@", ":***@", pg_url))
        try:
            port = u.port
        except ValueError:
            raise ValueError("--pg-url: the port is not a number")
        for key, value in (("user", u.username), ("password", u.password),
                           ("host", u.hostname), ("port", port),
                           ("database", u.path.lstrip("/"))):
            if value:
                settings[key] = urllib.parse.unquote(value) if isinstance(value, str) \
                    else value
    for item in rest.split(",") if rest else ():
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in PG_SETTINGS:
            raise ValueError("--storage pg8000: %r is not one of %s" % (
                item, ", ".join(k + "=..." for k in PG_SETTINGS)))
        settings[key] = value
    try:
        settings["port"] = int(settings["port"])
    except ValueError:
        raise ValueError("--storage pg8000: port=%s is not a number" % settings["port"])
    if "unix_sock" in settings:
        settings.pop("host", None)
    settings.setdefault("user", getpass.getuser())
    return settings


def open_store(serverdir, storage=None, pg_url=None):
    """The Store of ``serverdir``: SQLite in it, or (``storage`` a pg8000 spec, or the
    settings parse_storage made of one) PostgreSQL with ``serverdir`` as this process's
    local directory."""
    if isinstance(storage, dict):
        return PgStore(serverdir, storage)
    try:
        settings = parse_storage(storage, pg_url)
    except ValueError as e:
        raise MinidevpiError(str(e))
    return Store(serverdir) if settings is None else PgStore(serverdir, settings)


_PG_LITERAL = re.compile(r"('(?:[^']|'')*')")
_PG_USER = re.compile(r'(?<![\w"])user(?![\w"])')
_PG_INSERT = re.compile(r"\s*INSERT INTO (\w+)", re.I)
# the tables whose rows an INSERT numbers (sqlite3's lastrowid: RETURNING id here)
_PG_ID_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+) \(\s*id INTEGER "
                                     r"PRIMARY KEY", re.sub(r"--[^\n]*", "", SCHEMA)))


@functools.lru_cache(maxsize=2048)
def pg_statement(sql):
    """(statement, returns_id): ``sql`` as the code above writes it (SQLite's), as
    PostgreSQL takes it: ``?`` placeholders numbered, the column ``user`` quoted (a
    reserved word there), an INSERT into a table of numbered rows given ``RETURNING id``
    (what ``lastrowid`` reads), and a bare BEGIN (a reader's one snapshot: SQLite's WAL
    gives one) REPEATABLE READ. Text in quotes is left as it is."""
    parts = _PG_LITERAL.split(sql)
    n = 0
    for i in range(0, len(parts), 2):
        part = _PG_USER.sub('"user"', parts[i])
        pieces = part.split("?")
        for j in range(1, len(pieces)):
            n += 1
            pieces[j] = "$%d%s" % (n, pieces[j])
        parts[i] = "".join(pieces)
    stmt = "".join(parts)
    if stmt.strip().upper() == "BEGIN":
        return "BEGIN ISOLATION LEVEL REPEATABLE READ", False
    m = _PG_INSERT.match(stmt)
    if m and m.group(1) in _PG_ID_TABLES and "RETURNING" not in stmt.upper():
        return stmt + " RETURNING id", True
    return stmt, False


def pg_schema():
    """SCHEMA as PostgreSQL spells it: 64-bit integers and floats, text compared byte by
    byte as SQLite does (COLLATE "C": pages list in the same order on both), numbered ids
    as identity columns, yank_history's implicit SQLite rowid made a column (a release's
    yank states are read in the order they were written), the audit log's triggers in
    PL/pgSQL, and the tables of the blobs' bytes."""
    s = re.sub(r"--[^\n]*", "", SCHEMA)
    s = re.sub(r"CREATE TRIGGER .*?END;", "", s, flags=re.S)
    s = re.sub(r"\bid INTEGER PRIMARY KEY( AUTOINCREMENT)?",
               "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", s)
    s = re.sub(r"\bINTEGER\b", "BIGINT", s)
    s = re.sub(r"\bREAL\b", "DOUBLE PRECISION", s)
    s = re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', s)
    s = re.sub(r"(CREATE TABLE IF NOT EXISTS yank_history \([^;]*?)\n\);",
               r"\1,\n    rowid BIGINT GENERATED BY DEFAULT AS IDENTITY\n);", s)
    return _PG_USER.sub('"user"', s) + PG_ONLY_TABLES


class AlreadyInitialised(MinidevpiError):
    """Another process initialised the database first (serve processes started together
    on a new one: the others join it)."""


def _import_pg8000():
    try:
        import pg8000.native
    except ImportError:
        raise MinidevpiError("--storage pg8000 needs the pg8000 package (pure Python, no "
                             "other dependency): pip install pg8000")
    return pg8000


class PgRow(tuple):
    """A row by position and by column name, as sqlite3.Row answers."""
    names = {}

    def __getitem__(self, key):
        if key.__class__ is str:
            return tuple.__getitem__(self, self.names[key])
        return tuple.__getitem__(self, key)

    def keys(self):
        return list(self.names)


_PG_ROW_TYPES = {}


def _pg_row_type(columns):
    names = tuple(col["name"] for col in columns)
    cls = _PG_ROW_TYPES.get(names)
    if cls is None:
        if len(_PG_ROW_TYPES) > 1000:
            _PG_ROW_TYPES.clear()
        cls = _PG_ROW_TYPES[names] = type("PgRow", (PgRow,), {
            "names": {n: i for i, n in enumerate(names)}, "__slots__": ()})
    return cls


class PgResult:
    """What a statement answered, read as a sqlite3 cursor is."""

    def __init__(self, rows, rowcount, lastrowid=None):
        self._rows = rows
        self._at = 0
        self.rowcount = rowcount
        self.lastrowid = lastrowid

    def fetchone(self):
        if self._at >= len(self._rows):
            return None
        self._at += 1
        return self._rows[self._at - 1]

    def fetchall(self):
        rest = self._rows[self._at:]
        self._at = len(self._rows)
        return rest

    def __iter__(self):
        return iter(self.fetchall())


class PgConnection:
    """A pg8000 connection that answers as the sqlite3 one the code above uses: execute
    (``?`` placeholders), executemany, executescript, rows by name and position, rowcount
    and lastrowid; errors raised as sqlite3's (an integrity error as IntegrityError), so
    the model catches one kind whatever the engine."""

    row_factory = None  # (set by callers that want plain tuples: rows are tuples already)

    def __init__(self, raw, pg8000):
        self.raw = raw
        self._pg8000 = pg8000
        self.broken = False

    def cursor(self):
        return self

    def execute(self, sql, params=()):
        stmt, returns_id = pg_statement(sql)
        vals = tuple(int(v) if v.__class__ is bool else v for v in params)
        try:
            ctx = self.raw.execute_unnamed(stmt, vals=vals)
        except self._pg8000.exceptions.DatabaseError as e:
            raise self._error(e)
        except (self._pg8000.exceptions.InterfaceError, OSError) as e:
            self.broken = True
            raise sqlite3.OperationalError("PostgreSQL connection lost: %s" % e)
        rows = ctx.rows
        if rows is None:
            return PgResult([], ctx.row_count)
        if returns_id:
            return PgResult([], ctx.row_count, rows[0][0] if rows else None)
        cls = _pg_row_type(ctx.columns)
        return PgResult([cls(r) for r in rows], ctx.row_count)

    def executemany(self, sql, seq):
        for params in seq:
            self.execute(sql, params)

    def executescript(self, script):
        try:
            self.raw.execute_simple(script)
        except self._pg8000.exceptions.DatabaseError as e:
            raise self._error(e)

    @staticmethod
    def _error(e):
        info = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
        msg = info.get("M") or str(e)
        if str(info.get("C", "")).startswith("23"):
            return sqlite3.IntegrityError(msg)
        return sqlite3.OperationalError(msg)

    def close(self):
        try:
            self.raw.close()
        except Exception:
            pass


class PgStore(Store):
    """The Store on PostgreSQL (``--storage pg8000``), which several ``serve`` processes,
    on one machine or several, share.

    Every write transaction holds one advisory lock to its commit: writes are one at a
    time across all processes, as SQLite's are in one, so the model's checks hold as they
    do there; reads run side by side on their own connections (a bounded pool). Each
    commit notifies the other processes (LISTEN/NOTIFY) of what changed, and they forget
    the same cached pages the writer does. A blob's bytes are rows of blob_chunks, in the
    database before the row that names them commits; each process copies a blob into its
    own directory the first time it serves it, and sends it from there with sendfile.
    """

    pooled = True

    def __init__(self, serverdir, settings):
        super().__init__(serverdir)
        self.settings = settings
        self.db_path = None
        self._pg8000 = _import_pg8000()
        self._slots = threading.BoundedSemaphore(PG_MAX_CONNECTIONS)
        self._holders = {}  # thread ident -> (thread, connection) for each slot taken
        self._lock_idle = []  # connections flight_lock holds its locks on, idle
        self._listeners = []
        self._listener = None
        self._stopping = threading.Event()
        self.instance = secrets.token_hex(8)  # (a process's own notifications: skipped)

    def __str__(self):
        s = self.settings
        return "postgresql://%s@%s/%s" % (s.get("user"), s.get("unix_sock") or "%s:%s" % (
            s.get("host"), s.get("port")), s.get("database"))

    # -- life cycle ---------------------------------------------------------------

    def is_initialised(self):
        c = self._connect()
        try:
            return c.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]
        finally:
            c.close()

    def create(self):
        os.makedirs(self.serverdir, exist_ok=True)
        os.makedirs(self.files_dir, exist_ok=True)
        os.makedirs(self.tmp_dir, exist_ok=True)
        self.lock()
        try:
            self._create()
        except AlreadyInitialised:
            self.close()  # (this directory's lock too: the process opens it next)
            raise

    def _create(self):
        c = self._connect()
        try:
            c.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
            c.execute("SELECT pg_advisory_xact_lock(?)", (PG_WRITE_LOCK,))
            if c.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]:
                c.execute("ROLLBACK")
                raise AlreadyInitialised("the database %s is already initialised" % self)
            c.executescript(self.schema_sql())
            self.set_meta(c, "schema_version", str(SCHEMA_VERSION))
            for key, value in (("uuid", secrets.token_hex(16)), ("serial", "0"),
                               ("secret", secrets.token_hex(32))):
                self.set_meta(c, key, value)
            c.execute("COMMIT")
        finally:
            c.close()

    def open(self, readonly=False):
        if os.path.exists(os.path.join(self.serverdir, DB_NAME)):
            raise MinidevpiError("%s holds a SQLite server: give another directory for this "
                                 "process, or move that server onto PostgreSQL with export "
                                 "and import" % self.serverdir)
        os.makedirs(self.serverdir, exist_ok=True)  # (this process's: cache and lock)
        super().open(readonly)

    def destroy(self):
        """Drop every table (an import into this database that failed half way)."""
        c = self._connect()
        try:
            c.executescript("DROP TABLE IF EXISTS %s CASCADE; DROP FUNCTION IF EXISTS "
                            "audit_append_only() CASCADE;" % ", ".join(
                                re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)",
                                           SCHEMA + PG_ONLY_TABLES)))
        finally:
            c.close()

    def _load_secret(self, conn):
        return conn.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0].encode()

    @staticmethod
    def schema_sql():
        return pg_schema()

    backend = "PostgreSQL"
    fts5 = False

    def close(self):
        self._stopping.set()
        if self._listener is not None:
            self._listener.join(5)
            self._listener = None
        super().close()
        with self._conns_lock:
            for c in self._lock_idle:
                c.close()
            self._lock_idle = []
        self._holders = {}
        self._slots = threading.BoundedSemaphore(PG_MAX_CONNECTIONS)

    def database_size(self):
        return self.conn().execute("SELECT pg_database_size(current_database())").fetchone()[0]

    def where(self):
        return "%s (this process's cache: %s)" % (self, self.serverdir)

    @contextlib.contextmanager
    def flight_lock(self, key, wait):
        """An advisory lock on ``key`` (what one process fetches from upstream: a page, a
        file) held on a connection of its own while the work goes on: the same fetch in
        another process waits, then finds the result stored. Waiting longer than ``wait``
        seconds, the work is done here as well (as in one process)."""
        k = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "big",
                           signed=True)
        with self._conns_lock:
            c = self._lock_idle.pop() if self._lock_idle else None
        if c is None:
            c = self._connect()
        held = False
        try:
            c.execute("SET lock_timeout = %d" % max(1, int(wait * 1000)))
            try:
                c.execute("SELECT pg_advisory_lock(?)", (k,))
                held = True
            except sqlite3.OperationalError:
                if c.broken:
                    raise
            yield
        finally:
            try:
                if held:
                    c.execute("SELECT pg_advisory_unlock(?)", (k,))
            except sqlite3.Error:
                pass
            with self._conns_lock:
                if not c.broken and len(self._lock_idle) < 8:
                    self._lock_idle.append(c)
                    c = None
            if c is not None:
                c.close()

    _cursors = itertools.count()

    def rows(self, c, sql, params=()):
        """PostgreSQL answers a query whole: a cursor, fetched PG_FETCH rows at a time,
        inside the transaction ``c`` is in (an export's snapshot)."""
        name = "minidevpi_rows_%d" % next(self._cursors)
        c.execute("DECLARE %s NO SCROLL CURSOR FOR %s" % (name, sql), params)
        try:
            while True:
                batch = c.execute("FETCH %d FROM %s" % (PG_FETCH, name)).fetchall()
                if not batch:
                    return
                yield from batch
        finally:
            try:
                c.execute("CLOSE %s" % name)
            except sqlite3.Error:
                pass

    def fix_ids(self):
        """After rows were written with their ids (an import's audit log), the next ids
        come after them."""
        with self.write() as c:
            for table in sorted(_PG_ID_TABLES):
                c.execute("SELECT setval(pg_get_serial_sequence('%s', 'id'), "
                          "GREATEST((SELECT MAX(id) FROM %s), 1))" % (table, table))

    # -- connections and transactions -----------------------------------------------

    def _connect(self):
        kw = {k: v for k, v in self.settings.items() if not k.startswith("ssl_")}
        if any(k.startswith("ssl_") for k in self.settings):
            import ssl
            ctx = ssl.create_default_context(cafile=self.settings.get("ssl_ca_certs"))
            if self.settings.get("ssl_certfile"):
                ctx.load_cert_chain(self.settings["ssl_certfile"],
                                    self.settings.get("ssl_keyfile"))
            if self.settings.get("ssl_check_hostname", "true").lower() in ("0", "false", "no"):
                ctx.check_hostname = False
            kw["ssl_context"] = ctx
        try:
            raw = self._pg8000.native.Connection(application_name="minidevpi", **kw)
        except self._pg8000.exceptions.DatabaseError as e:
            raise HTTPError(503, "PostgreSQL at %s refused: %s" % (
                self, PgConnection._error(e)))
        except (self._pg8000.exceptions.InterfaceError, OSError) as e:
            raise HTTPError(503, "PostgreSQL at %s can't be reached: %s" % (self, e))
        c = PgConnection(raw, self._pg8000)
        encoding = c.execute("SHOW server_encoding").fetchone()[0]
        if encoding.upper().replace("-", "") != "UTF8":  # (names, descriptions: any text)
            c.close()
            raise MinidevpiError("the database %s is encoded %s: minidevpi needs UTF8 "
                                 "(createdb --encoding=UTF8 --template=template0)"
                                 % (self, encoding))
        return c

    def conn(self):
        """This thread's connection: taken from the pool (waiting while all are taken)
        until ``release_conn``, which the HTTP layer calls after each request."""
        c = getattr(self._local, "conn", None)
        if c is not None:
            if not c.broken:
                return c
            self._local.conn = None
            self._give_back(threading.get_ident(), c)
        deadline = time.monotonic() + PG_CONNECTION_WAIT
        while not self._slots.acquire(timeout=0.5):
            self._reap()
            if time.monotonic() > deadline:
                raise HTTPError(503, "server busy: all %d database connections are in use, "
                                     "try again" % PG_MAX_CONNECTIONS)
        try:
            c = self._take_conn()
        except BaseException:
            self._slots.release()
            raise
        self._holders[threading.get_ident()] = (threading.current_thread(), c)
        self._local.conn = c
        return c

    def release_conn(self):
        c = getattr(self._local, "conn", None)
        if c is None or getattr(self._local, "in_write", False):
            return
        self._local.conn = None
        self._give_back(threading.get_ident(), c)

    def _give_back(self, ident, c):
        if self._holders.pop(ident, None) is None:
            return
        with self._conns_lock:
            if not c.broken:
                self._idle.append(c)
            elif c in self._conns:
                self._conns.remove(c)
        if c.broken:
            c.close()
        self._slots.release()

    def _reap(self):
        """Give back the connections of threads that ended without giving them back."""
        for ident, (thread, c) in list(self._holders.items()):
            if not thread.is_alive():
                self._give_back(ident, c)

    def _begin(self, c):
        c.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        c.execute("SELECT pg_advisory_xact_lock(?)", (PG_WRITE_LOCK,))

    def _commit(self, c):
        serial = int(c.execute(
            "UPDATE meta SET value = CAST(CAST(value AS BIGINT) + 1 AS TEXT) "
            "WHERE key='serial' RETURNING value").fetchone()[0])
        note = json.dumps([self.instance, serial, self._local.notes], separators=(",", ":"))
        if len(note) > PG_NOTE_MAX:
            note = json.dumps([self.instance, serial, None])
        c.execute("SELECT pg_notify(?, ?)", (PG_CHANNEL, note))
        c.execute("COMMIT")
        return serial

    def _rollback(self, c):
        try:
            c.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def notify(self, note):
        if getattr(self._local, "in_write", False):
            self._local.notes.append(note)

    def listen(self, fn):
        self._listeners.append(fn)
        if self._listener is None:
            self._stopping.clear()
            self._listener = threading.Thread(target=self._listen, name="minidevpi-listen",
                                              daemon=True)
            self._listener.start()

    def _listen(self):
        """One connection that LISTENs; every commit of another process is told to the
        listeners (after a lost connection, "anything may have changed")."""
        import select
        while not self._stopping.is_set():
            c = None
            try:
                c = self._connect()
                c.raw.run("LISTEN %s" % PG_CHANNEL)
                self._heard(None)
                sock = getattr(c.raw, "_usock", None)
                while not self._stopping.is_set():
                    if sock is not None:
                        select.select([sock], [], [], 0.5)
                    else:
                        self._stopping.wait(0.05)
                    c.raw.run("SELECT 1")  # (reads the notifications that came)
                    got = list(c.raw.notifications)
                    c.raw.notifications.clear()
                    if len(got) >= (c.raw.notifications.maxlen or 1 << 30):
                        self._heard(None)  # (some may have been dropped)
                        continue
                    for _pid, _channel, payload in got:
                        self._heard(payload)
            except Exception as e:
                if not self._stopping.is_set():
                    log("WARNING: listening to %s: %s; again in 1 s" % (self, e))
                    self._stopping.wait(1)
            finally:
                if c is not None:
                    c.close()

    def _heard(self, payload):
        notes = None
        if payload is not None:
            try:  # (what another process wrote: anything not of that shape means "anything")
                instance, serial, notes = json.loads(payload)
                serial = int(serial)
                if notes is not None and not all(isinstance(n, list) and n for n in notes):
                    notes = None
            except (ValueError, TypeError):
                instance, serial, notes = None, 0, None
            if instance == self.instance:
                return
            self.serial = max(self.serial, serial)
        for fn in self._listeners:
            try:
                fn(notes)
            except Exception as e:  # (not understood: forget every cached page instead)
                log("WARNING: a change another process made: %s" % e)
                fn(None)

    # -- blobs ------------------------------------------------------------------------

    def blob_path(self, sha256):
        path = self._blob_file(sha256)
        if not os.path.exists(path):
            self._fetch_blob(sha256, path)
        return path

    def _fetch_blob(self, sha256, path):
        """Copy the blob from the database into this process's directory (checked against
        its hash on the way: a damaged copy is never placed)."""
        c = self.conn()
        if c.execute("SELECT 1 FROM blobs WHERE sha256=?", (sha256,)).fetchone() is None:
            return
        f, tmp = self.new_tmp()
        digest = hashlib.sha256()
        with f:
            n = 0
            while True:
                row = c.execute("SELECT data FROM blob_chunks WHERE sha256=? AND n=?",
                                (sha256, n)).fetchone()
                if row is None:
                    break
                f.write(row[0])
                digest.update(row[0])
                n += 1
        if digest.hexdigest() != sha256:
            _unlink_quiet(tmp)
            log("WARNING: the bytes of blob %s in the database do not match it" % sha256)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def _share_blob(self, sha256, path):
        c = self.conn()
        if c.execute("SELECT 1 FROM blobs WHERE sha256=?", (sha256,)).fetchone() is not None:
            return
        own = not getattr(self._local, "in_write", False)
        if own:
            c.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        try:
            size = 0
            with open(path, "rb") as f:
                n = 0
                while True:
                    chunk = f.read(PG_CHUNK)
                    if not chunk and n:
                        break
                    c.execute("INSERT INTO blob_chunks VALUES (?,?,?) ON CONFLICT DO NOTHING",
                              (sha256, n, chunk))
                    size += len(chunk)
                    n += 1
                    if not chunk:
                        break
            c.execute("INSERT INTO blobs VALUES (?,?) ON CONFLICT DO NOTHING", (sha256, size))
            if own:
                c.execute("COMMIT")
        except BaseException:
            if own:
                self._rollback(c)
            raise

    def stage_blob(self, tmp_path, sha256):
        super().stage_blob(tmp_path, sha256)
        self._share_blob(sha256, tmp_path)  # (its bytes travel before the write's lock)

    def _drop_blobs(self, c, shas):
        # (after the commit: a transaction of its own, one at a time with the writes, so
        # that a write placing the same bytes meanwhile finds them gone and puts them back)
        c.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        try:
            c.execute("SELECT pg_advisory_xact_lock(?)", (PG_WRITE_LOCK,))
            for sha in shas:
                if c.execute("SELECT 1 FROM files WHERE sha256=? OR core_metadata=? LIMIT 1",
                             (sha, sha)).fetchone() is None:
                    c.execute("DELETE FROM blob_chunks WHERE sha256=?", (sha,))
                    c.execute("DELETE FROM blobs WHERE sha256=?", (sha,))
                    _unlink_quiet(self._blob_file(sha))
            c.execute("COMMIT")
        except BaseException:
            self._rollback(c)
            raise


# -- the search index: derived rows, kept in step by the model -------------------------

SEARCH_WORDS_CHARS = 8000  # of a description's distinct words, kept for search
SEARCH_MAX_TERMS = 8
SEARCH_RANK_MAX = 2000  # matches ranked by relevance (bm25); beyond, by where they matched
SEARCH_WORD_RE = re.compile(r"\w+", re.UNICODE)


def fts5_available():
    """Whether this interpreter's sqlite3 has FTS5 (probed on an in-memory database)."""
    try:
        c = sqlite3.connect(":memory:")
        try:
            c.execute("CREATE VIRTUAL TABLE probe USING fts5(a)")
        finally:
            c.close()
        return True
    except sqlite3.Error:
        return False


_FTS5 = None


class SearchIndex:
    """One row a project of an index in the ``search`` table: its latest version, summary,
    keywords, upload time and its description's words; with FTS5 (where sqlite3 has it)
    a full-text table over them, kept by triggers. The model writes the rows of the
    projects it changes in the same transaction (``update``), so that search and the index
    pages read what the commit wrote; a directory whose rows do not match its projects
    (new table, an import, FTS5 come or gone) is rebuilt when the server opens it."""

    FTS_TABLE = ("CREATE VIRTUAL TABLE IF NOT EXISTS search_fts USING fts5(name, summary, "
                 "keywords, words, content='search', content_rowid='project_id')")
    _NEW = ("INSERT INTO search_fts(rowid, name, summary, keywords, words) VALUES "
            "(new.project_id, new.name, new.summary, new.keywords, new.words);")
    _OLD = ("INSERT INTO search_fts(search_fts, rowid, name, summary, keywords, words) VALUES "
            "('delete', old.project_id, old.name, old.summary, old.keywords, old.words);")
    FTS_TRIGGERS = (
        ("search_ai", "AFTER INSERT ON search BEGIN " + _NEW + " END"),
        ("search_ad", "AFTER DELETE ON search BEGIN " + _OLD + " END"),
        ("search_au", "AFTER UPDATE ON search BEGIN " + _OLD + " " + _NEW + " END"))

    def __init__(self, store):
        global _FTS5
        if _FTS5 is None:
            _FTS5 = fts5_available()
        self.store = store
        self.fts = _FTS5 and store.fts5

    @property
    def backend(self):
        if self.fts:
            return "SQLite FTS5"
        return "SQL LIKE" + (" (this sqlite3 has no FTS5)" if self.store.fts5 else
                             " on " + self.store.backend)

    def prepare(self):
        """At open: the full-text table and its triggers where FTS5 exists (dropped where
        it does not: an insert must never need a module this interpreter lacks), and a
        rebuild when the rows are not those of the projects."""
        state = "fts5" if self.fts else "like"
        with self.store.write() as c:
            had = c.execute("SELECT value FROM meta WHERE key='search_state'").fetchone()
            if self.fts:
                c.execute(self.FTS_TABLE)
                self._triggers(c, True)
            else:
                self._triggers(c, False)
            self.store.set_meta(c, "search_state", state)
            # what start costs does not grow with the projects: the rows are in step when
            # the newest project has its row (the model writes rows in the transaction that
            # changes a project, an import calls fill; a row goes with its project)
            newest = c.execute("SELECT MAX(id) FROM projects").fetchone()[0]
            has = c.execute("SELECT MAX(project_id) FROM search").fetchone()[0]
            if newest != has or had is None or had[0] != state:
                self.rebuild(c)

    def _triggers(self, c, on):
        if not self.store.fts5:
            return  # (an engine without FTS5 never had them)
        for name, body in self.FTS_TRIGGERS:
            c.execute("DROP TRIGGER IF EXISTS %s" % name)
            if on:
                c.execute("CREATE TRIGGER %s %s" % (name, body))

    def rebuild(self, c):
        """Every row again, from the projects (inside a write transaction); the full-text
        index from the rows, whatever it held before."""
        self._triggers(c, False)
        c.execute("DELETE FROM search")
        last = 0
        while True:
            ids = [r[0] for r in c.execute("SELECT id FROM projects WHERE id>? ORDER BY id "
                                           "LIMIT 500", (last,))]
            if not ids:
                break
            self._write_rows(c, ids)
            last = ids[-1]
        if self.fts:
            c.execute("INSERT INTO search_fts(search_fts) VALUES ('rebuild')")
            self._triggers(c, True)

    def fill(self):
        """Rows for the projects that have none, a few thousand a write transaction: an
        import writes its projects first, then this (memory and each transaction stay
        small, and the server's first start finds the rows in step)."""
        last = 0
        while True:
            with self.store.write() as c:
                for _ in range(4):
                    ids = [r[0] for r in c.execute(
                        "SELECT p.id FROM projects p WHERE p.id>? AND NOT EXISTS (SELECT 1 "
                        "FROM search s WHERE s.project_id=p.id) ORDER BY p.id LIMIT 500",
                        (last,))]
                    if not ids:
                        return
                    self._write_rows(c, ids)
                    last = ids[-1]

    def changed(self, names):
        """The releases of the project ``names`` changed in the current write transaction:
        their rows are written anew at its end."""
        local = self.store._local
        pending = getattr(local, "search_pending", None)
        if pending is None or getattr(local, "search_tx", None) is not local.before_commit:
            pending = local.search_pending = set()
            local.search_tx = local.before_commit
            self.store.before_commit(lambda c: self.update(c, pending))
        pending.update(names)

    def update(self, c, names):
        """The rows of the (normalised) project ``names`` on every index, anew (inside the
        write transaction that changed them)."""
        names = list(set(names))
        c.execute("SAVEPOINT search_rows")
        try:
            for i in range(0, len(names), 500):
                chunk = names[i:i + 500]
                marks = ",".join("?" * len(chunk))
                c.execute("DELETE FROM search WHERE name IN (%s)" % marks, chunk)
                # (by index: the projects table's key is (index_id, name), not name)
                self._write_rows(c, [r[0] for r in c.execute(
                    "SELECT id FROM projects WHERE index_id IN (SELECT id FROM indexes) "
                    "AND name IN (%s)" % marks, chunk)])
        except sqlite3.Error as e:
            # derived rows never cost the change itself: it commits, the rows are rebuilt
            # when the server next opens the directory
            c.execute("ROLLBACK TO search_rows")
            c.execute("DELETE FROM meta WHERE key='search_state'")
            log("WARNING: search rows not updated (%s); rebuilt at the next start" % e)
        c.execute("RELEASE search_rows")

    @staticmethod
    def latest(versions):
        """The version a page shows first: the newest final release, else the newest."""
        if not versions:
            return None
        finals = [v for v in versions if not is_prerelease(v)]
        return max(finals or versions, key=version_key)

    def _write_rows(self, c, project_ids):
        if not project_ids:
            return
        marks = ",".join("?" * len(project_ids))
        versions = {}
        for pid, vid, ver in c.execute(
                "SELECT project_id, id, version FROM versions WHERE project_id IN (%s)"
                % marks, project_ids):
            versions.setdefault(pid, {})[ver] = vid
        rows = []
        for pid, ix_id, name, display in c.execute(
                "SELECT id, index_id, name, display FROM projects WHERE id IN (%s)" % marks,
                project_ids).fetchall():
            vers = versions.get(pid, {})
            latest = self.latest(list(vers))
            meta, uploaded = {}, None
            if latest is not None:
                vid = vers[latest]
                row = c.execute("SELECT metadata, created FROM versions WHERE id=?",
                                (vid,)).fetchone()
                try:
                    meta = json.loads(row[0])
                except ValueError:
                    meta = {}
                up = c.execute("SELECT MAX(uploaded) FROM files WHERE version_id=? AND "
                               "rel='releasefile'", (vid,)).fetchone()[0]
                uploaded = up if up is not None else row[1]
            summary = meta.get("summary") if isinstance(meta.get("summary"), str) else ""
            keywords = meta.get("keywords")
            keywords = " ".join(keywords) if isinstance(keywords, list) else (
                keywords if isinstance(keywords, str) else "")
            description = meta.get("description")
            words = self.words(" ".join((name, display, summary, keywords, description
                                         if isinstance(description, str) else "")))
            rows.append((pid, ix_id, name, display, latest or "", summary[:500],
                         keywords[:500], words, uploaded))
        c.executemany("INSERT INTO search (project_id, index_id, name, display, "
                      "version, summary, keywords, words, uploaded) VALUES (?,?,?,?,?,?,?,?,?)",
                      rows)

    @staticmethod
    def words(text):
        """' w1 w2 ... ' : the distinct words of a text, lower case, in order of first use."""
        seen = {}
        total = 1
        for w in SEARCH_WORD_RE.findall(text[:200000].lower()):
            if w not in seen and len(w) < 40:
                total += len(w) + 1
                if total > SEARCH_WORDS_CHARS:
                    break
                seen[w] = None
        return " " + " ".join(seen) + " "

    COLS = "s.index_id, s.name, s.display, s.version, s.summary, s.uploaded"

    def query(self, text, index_ids, limit=50):
        """[(index id, name, display, version, summary, uploaded)] of the projects on
        ``index_ids`` that match ``text``, best first: the exact (normalised) name, names
        starting with it, then the words of the text in name, summary, keywords and
        description (all of them; the last one may be a prefix), ranked."""
        index_ids = list(index_ids)
        text = (text or "").strip()[:200]
        if not text or not index_ids:
            return []
        c = self.store.conn()
        ixs = ",".join(str(int(i)) for i in index_ids)
        out, seen = [], set()

        def take(rows):
            for r in rows:
                key = (r[0], r[1])
                if key not in seen and len(out) < limit:
                    seen.add(key)
                    out.append(tuple(r[:6]))

        norm = normalize_name(text)
        if norm and " " not in norm:
            take(c.execute("SELECT " + self.COLS + " FROM search s WHERE s.name=? AND "
                           "s.index_id IN (%s)" % ixs, (norm,)))
            take(c.execute("SELECT " + self.COLS + " FROM search s WHERE s.name>? AND "
                           "s.name<? AND s.index_id IN (%s) ORDER BY s.name LIMIT ?" % ixs,
                           (norm, norm + "\uffff", limit)))
        terms = [t for t in SEARCH_WORD_RE.findall(text.lower()) if len(t) < 40]
        terms = terms[:SEARCH_MAX_TERMS]
        if not terms or len(out) >= limit:
            return out
        if self.fts:
            match = " ".join('"%s"' % t for t in terms[:-1]) + ' "%s"*' % terms[-1]
            n = c.execute("SELECT COUNT(*) FROM (SELECT 1 AS one FROM search_fts WHERE search_fts "
                          "MATCH ? LIMIT ?)", (match, SEARCH_RANK_MAX + 1)).fetchone()[0]
            if n <= SEARCH_RANK_MAX:
                tiers = [(match, "ORDER BY bm25(search_fts, 10.0, 5.0, 5.0, 1.0)")]
            else:  # words too common to rank every match: where they say most, first
                tiers = [("{name summary keywords} : (%s)" % match, ""), (match, "")]
            for expr, order in tiers:
                ids = [r[0] for r in c.execute(
                    "SELECT rowid FROM search_fts WHERE search_fts MATCH ? %s LIMIT ?" % order,
                    (expr, SEARCH_RANK_MAX))]
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    rows = {r[0]: r[1:] for r in c.execute(
                        "SELECT s.project_id, " + self.COLS + " FROM search s WHERE "
                        "s.project_id IN (%s) AND s.index_id IN (%s)"
                        % (",".join(str(int(x)) for x in chunk), ixs))}
                    take(rows[x] for x in chunk if x in rows)
                    if len(out) >= limit:
                        return out
            return out
        # the slower path: every term somewhere, ranked by where it was found
        where, args = [], []
        for i, t in enumerate(terms):
            esc = t.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where.append("s.words LIKE ? ESCAPE '\\'")  # (the words of all four)
            args.append("% " + esc + ("%" if i == len(terms) - 1 else " %"))
        rows = c.execute("SELECT " + self.COLS + ", s.keywords, s.words FROM search s "
                         "WHERE s.index_id IN (%s) AND " % ixs + " AND ".join(where) +
                         " LIMIT 2000", args).fetchall()

        def score(r):
            name, summary, keywords = r[1], r[4].lower(), r[6].lower()
            return -sum(10 * (t in name) + 5 * (t in summary) + 5 * (t in keywords) + 1
                        for t in terms)
        take(sorted(rows, key=lambda r: (score(r), r[1])))
        return out


# ===================================================================================
# 5. model
# ===================================================================================

# -- passwords and tokens ----------------------------------------------------------

THROTTLE_AFTER = 5      # wrong passwords for a name before checks slow down
THROTTLE_MAX = 2.0      # seconds, the most one check waits
THROTTLE_WINDOW = 900   # seconds after the last failure that the slowdown lasts
THROTTLE_ENTRIES = 10000  # failure records kept; the least recently failed go first
THROTTLE_INFLIGHT = 2   # checks at once for a throttled (address, name); more answer 429
KDF_SLOTS = 2           # slow password checks at once: each takes 8 MiB and a core
SCRYPT_PARAMS = (2 ** 13, 8, 10)  # OWASP's N=2^13, r=8, p=10: as slow as 2^14/5, 8 MiB
PBKDF2_ITERATIONS = 600000      # OWASP for PBKDF2-HMAC-SHA256, where scrypt is missing


def _b64e(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password):
    """A salted slow hash: scrypt, or PBKDF2 where OpenSSL lacks scrypt."""
    salt = secrets.token_bytes(16)
    pw = password.encode("utf-8")
    if hasattr(hashlib, "scrypt"):
        n, r, p = SCRYPT_PARAMS
        dk = hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, dklen=32, maxmem=64 * 1024 * 1024)
        return "scrypt$%d$%d$%d$%s$%s" % (n, r, p, _b64e(salt), _b64e(dk))
    dk = hashlib.pbkdf2_hmac("sha256", pw, salt, PBKDF2_ITERATIONS)
    return "pbkdf2_sha256$%d$%s$%s" % (PBKDF2_ITERATIONS, _b64e(salt), _b64e(dk))


def verify_password(password, pwhash):
    """True if password matches a hash this module can check (others never match)."""
    pw = password.encode("utf-8")
    try:
        kind, rest = pwhash.split("$", 1)
        if kind == "scrypt":
            n, r, p, salt, dk = rest.split("$")
            n, r, p = int(n), int(r), int(p)
            if n > 2 ** 20 or r > 32 or p > 64:
                return False
            got = hashlib.scrypt(pw, salt=_b64d(salt), n=n, r=r, p=p, dklen=len(_b64d(dk)),
                                 maxmem=256 * 1024 * 1024)
            return hmac.compare_digest(got, _b64d(dk))
        if kind == "devpi_sha256":  # devpi < 4.2: sha256(salt + password), salt as text
            salt, hexhash = rest.split("$")
            got = hashlib.sha256(salt.encode("ascii") + pw).hexdigest()
            return hmac.compare_digest(got, hexhash.lower())
        if kind == "pbkdf2_sha256":
            iterations, salt, dk = rest.split("$")
            if int(iterations) > 10 ** 7:
                return False
            got = hashlib.pbkdf2_hmac("sha256", pw, _b64d(salt), int(iterations))
            return hmac.compare_digest(got, _b64d(dk))
    except (ValueError, TypeError, binascii.Error, AttributeError):
        return False
    return False


def is_known_hash(pwhash):
    """A hash this module can check (devpi's Argon2 ones it can't in reasonable time)."""
    return isinstance(pwhash, str) and pwhash.split("$", 1)[0] in (
        "scrypt", "pbkdf2_sha256", "devpi_sha256")


class KDFQueue:
    """At most ``slots`` slow password checks at once. A check that has to wait is let in
    by its rank (lowest first, ``rank()`` asked each time a slot frees: it may have changed
    while waiting), then in order of arrival. A freed slot is handed straight to the one
    let in, so no later arrival can jump the queue."""

    def __init__(self, slots):
        self._lock = threading.Lock()
        self._free = slots
        self._waiting = []  # (rank function, arrival, Event)
        self._arrivals = 0

    @contextlib.contextmanager
    def slot(self, rank):
        ev = None
        with self._lock:
            if self._free:
                self._free -= 1
            else:
                self._arrivals += 1
                ev = threading.Event()
                self._waiting.append((rank, self._arrivals, ev))
        if ev is not None:
            ev.wait()
        try:
            yield
        finally:
            with self._lock:
                if self._waiting:
                    nxt = min(self._waiting, key=lambda w: (w[0](), w[1]))
                    self._waiting.remove(nxt)
                    nxt[2].set()
                else:
                    self._free += 1


class LoginThrottle:
    """Wrong passwords slow down further guesses without taking the password checks of
    anyone else: failures are counted by the name tried (whether or not such a user
    exists), by (client address, name) and by client address.

    - After THROTTLE_AFTER failures for a name, each check of it first waits (doubling from
      50 ms, at most THROTTLE_MAX), holding no key-derivation slot.
    - An (address, name) has at most THROTTLE_AFTER minus its failures, and at least
      THROTTLE_INFLIGHT, checks under way; more are answered 429 at once, before any key
      derivation (a right password, once checked, is cached and needs no more checks).
    - Checks wait for one of the KDF_SLOTS in order of the failures of their (address, name),
      then their name, then their address: a guesser queues behind everyone else.
    """

    def __init__(self, slots=KDF_SLOTS):
        self._lock = threading.Lock()
        self._failures = {}  # key -> (count, time of the last); in order of the last
        self._busy = {}  # ("pair", address, name) -> checks under way, for throttled pairs
        self.kdf = KDFQueue(slots)

    def _count(self, key, now):
        count, last = self._failures.get(key, (0, 0))
        return count if now - last < THROTTLE_WINDOW else 0

    @staticmethod
    def delay(count):
        if count < THROTTLE_AFTER:
            return 0
        return min(THROTTLE_MAX, 0.05 * 2 ** min(count - THROTTLE_AFTER, 16))

    def rank(self, name, source):
        now = time.time()
        return (self._count(("pair", source, name), now), self._count(("name", name), now),
                self._count(("source", source), now))

    @contextlib.contextmanager
    def check(self, name, source):
        """Around one slow password check of ``name`` asked from address ``source``."""
        now = time.time()
        pair = ("pair", source, name)
        with self._lock:
            n_name = self._count(("name", name), now)
            n_pair = self._count(pair, now)
            wait = self.delay(n_name)
            busy = self._busy.get(pair, 0)
            # as many checks at once as failures short of throttling (a burst of guesses
            # is throttled as soon as it would have failed enough), never fewer than 2
            if busy >= max(THROTTLE_INFLIGHT, THROTTLE_AFTER - n_pair):
                raise HTTPError(429, "too many wrong passwords for %r from this address; "
                                     "try again later" % name,
                                retry_after=max(1, int(wait + 0.999)))
            self._busy[pair] = busy + 1
        try:
            if wait:
                time.sleep(wait)
            with self.kdf.slot(lambda: self.rank(name, source)):
                yield
        finally:
            with self._lock:
                left = self._busy.pop(pair) - 1
                if left:
                    self._busy[pair] = left

    def failed(self, name, source):
        now = time.time()
        with self._lock:
            for key in (("name", name), ("pair", source, name), ("source", source)):
                count = self._count(key, now)
                self._failures.pop(key, None)
                self._failures[key] = (count + 1, now)
            while len(self._failures) > THROTTLE_ENTRIES:
                del self._failures[next(iter(self._failures))]

    def succeeded(self, name, source):
        with self._lock:
            self._failures.pop(("name", name), None)
            self._failures.pop(("pair", source, name), None)


class Accounts:
    """Who is who: password hashes (computed in the background where asked), login
    tokens, the cache of passwords already checked, and the login throttle. The users'
    other data and the rules about them live in the Model."""

    def __init__(self, store):
        self.store = store
        self._auth_cache = {}
        self._auth_cache_lock = threading.Lock()
        self._pending_hashes = {}  # user name -> Event, while a hash is computed
        self.throttle = LoginThrottle()
        self._dummy_hash = None

    def get_user_row(self, name):
        return self.store.conn().execute(
            "SELECT name, pwhash, config, created, modified FROM users WHERE name=?",
            (name,)).fetchone()

    def set_password_hash(self, name, pwhash):
        with self.store.write() as c:
            c.execute("UPDATE users SET pwhash=?, modified=? WHERE name=?",
                      (pwhash, utcnow_iso(), name))

    def set_password_soon(self, name, password):
        """Hash a password in the background, so that an embedded server starts at once.

        Until the hash is stored the account has none that any password matches;
        authentication of that user waits for it.
        """
        done = threading.Event()
        self._pending_hashes[name] = done

        def work():
            try:
                pwhash = hash_password(password)
                with self.store.write() as c:
                    c.execute("UPDATE users SET pwhash=? WHERE name=? AND pwhash='!pending'",
                              (pwhash, name))
            finally:
                self.store.release_conn()
                done.set()
                self._pending_hashes.pop(name, None)
        threading.Thread(target=work, name="hash-" + name, daemon=True).start()

    def wait_pending_hashes(self):
        for ev in list(self._pending_hashes.values()):
            ev.wait()

    def authenticate(self, name, secret, source=None, tokens=True):
        """The user name if ``secret`` is the user's password or (``tokens``) a valid login
        token. ``source``: the client's address, for throttling (see LoginThrottle)."""
        pending = self._pending_hashes.get(name)
        if pending is not None:
            pending.wait()
        row = self.get_user_row(name)
        deadline = time.monotonic() + 30
        while row is not None and row["pwhash"] == "!pending" and time.monotonic() < deadline:
            time.sleep(0.05)  # (another process that shares the storage hashes it now)
            row = self.get_user_row(name)
        if tokens and row is not None and self.check_token(name, secret, row["pwhash"]):
            return name
        key = (name, hmac.new(self.store.secret, secret.encode("utf-8", "surrogateescape"),
                              "sha256").digest())
        if row is not None and self._auth_cache.get(key) == row["pwhash"]:
            return name
        # Every name tried takes the same way and costs one key derivation, whether such a
        # user exists or not, so that names can't be probed by timing. The ones waiting for
        # a slot often find the answer cached by the one before them.
        with self.throttle.check(name, source):
            ok = False
            if row is not None:
                if self._auth_cache.get(key) == row["pwhash"]:
                    return name
                ok = verify_password(secret, row["pwhash"])
            if row is None or not row["pwhash"].startswith(("scrypt$", "pbkdf2_sha256$")):
                if self._dummy_hash is None:
                    self._dummy_hash = hash_password(secrets.token_hex(8))
                verify_password(secret, self._dummy_hash)  # (legacy hashes are fast)
        if not ok:
            self.throttle.failed(name, source)
            return None
        self.throttle.succeeded(name, source)
        if not row["pwhash"].startswith(("scrypt$", "pbkdf2_sha256$")):
            self.set_password_hash(name, hash_password(secret))  # legacy: re-hash
            row = self.get_user_row(name)
        with self._auth_cache_lock:
            if len(self._auth_cache) > 4096:
                self._auth_cache.clear()
            self._auth_cache[key] = row["pwhash"]
        return name

    def _token_sig(self, name, issued, pwhash):
        # The password hash takes part: a password change invalidates every older token.
        msg = "%s\0%d\0%s" % (name, issued, pwhash)
        return _b64e(hmac.new(self.store.secret, msg.encode("utf-8"), "sha256").digest())

    def make_token(self, name):
        row = self.get_user_row(name)
        issued = int(time.time())
        return "mdp1.%s.%d.%s" % (_b64e(name.encode()), issued,
                                  self._token_sig(name, issued, row["pwhash"]))

    def check_token(self, name, token, pwhash):
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "mdp1":
            return False
        try:
            if _b64d(parts[1]).decode() != name:
                return False
            issued = int(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        now = time.time()
        if issued > now + 60 or issued + TOKEN_LIFETIME < now:
            return False
        return hmac.compare_digest(parts[3], self._token_sig(name, issued, pwhash))

    # -- browser sessions (see App.web_login) --
    #
    # A session cookie is "s1.USER.EXPIRES.SIG", SIG an HMAC of the server's secret over a
    # purpose of its own (no login token or scoped token is a session, nor the reverse),
    # the user, the expiry, the user's password hash (a password change or a deleted user
    # ends it) and the user's session generation, which a logout replaces: it ends every
    # session of the user, the ones of other browsers too.

    def _session_generation(self, name):
        row = self.store.conn().execute("SELECT value FROM meta WHERE key=?",
                                        ("session:" + name,)).fetchone()
        return row[0] if row is not None else ""

    def _keyed(self, *parts):
        msg = "\0".join(str(p) for p in parts)
        return _b64e(hmac.new(self.store.secret, msg.encode("utf-8", "surrogateescape"),
                              "sha256").digest())

    def make_session(self, name):
        row = self.get_user_row(name)
        expires = int(time.time()) + SESSION_LIFETIME
        return "s1.%s.%d.%s" % (_b64e(name.encode("utf-8")), expires, self._keyed(
            "minidevpi-session", name, expires, self._session_generation(name), row["pwhash"]))

    def check_session(self, value):
        """(user, logout token) for a valid session cookie's value, else None: tampered,
        expired, of a deleted user, from before a password change or a logout."""
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != "s1" or len(value) > 600:
            return None
        try:
            name = _b64d(parts[1]).decode("utf-8")
            expires = int(parts[2])
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        now = time.time()
        if not now < expires <= now + SESSION_LIFETIME + 60:
            return None
        row = self.get_user_row(name)
        if row is None or not is_known_hash(row["pwhash"]):
            return None
        gen = self._session_generation(name)
        if not hmac.compare_digest(parts[3], self._keyed(
                "minidevpi-session", name, expires, gen, row["pwhash"])):
            return None
        return name, self._keyed("minidevpi-logout", name, gen, row["pwhash"])

    def end_sessions(self, name):
        """Log ``name`` out of every browser: a new session generation."""
        with self.store.write() as c:
            self.store.set_meta(c, "session:" + name, secrets.token_hex(16))

    def login_form_token(self, nonce):
        """The login form's CSRF token for the browser whose login cookie is ``nonce``."""
        return self._keyed("minidevpi-login-form", nonce)

    # -- scoped tokens (see parse_macaroon) --

    def _token_root_key(self, name, token_id, key, pwhash):
        # the password hash takes part: a password change kills every token of the user
        msg = "devpi-tokens\0%s\0%s\0%s\0%s" % (name, token_id, key, pwhash)
        return hmac.new(self.store.secret, msg.encode("utf-8"), "sha256").digest()

    def create_scoped_token(self, name, restrictions):
        """(id, token) of a new scoped token of user ``name``."""
        row = self.get_user_row(name)
        if row is None:
            raise not_found("no user %r" % name)
        key = secrets.token_urlsafe(32)
        with self.store.write() as c:
            taken = {r[0] for r in c.execute("SELECT id FROM tokens WHERE user=?", (name,))}
            token_id = "".join(secrets.choice(TOKEN_ID_CHARS) for _ in range(8))
            while token_id in taken:
                token_id = "".join(secrets.choice(TOKEN_ID_CHARS) for _ in range(8))
            c.execute("INSERT INTO tokens (user, id, key, restrictions, created) "
                      "VALUES (?,?,?,?,?)", (name, token_id, key, json.dumps(restrictions),
                                             utcnow_iso()))
        identifier = ("%s-%s" % (name, token_id)).encode("utf-8")
        caveats = [r.encode("utf-8") for r in restrictions]
        sig = macaroon_signature(self._token_root_key(name, token_id, key, row["pwhash"]),
                                 identifier, caveats)
        return token_id, "devpi-" + serialize_macaroon(identifier, caveats, sig)

    def list_scoped_tokens(self, name):
        return {r["id"]: {"restrictions": json.loads(r["restrictions"])}
                for r in self.store.conn().execute(
                    "SELECT id, restrictions FROM tokens WHERE user=? ORDER BY id", (name,))}

    def delete_scoped_token(self, name, token_id):
        """Deleting a token kills every token derived from it (they share its root key)."""
        with self.store.write() as c:
            if not c.execute("DELETE FROM tokens WHERE user=? AND id=?",
                             (name, token_id)).rowcount:
                raise not_found("No token with id %s" % token_id)

    def check_scoped_token(self, name, token):
        """A TokenActor for a valid scoped token (of user ``name``, if not None or
        "__token__"), else None: a deleted, expired, tampered or foreign token, a caveat
        this server does not know."""
        try:
            identifier, caveats, sig = parse_macaroon(token)
            user, sep, token_id = identifier.decode("utf-8").rpartition("-")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if not sep or name not in (None, "__token__", user):
            return None
        row = self.store.conn().execute(
            "SELECT t.key, u.pwhash FROM tokens t JOIN users u ON u.name=t.user "
            "WHERE t.user=? AND t.id=?", (user, token_id)).fetchone()
        if row is None:
            return None
        want = macaroon_signature(self._token_root_key(user, token_id, row["key"],
                                                       row["pwhash"]), identifier, caveats)
        if not hmac.compare_digest(want, sig):
            return None
        try:
            scope = TokenScope.from_caveats(caveats, time.time())
        except (ValueError, UnicodeDecodeError):
            return None
        actor = TokenActor(user)
        actor.scope = scope
        actor.token = {"id": token_id, "restrictions": [x.decode("utf-8") for x in caveats]}
        return actor

    def login(self, name, password, source=None):
        if self.authenticate(name, password, source) is None:
            raise HTTPError(401, "user %r could not be authenticated" % name)
        return {"password": self.make_token(name), "expiration": TOKEN_LIFETIME}


# -- scoped tokens (macaroons, as the devpi-tokens plugin makes them) ------------------
#
# A token is "devpi-" and the base64url (unpadded) of a version 2 binary macaroon (the
# libmacaroons format pymacaroons writes): the byte 2, then fields of (type varint, length
# varint, bytes) in sections ended by a 0: [location 1] identifier 2 | per caveat
# [location 1] identifier 2 | an empty section | signature 6 (32 bytes). Its identifier is
# "USER-ID"; its signature is HMAC-SHA256 chained from the root key over the identifier and
# then each caveat, so whoever holds a token can add caveats (narrow it) offline but never
# remove one. Version 1 macaroons (lines of 4 hex digits of length, "key value\n") are read
# too. Caveats are devpi-tokens' "name=value" first-party ones; any other is refused.

TOKEN_ID_CHARS = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
TOKEN_MAX_LIFETIME = 366 * 24 * 3600 + 10  # what a token may live unless root makes it
TOKEN_MAX_CAVEATS = 64
# devpi-server's permission names, which a token's "allowed" caveat lists
TOKEN_PERMISSIONS = ("del_entry", "del_project", "del_verdata", "index_create",
                     "index_delete", "index_modify", "pkg_read", "toxresult_upload", "upload",
                     "audit_read")  # (audit_read: ours; a token of root's reads the audit
                                    # log only if its "allowed" names it)


def _uvarint(n):
    out = bytearray()
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_uvarint(data, pos):
    n = shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise ValueError("truncated macaroon")
        b = data[pos]
        pos += 1
        n |= (b & 0x7f) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def _macaroon_v2(raw):
    """(identifier, [caveat ids], signature) of a binary version 2 macaroon."""
    pos = 1

    def section():
        nonlocal pos
        fields = []
        while True:
            kind, pos = _read_uvarint(raw, pos)
            if kind == 0:
                return fields
            size, pos = _read_uvarint(raw, pos)
            if pos + size > len(raw):
                raise ValueError("truncated macaroon")
            fields.append((kind, raw[pos:pos + size]))
            pos += size
    head = [f for f in section() if f[0] != 1]
    if [k for k, _ in head] != [2]:
        raise ValueError("macaroon without one identifier")
    caveats = []
    while True:
        fields = [f for f in section() if f[0] != 1]
        if not fields:
            break
        if [k for k, _ in fields] != [2]:
            raise ValueError("third-party caveats are not accepted")
        caveats.append(fields[0][1])
        if len(caveats) > TOKEN_MAX_CAVEATS:
            raise ValueError("too many caveats")
    kind, pos = _read_uvarint(raw, pos)
    size, pos = _read_uvarint(raw, pos)
    if kind != 6 or size != 32 or pos + size != len(raw):
        raise ValueError("macaroon without a signature")
    return head[0][1], caveats, raw[pos:]


def _macaroon_v1(raw):
    identifier, caveats, sig = None, [], None
    pos = 0
    while pos < len(raw):
        size = int(raw[pos:pos + 4], 16)
        packet = raw[pos + 4:pos + size]
        pos += size
        if size < 5 or not packet.endswith(b"\n"):
            raise ValueError("bad macaroon packet")
        key, _, value = packet[:-1].partition(b" ")
        if key == b"identifier":
            identifier = value
        elif key == b"cid":
            caveats.append(value)
        elif key == b"signature" and len(value) == 32:
            sig = value
        elif key != b"location":
            raise ValueError("macaroon field %r is not accepted" % key[:20])
        if len(caveats) > TOKEN_MAX_CAVEATS:
            raise ValueError("too many caveats")
    if identifier is None or sig is None:
        raise ValueError("macaroon without identifier or signature")
    return identifier, caveats, sig


def parse_macaroon(token):
    """(identifier, [caveat ids], signature) of a token; ValueError for anything else."""
    text = token[6:] if token.startswith("devpi-") else token
    if not text or len(text) > 8192 or not re.match(r"^[A-Za-z0-9_+/=-]+$", text):
        raise ValueError("not a macaroon")
    raw = base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_").rstrip("=")
                                   + "=" * (-len(text.rstrip("=")) % 4))
    return _macaroon_v2(raw) if raw[:1] == b"\x02" else _macaroon_v1(raw)


def macaroon_signature(root_key, identifier, caveats):
    sig = hmac.new(hmac.new(b"macaroons-key-generator", root_key, "sha256").digest(),
                   identifier, "sha256").digest()
    for cid in caveats:
        sig = hmac.new(sig, cid, "sha256").digest()
    return sig


def serialize_macaroon(identifier, caveats, sig):
    out = bytearray(b"\x02\x01\x00")  # version 2, an empty location (as pymacaroons)
    out += b"\x02" + _uvarint(len(identifier)) + identifier + b"\x00"
    for cid in caveats:
        out += b"\x02" + _uvarint(len(cid)) + cid + b"\x00"
    out += b"\x00\x06\x20" + sig
    return base64.urlsafe_b64encode(bytes(out)).decode("ascii").rstrip("=")


class TokenScope:
    """What a token's caveats leave it: ``allowed`` permissions, ``indexes``, ``projects``
    (each None for no limit). Every caveat narrows (lists intersect, times are all
    checked), so a derived token is never broader than the one it came from."""

    __slots__ = ("allowed", "indexes", "projects")

    def __init__(self):
        self.allowed = self.indexes = self.projects = None

    @classmethod
    def from_caveats(cls, caveats, now):
        """The scope, or ValueError for an expired, not yet valid or unknown caveat."""
        scope = cls()
        for cid in caveats:
            name, sep, value = cid.decode("utf-8").partition("=")
            if not sep:
                raise ValueError("unknown caveat")
            if name == "expires":
                if value != "never" and now >= int(value):
                    raise ValueError("token expired")
            elif name == "not_before":
                if now < int(value):
                    raise ValueError("token not valid yet")
            elif name in ("allowed", "indexes", "projects"):
                items = {x.strip() for x in value.split(",") if x.strip()}
                if name == "projects":
                    items = {normalize_name(x) for x in items}
                old = getattr(scope, name)
                setattr(scope, name, items if old is None else old & items)
            else:
                raise ValueError("unknown caveat")
        return scope

    def refusal(self, action, index=None, project=None):
        """Why the token may not do ``action`` (a devpi permission name) on ``index``
        and ``project``, or None."""
        if action.startswith("user_"):
            return "a token can't change users or tokens"
        if self.allowed is not None and action not in self.allowed:
            return "the token does not allow %s" % action
        if index is not None and self.indexes is not None and index not in self.indexes:
            return "the token does not allow index %s" % index
        if project is not None and self.projects is not None and \
                normalize_name(project) not in self.projects:
            return "the token does not allow project %s" % normalize_name(project)
        return None


class TokenActor(str):
    """The user name of a request authenticated with a scoped token, with its ``scope``
    and, for the audit log, ``token``: its id and the caveats it came with (never the
    token itself, nor its signature)."""

    scope = None
    token = None


def check_scope(actor, action, index=None, project=None):
    """403 unless the scoped token ``actor`` came with (if any) allows ``action`` on
    ``index`` and ``project``. The Model asks this where it has decided which object a
    request acts on (the project a file row belongs to, the name an upload is filed under),
    so that the caveat is judged on what is changed, not on a parse of the URL or form."""
    scope = getattr(actor, "scope", None)
    why = scope.refusal(action, index, project) if scope is not None else None
    if why:
        raise forbidden(why)


def token_restrictions(body, unlimited=False, now=None):
    """devpi-tokens' caveats ("name=value", by name) for a token-create body, checked as
    the plugin checks them: a token lives at most a year (``unlimited``: root may make one
    that never expires)."""
    now = time.time() if now is None else now
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise bad_request("token-create takes a JSON object of restrictions")
    body = dict(body)
    body.setdefault("expires", int(now + TOKEN_MAX_LIFETIME))
    out = []
    for name, value in sorted(body.items()):
        if name in ("expires", "not_before"):
            if value == "never" and name == "expires":
                if not unlimited:
                    raise forbidden("Not allowed to create token with no expiration")
            else:
                if isinstance(value, bool) or not isinstance(value, (int, str)) or \
                        not re.match(r"^[0-9]{1,12}$", str(value)):
                    raise bad_request("Invalid value %r for %s" % (value, name))
                value = int(value)
                if name == "expires" and value <= now:
                    raise bad_request("Can't set expiration before current time")
                if name == "expires" and value > now + TOKEN_MAX_LIFETIME and not unlimited:
                    raise forbidden("Not allowed to set expiration to more than one year")
        elif name in ("allowed", "indexes", "projects"):
            if not isinstance(value, list) or not value or not all(
                    isinstance(x, str) and re.match(r"^[^,=\s]+$", x) for x in value):
                raise bad_request("The %s restriction must be a list of names" % name)
            unknown = [x for x in value if name == "allowed" and x not in TOKEN_PERMISSIONS]
            if unknown:
                raise bad_request("Unknown permission %s (known: %s)"
                                  % (", ".join(unknown), ", ".join(TOKEN_PERMISSIONS)))
            value = ",".join(sorted(set(value)))
        else:
            raise bad_request("Unknown restriction '%s'." % name)
        out.append("%s=%s" % (name, value))
    return out


# -- index configuration -------------------------------------------------------------

LIST_KEYS = ("bases", "acl_upload", "acl_toxresult_upload", "mirror_whitelist",
             "mirror_min_age_exempt", "acl_read", "block", "allow")
ACL_KEYS = ("acl_upload", "acl_toxresult_upload", "acl_read")  # lists of user names
SPECIAL_ACL = {":ANONYMOUS:": ":ANONYMOUS:", ":AUTHENTICATED:": ":AUTHENTICATED:"}
BOOL_KEYS = ("volatile", "mirror_no_project_list", "mirror_use_external_urls",
             "mirror_ignore_serial_header", "mirror_provides_core_metadata", "refuse_private",
             "mirror_keep_removed")
TEXT_KEYS = ("title", "description", "custom_data", "mirror_web_url_fmt")
STAGE_KEYS = ("type", "bases", "volatile", "acl_upload", "acl_toxresult_upload",
              "mirror_whitelist", "mirror_whitelist_inheritance", "title", "description",
              "custom_data", "acl_read", "block", "allow", "refuse_private")
MIRROR_KEYS = ("type", "volatile", "mirror_url", "mirror_cache_expiry", "mirror_web_url_fmt",
               "mirror_no_project_list", "mirror_use_external_urls",
               "mirror_ignore_serial_header", "mirror_provides_core_metadata", "title",
               "description", "custom_data", "mirror_min_age", "mirror_min_age_exempt",
               "acl_read", "block", "allow", "mirror_keep_removed")
OPTIONAL_KEYS = ("title", "description", "custom_data", "mirror_web_url_fmt",
                 "mirror_cache_expiry", "mirror_no_project_list", "mirror_use_external_urls",
                 "mirror_ignore_serial_header", "mirror_provides_core_metadata",
                 "mirror_min_age", "refuse_private", "mirror_keep_removed")
# mirror_min_age: a duration as seconds, or a number with one of these units
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 10 * 366 * 86400  # (a time that far ahead is still a date)
DEFAULT_MIRROR_CACHE_EXPIRY = 1800
# Who may read an index that does not say (acl_read): anyone, as devpi; on a server run with
# --restrict-reads any logged-in user (and new indexes get that written into their config).
# The index owner and root always read.
PUBLIC_READ_ACL = (":ANONYMOUS:",)
RESTRICTED_READ_ACL = (":AUTHENTICATED:",)
# Who may create users (serve --user-create): anyone, as in devpi, or root alone (the
# default with --restrict-reads, where a new account reads what logged-in users read).
USER_CREATE_ANYONE = "anyone"
USER_CREATE_ROOT = "root"
USER_CREATE_CHOICES = (USER_CREATE_ROOT, USER_CREATE_ANYONE)


def check_user_create_option(value):
    """``value`` as a setting of who creates users (None: the default), else ValueError."""
    if value is not None and value not in USER_CREATE_CHOICES:
        raise ValueError("user-create must be %s, not %r" % (
            " or ".join(USER_CREATE_CHOICES), value))
    return value

# Who may create mirror indexes and set mirror_url (serve --mirror-creators): root alone
# (the default), anyone with an account on an index of their own (as devpi), or root and
# the users named. Whoever made it, only a mirror of root's fetches from its mirror_url's
# host whatever its address (Mirror.origin_of): another user's is held to public hosts
# and --mirror-allow-host, as every link of every mirror is.
MIRROR_CREATORS_ROOT = "root"
MIRROR_CREATORS_ANYONE = "anyone"


def check_mirror_creators_option(value):
    """``value`` (``root``, ``anyone`` or user names, comma-separated; a list of such from
    repeated options) as a setting of who creates mirrors: MIRROR_CREATORS_ANYONE or a
    frozenset of names, root always among them (None: root only); else ValueError."""
    if value is None:
        return frozenset([MIRROR_CREATORS_ROOT])
    if value == MIRROR_CREATORS_ANYONE or isinstance(value, frozenset):
        return value
    items = [value] if isinstance(value, str) else list(value)
    names = set()
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name == MIRROR_CREATORS_ANYONE:
                return MIRROR_CREATORS_ANYONE
            if not name or len(name) > 100 or not USER_NAME_RE.fullmatch(name):
                raise ValueError("mirror-creators must be root, anyone or user names, "
                                 "not %r" % (item,))
            names.add(name)
    return frozenset(names | {MIRROR_CREATORS_ROOT})


def only_mirror_creators(creators):
    """The refusal's text for a user ``creators`` (a setting as above) leaves out."""
    who = "root" if creators == frozenset([MIRROR_CREATORS_ROOT]) else "root and " + \
        ", ".join(sorted(creators - {MIRROR_CREATORS_ROOT}))
    return ("only %s can create mirror indexes, make an index a mirror or set a mirror_url "
            "on this server" % who)


def index_defaults(ixtype, user, restrict_reads=False):
    """The settings a new index of type ``ixtype`` owned by ``user`` starts with, as in
    devpi (what a config does not say, whether created here or imported). On a server with
    ``restrict_reads`` a new index is readable by logged-in users only."""
    extra = {"acl_read": list(RESTRICTED_READ_ACL)} if restrict_reads else {}
    if ixtype == "mirror":
        return dict({"type": "mirror", "volatile": True}, **extra)
    return dict({"type": "stage", "bases": [], "volatile": True, "acl_upload": [user],
                 "acl_toxresult_upload": [":ANONYMOUS:"], "mirror_whitelist": [],
                 "mirror_whitelist_inheritance": "intersection"}, **extra)


def parse_bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "off"):
        return False
    raise bad_request("Unknown boolean value %r." % (value,))


def parse_list(value):
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return [x.strip() for x in value if x.strip()]
    raise bad_request("expected a list of strings or a comma separated string, got %r"
                      % (value,))


def parse_duration(key, value):
    """Seconds (an int) from ``7d``, ``48h``, ``90m``, ``30s``, ``2w`` or a whole number
    of seconds (int or numeric string); 400 for anything else."""
    text = value.strip().lower() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif text and re.match(r"^[0-9]{1,12}$", text):
        seconds = int(text)
    elif text and re.match(r"^[0-9]{1,9}[smhdw]$", text):
        seconds = int(text[:-1]) * DURATION_UNITS[text[-1]]
    else:
        raise bad_request("%s must be a duration like 7d, 48h, 90m or a whole number of "
                          "seconds, got %r" % (key, value))
    if seconds < 0:
        raise bad_request("%s must not be negative" % key)
    if seconds > MAX_DURATION:
        raise bad_request("%s must be at most %d seconds (10 years)" % (key, MAX_DURATION))
    return seconds


def coerce_index_value(key, value):
    """Turn one config value (a string from the command line, or JSON) into its type."""
    if key == "mirror_min_age":
        return parse_duration(key, value)
    if key == "mirror_min_age_exempt":
        names = []
        for name in parse_list(value):
            if name == "*":
                raise bad_request("mirror_min_age_exempt takes project names; '*' (every "
                                  "project) is not allowed: set mirror_min_age=0 instead")
            check_project_name(name)
            if normalize_name(name) not in names:
                names.append(normalize_name(name))
        return names
    if key in POLICY_KEYS:
        return check_policy_entries(key, value)
    if key in LIST_KEYS:
        return parse_list(value)
    if key in BOOL_KEYS:
        return parse_bool(value)
    if key == "mirror_whitelist_inheritance":
        if not isinstance(value, str) or value.lower() not in ("intersection", "union"):
            raise bad_request("Unknown value %r for mirror_whitelist_inheritance, must be "
                              "'intersection' or 'union'." % (value,))
        return value.lower()
    if key == "mirror_cache_expiry":
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise bad_request("mirror_cache_expiry must be a whole number of seconds")
        if v < 0:
            raise bad_request("mirror_cache_expiry must not be negative")
        return v
    if key == "mirror_url":
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise bad_request("mirror_url must start with http:// or https://")
        return value
    if key == "type":
        if value not in ("stage", "mirror"):
            raise bad_request("unknown index type %r" % (value,))
        return value
    if key in TEXT_KEYS:
        if key == "custom_data" and not isinstance(value, str):
            return value  # any JSON value, kept as given
        if not isinstance(value, str):
            raise bad_request("%s must be a string" % key)
        return value
    return value


def apply_index_patch(config, patch):
    """A new config from ``config`` and a PATCH body: a dict (keys replace) or a list of
    ``key=value``, ``key+=value``, ``key-=value`` and ``key-=`` strings, in order."""
    new = dict(config)
    if isinstance(patch, dict):
        for k, v in patch.items():
            new[k] = v
        return new
    if not isinstance(patch, list) or not all(isinstance(x, str) for x in patch):
        raise bad_request("PATCH body must be a JSON object or a list of 'key=value' strings")
    for item in patch:
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(\+=|-=|=)(.*)$", item, re.S)
        if not m:
            raise bad_request("cannot parse %r: expected key=value, key+=value or key-=value"
                              % item)
        key, op, value = m.groups()
        if op == "=":
            new[key] = value
        elif op == "+=":
            if key not in LIST_KEYS:
                raise bad_request("The %r setting is not a list, '+=' does not apply" % key)
            cur = parse_list(new.get(key, []))
            if value not in cur:
                cur.append(value)
            new[key] = cur
        else:  # -=
            if value == "":
                if key in OPTIONAL_KEYS:
                    new.pop(key, None)
                elif key in LIST_KEYS:
                    new[key] = []
                else:
                    raise bad_request("The %r setting can't be removed" % key)
                continue
            if key not in LIST_KEYS:
                raise bad_request("The %r setting is not a list, '-=' does not apply" % key)
            cur = parse_list(new.get(key, []))
            if value not in cur:
                raise bad_request("The %r setting doesn't have value %r" % (key, value))
            cur.remove(value)
            new[key] = cur
    return new


# -- policies: block and allow lists, reserved namespaces ----------------------------
#
# An index's ``block`` and ``allow`` (and the same keys on root's own user record: the
# server-wide rules every index inherits) hold entries of three kinds: a project name
# (every release), a name with a PEP 440 specifier set (``requests<2.32``, ``foo==1.*``),
# or a file name pattern (an entry with * ? or [ and no operator: fnmatch on the file
# name, any case). Root's ``reserved_namespaces`` holds ``prefix=user/index`` entries
# (PEP 752): only the indexes named take uploads of the prefix and of names starting
# ``prefix-`` (Model.check_namespace), and no mirror serves them from upstream. Where the
# rules act on what is offered is BaseWalk.offers and BaseWalk.file_refusal.

POLICY_KEYS = ("block", "allow")
SERVER_POLICY_KEYS = POLICY_KEYS + ("reserved_namespaces",)
POLICY_MAX_ENTRIES = 1000  # entries of one list
POLICY_MAX_ENTRY = 200     # characters of one entry
_POLICY_OPERATORS = "<>=!~"
_PATTERN_CHARS = "*?["
_POLICY_CUT_RE = re.compile("[%s]" % re.escape(_POLICY_OPERATORS))


def _policy_pieces(key, value):
    """The entries of a list option given as a comma-separated string or a JSON list of
    them: a piece starting with an operator belongs to the entry before it (``foo>=1,<2``
    is one entry)."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        texts = value
    else:
        raise bad_request("%s must be a list of strings or a comma separated string, got %r"
                          % (key, value))
    if len(texts) > POLICY_MAX_ENTRIES or sum(len(t) for t in texts) > \
            POLICY_MAX_ENTRIES * POLICY_MAX_ENTRY:
        raise bad_request("%s has more than %d entries" % (key, POLICY_MAX_ENTRIES))
    entries = []
    for text in texts:
        first = len(entries)
        for piece in text.split(","):
            piece = piece.strip()
            if not piece:
                continue
            if piece[0] in _POLICY_OPERATORS and len(entries) > first:
                entries[-1] += "," + piece
            else:
                entries.append(piece)
    if len(entries) > POLICY_MAX_ENTRIES:
        raise bad_request("%s has more than %d entries" % (key, POLICY_MAX_ENTRIES))
    for entry in entries:
        if len(entry) > POLICY_MAX_ENTRY:
            raise bad_request("%s entry %r... is longer than %d characters"
                              % (key, entry[:40], POLICY_MAX_ENTRY))
    return entries


def check_policy_entries(key, value):
    """The clean ``block`` or ``allow`` list (names normalised, duplicates dropped) of a
    value as given; 400 naming the first entry that is none of the three kinds."""
    clean = []
    for entry in _policy_pieces(key, value):
        try:
            text = PolicyRule(entry).text
        except ValueError as e:
            raise bad_request("%s: bad entry %r: %s (an entry is a project name, a name "
                              "with a version specifier like pkg<2, or a file name pattern "
                              "like *.exe)" % (key, entry, e))
        if text not in clean:
            clean.append(text)
    return clean


def check_reserved_namespaces(value):
    """The clean ``reserved_namespaces`` list of ``prefix=user/index`` entries."""
    clean = []
    for entry in _policy_pieces("reserved_namespaces", value):
        prefix, eq, path = entry.partition("=")
        prefix, path = prefix.strip(), path.strip().strip("/")
        user, _, name = path.partition("/")
        if not (eq and PROJECT_NAME_RE.fullmatch(prefix) and USER_NAME_RE.fullmatch(user)
                and INDEX_NAME_RE.fullmatch(name)):
            raise bad_request("reserved_namespaces: bad entry %r: expected prefix=user/index "
                              "(the index that alone may serve the prefix)" % entry)
        text = "%s=%s/%s" % (normalize_name(prefix), user, name)
        if text not in clean:
            clean.append(text)
    return clean


class PolicyRule:
    """One entry of a block or allow list, compiled (ValueError for a bad one)."""

    __slots__ = ("text", "name", "specifiers", "pattern")

    def __init__(self, entry):
        entry = entry.strip()
        self.name = self.specifiers = self.pattern = None
        if any(c in entry for c in _PATTERN_CHARS) and not any(
                c in entry for c in _POLICY_OPERATORS):  # (pkg==1.* is a specifier)
            if "/" in entry or "\\" in entry or _FILENAME_CONTROL_RE.search(entry):
                raise ValueError("a file name pattern has no / \\ or control characters")
            self.text = entry
            self.pattern = re.compile(fnmatch.translate(entry), re.IGNORECASE).match
            return
        cut = min([entry.find(c) for c in _POLICY_OPERATORS if c in entry] or [len(entry)])
        name, spec = entry[:cut].strip(), entry[cut:].strip()
        if not PROJECT_NAME_RE.fullmatch(name):
            raise ValueError("%r is not a project name" % name)
        self.name = normalize_name(name)
        self.text = self.name
        if spec:
            self.specifiers = parse_specifiers(spec)
            self.text += ",".join(op + v for op, v in self.specifiers)

    def matches(self, norm, version, filename):
        """Whether a file ``filename`` (None: the release itself) of ``version`` of the
        project ``norm`` matches."""
        if self.pattern is not None:
            return filename is not None and self.pattern(filename) is not None
        return self.name == norm and (self.specifiers is None
                                      or version_matches(version, self.specifiers))


class Policy:
    """The block and allow lists of one config (an index's; root's record: the
    server-wide ones, which also hold the reserved namespaces), held by the config caches
    (Index.policy, Model.server_policy) until the config changes. Entries are grouped by
    project name when the config is read and compiled when a walk first asks for the
    project's (``rules``): a walk pays for the rules of its project, not for the list."""

    __slots__ = ("source", "_entries", "_patterns", "_compiled", "_lists", "reserved",
                 "_whole", "given", "_heads")

    def __init__(self, source, config):
        self.source = source
        self._whole = None
        # the entries as stored, per list (what /+status shows of the server-wide ones)
        self.given = {k: list(config.get(k) or ()) for k in SERVER_POLICY_KEYS}
        self._entries = {}   # (key, name) -> [entry]: the stored entries are clean
        self._patterns = {}  # key -> [PolicyRule] of the file name patterns
        self._compiled = {}  # (key, name) -> [PolicyRule]
        self._lists = frozenset(k for k in POLICY_KEYS if config.get(k))
        for key in POLICY_KEYS:
            for entry in config.get(key) or ():
                cut = _POLICY_CUT_RE.search(entry)
                name = entry[:cut.start()] if cut else entry
                if cut is None and any(c in entry for c in _PATTERN_CHARS):
                    self._patterns.setdefault(key, []).append(PolicyRule(entry))
                else:
                    self._entries.setdefault((key, name), []).append(entry)
        self.reserved = {}  # prefix -> [index path, ...]
        for entry in config.get("reserved_namespaces") or ():
            prefix, _, path = entry.partition("=")
            self.reserved.setdefault(prefix, []).append(path)
        # the first dash-separated part of each prefix: most names start with none of them
        self._heads = frozenset(p.partition("-")[0] for p in self.reserved)

    def __bool__(self):
        return bool(self._lists)

    def has(self, key):
        """Whether the list ``key`` (block, allow) has entries."""
        return key in self._lists

    def rules(self, key, norm):
        """The rules of the list ``key`` that concern the project ``norm``."""
        got = self._compiled.get((key, norm))
        if got is None:
            got = [PolicyRule(e) for e in self._entries.get((key, norm), ())] + \
                self._patterns.get(key, [])
            if len(self._compiled) > 10000:
                self._compiled = {}
            self._compiled[(key, norm)] = got
        return got

    def whole(self):
        """(the names its block list blocks as a whole: a plain name entry; the names its
        allow list lets through judged by name alone, or None when it has no allow list
        or one with a file name pattern, which judges files, not names): what a project
        list leaves out by name (Model.listing_filter), worked out once per Policy."""
        got = self._whole
        if got is None:
            blocked = frozenset(n for (k, n), es in self._entries.items()
                                if k == "block" and n in es)
            allowed = None
            if self.has("allow") and not self._patterns.get("allow"):
                allowed = frozenset(n for (k, n) in self._entries if k == "allow")
            got = self._whole = (blocked, allowed)
        return got

    def reserved_against(self, norm, path):
        """(prefix, [index path, ...]) when ``norm`` is in a namespace reserved for other
        indexes than the one at ``path`` (which then neither takes nor mirrors it), or
        None."""
        reserved = self.reserved_for(norm)
        return reserved if reserved is not None and path not in reserved[1] else None

    def reserved_for(self, norm):
        """(prefix, [index path, ...]) of the reserved namespace ``norm`` is in, or None:
        a prefix reserves itself and every name that starts with it and a dash."""
        if self.reserved and norm.partition("-")[0] in self._heads:
            parts = norm.split("-")
            for i in range(1, len(parts) + 1):
                owners = self.reserved.get("-".join(parts[:i]))
                if owners is not None:
                    return "-".join(parts[:i]), owners
        return None


class ListingFilter:
    """Which names a project list leaves out (Model.listing_filter): a project blocked
    as a whole on an index of its chain (a plain name entry of a block list that
    applies, or no entry naming it in a non-empty allow list that applies and has no
    file name pattern) or, on a mirror, in a namespace reserved for other indexes; as
    the project's own page judges it (BaseWalk.policy_refusal), but by name alone: set
    lookups and a prefix test, whatever the number of rules."""

    __slots__ = ("server", "judges", "_keys")

    def __init__(self, server, judges):
        self.server = server
        self.judges = judges  # per index of the chain: (blocked, [allowed], mirror path)
        self._keys = {}

    def keeps(self, rank, norm):
        """Whether the list shows ``norm`` held by the ``rank``-th index of the chain."""
        blocked, allows, mirror = self.judges[rank]
        if norm in blocked:
            return False
        for allowed in allows:
            if norm not in allowed:
                return False
        return mirror is None or self.server.reserved_against(norm, mirror) is None

    def key(self, rank=0):
        """A digest of what the ``rank``-th index's judge leaves out (a list written to a
        file is written again when it changes: Mirror.root_listing)."""
        got = self._keys.get(rank)
        if got is None:
            blocked, allows, mirror = self.judges[rank]
            reserved = sorted((p, sorted(o)) for p, o in self.server.reserved.items()) \
                if mirror is not None else []
            got = self._keys[rank] = hashlib.sha256(json.dumps(
                [sorted(blocked), [sorted(a) for a in allows], reserved, mirror]
            ).encode()).hexdigest()
        return got


def reserved_message(what, norm, prefix, owners, where):
    return ("%s: the name %s is in the namespace %r reserved for %s (reserved_namespaces, "
            "PEP 752): %s" % (what, norm, prefix, ", ".join(owners), where))


# -- the model ------------------------------------------------------------------------


class Index:
    """One index ("stage" in devpi's words) as read from the database."""

    __slots__ = ("id", "user", "name", "config", "_policy")

    def __init__(self, id, user, name, config):
        self.id = id
        self.user = user
        self.name = name
        self.config = config
        self._policy = None

    @classmethod
    def from_row(cls, row):
        return cls(row["id"], row["user"], row["name"], json.loads(row["config"]))

    @property
    def path(self):
        return self.user + "/" + self.name

    @property
    def is_mirror(self):
        return self.config.get("type") == "mirror"

    @property
    def volatile(self):
        return bool(self.config.get("volatile", True))

    @property
    def policy(self):
        """Its block and allow lists, compiled when first asked (an Index is read again
        after each config change: Model.get_index)."""
        if self._policy is None:
            self._policy = Policy(self.path, self.config)
        return self._policy


class File:
    """A stored file of a release, with what pages need to list it."""

    __slots__ = ("index", "project", "version", "filename", "rel", "sha256", "size",
                 "uploaded", "requires_python", "core_metadata", "yanked", "for_filename",
                 "log", "ext", "provenance", "yank_log")

    def __init__(self, index, project, version, filename, rel, sha256, size, uploaded,
                 requires_python="", core_metadata=None, yanked=None, for_filename=None,
                 log="[]", ext=None):
        self.index = index  # the index's path
        self.project = project
        self.version = version
        self.filename = filename
        self.rel = rel
        self.sha256 = sha256
        self.size = size
        self.uploaded = uploaded
        self.requires_python = requires_python
        self.core_metadata = core_metadata  # sha256 of its PEP 658 metadata, or None
        self.yanked = yanked  # None, or the reason ('' for none given)
        self.for_filename = for_filename
        self.log = log  # JSON text
        self.ext = ext  # a mirrored file upstream gave no hash for: its +e key (sha256 None)
        self.provenance = False  # a mirrored file with a PEP 740 provenance (ours or upstream's)
        self.yank_log = None  # a mirrored file's [[time or None, yanked], ...] (yank_state_at)

    @classmethod
    def from_row(cls, index, project, version, row):
        """From a database row with the columns of Model._FILE_COLS."""
        return cls(index, project, version, row["filename"], row["rel"], row["sha256"],
                   row["size"], row["uploaded"], row["requires_python"], row["core_metadata"],
                   row["yanked"], row["for_filename"], row["log"])

    @property
    def relpath(self):
        """The file's path below the server root: user/index/+f/abc/def.../name (or
        user/index/+e/KEY/name for a mirrored file whose hash is not known yet)."""
        if self.sha256 is None:
            return "%s/+e/%s/%s" % (self.index, self.ext, self.filename)
        return file_relpath(self.index, self.sha256, self.filename)

    def sbom_relpath(self, name):
        """Where the file's SBOM ``name`` (PEP 770, Model.sboms) is served, below the root."""
        return "%s/+sbom/%s" % (self.relpath, urllib.parse.quote(name, safe="/"))


class BaseWalk:
    """One project through an index and its bases, as one reader sees it (Model.walk).

    ``chain`` is every index of the walk in devpi's resolution order. devpi's shadowing
    protection: once a private index of the chain holds the project, the mirrors
    contribute nothing unless the project (or ``*``) is in the mirror_whitelist, combined
    along the chain by the asking index's mirror_whitelist_inheritance; ``visible`` is
    the chain without the mirrors that hides. Which indexes hold the project is asked
    once, in one query, and only when needed: a walk that has no mirror to judge and
    lists nothing costs nothing.

    What a walk reads must be read after the page-cache validator of what it renders
    (see App.simple_project_page): make a new walk rather than keep one across commits.

    Which files of the visible indexes the reader is offered is ``offers``: the
    supply-chain guards (a quarantined project, the time machine's ``at``, the block and
    allow lists, the reserved namespaces, a mirror's mirror_min_age, a kept file its
    upstream removed) are decided there and nowhere else.

    The block and allow lists that apply to a file of the index ``b`` read through the
    walk's index X are the server-wide ones (root's record) and those of every index of
    the chain that inherits from ``b`` or is ``b``: X, ``b``, and the indexes between them;
    not those of an index beside ``b`` in X's bases. A file's own URL (``b``'s) answers
    by ``b``'s lists and the server-wide ones (Model.file_refusal).
    """

    __slots__ = ("model", "index", "project", "reader", "chain", "_held", "_hidden",
                 "at", "now", "cooling", "next_change", "_status", "_yank_logs", "_rules",
                 "refused", "_changes")

    def __init__(self, model, ix, norm, reader, chain, at=None):
        self.model = model
        self.index = ix
        self.project = norm
        self.reader = reader
        self.chain = chain
        self._held = None
        self._hidden = None
        self.at = at            # the time machine: only files uploaded at or before it
        self.now = time.time()
        self.cooling = {}       # version -> when its first file held back by age matures
        self.next_change = None  # when the first file held back by age matures
        self._status = {}
        self._yank_logs = {}
        self._rules = None
        self.refused = {}  # version -> why the policies refused the first file they refused
        self._changes = {}

    def _holders(self):
        """{index id: display name} of the chain's indexes that hold the project."""
        if self._held is None:
            ids = [b.id for b in self.chain]
            self._held = dict(self.model.store.conn().execute(
                "SELECT index_id, display FROM projects WHERE name=? AND index_id IN (%s)"
                % ",".join("?" * len(ids)), [self.project] + ids).fetchall())
        return self._held

    def holds(self, b):
        """Whether the index ``b`` itself has the project (a mirror: files of it kept)."""
        return b.id in self._holders()

    def display_at(self, b):
        """The project's name as ``b`` holds it (first uploaded), or None."""
        return self._holders().get(b.id)

    @property
    def display(self):
        """The project's name from the first index of the chain that holds it, or None."""
        for b in self.chain:
            name = self.display_at(b)
            if name is not None:
                return name
        return None

    @property
    def mirrors_hidden(self):
        """Whether the whitelist hides the chain's mirrors for this project."""
        if self._hidden is None:
            self._hidden = self._judge_mirrors()
        return self._hidden

    def _judge_mirrors(self):
        whitelist = None
        inheritance = self.index.config.get("mirror_whitelist_inheritance", "union")
        privates = [b for b in self.chain if not b.is_mirror]
        for b in privates:
            own = set(b.config.get("mirror_whitelist", []))
            whitelist = own if whitelist is None else (
                whitelist | own if inheritance == "union" else whitelist & own)
            if "*" in whitelist or self.project in whitelist:
                return False  # whitelisted somewhere along the chain: mirrors count
        return any(self.holds(b) for b in privates)

    @property
    def visible(self):
        """The chain without the mirrors the whitelist hides, and without those that
        withhold the project (``withholds``)."""
        return [b for b in self.chain if not (b.is_mirror and (self.mirrors_hidden
                                                               or self.withholds(b)))]

    def withholds(self, b):
        """Whether the mirror ``b`` serves nothing of the project, whatever a whitelist
        says: its name is in a namespace reserved for other indexes. Such a mirror is not
        asked (so neither is its upstream: the name does not leak there)."""
        rules = self.rules_at(b)
        return rules is not None and rules[2] is not None

    def withheld_message(self):
        """Why a mirror of the chain withholds the project, or None."""
        for b in self.chain:
            if b.is_mirror and self.withholds(b):
                return self.policy_refusal(b, None)
        return None

    @property
    def mirrors(self):
        """The mirrors that contribute to the project."""
        return [b for b in self.visible if b.is_mirror]

    def status_at(self, b):
        """(status, reason) of the project on ``b`` (PEP 792; on a mirror, upstream's as
        last fetched), or None for active. Read when first asked, per index: a mirror's
        is read after its page was fetched."""
        if b.id not in self._status:
            self._status[b.id] = Store.project_status(self.model.store.conn(), b.id,
                                                      self.project)
        return self._status[b.id]

    @property
    def status(self):
        """The project's status as the reader sees it: that of the first visible index
        that holds the project or has a status for it (None: active)."""
        for b in self.visible:
            st = self.status_at(b)
            if st is not None or self.holds(b):
                return st
        return None

    def upstream_changes(self, b):
        """{filename: (what, since, upstream's sha256 or None, kept sha256)} of the files
        of the project the mirror ``b`` kept and its upstream removed ('removed') or lists
        with other bytes ('replaced'), as its refreshes saw them (Mirror._note_changes);
        {} for a private index. Read when first asked, per index."""
        if not b.is_mirror:
            return {}
        got = self._changes.get(b.id)
        if got is None:
            got = self._changes[b.id] = {
                r[0]: tuple(r[1:]) for r in self.model.store.conn().execute(
                    "SELECT u.filename, u.what, u.since, u.sha256, h.sha256 FROM "
                    "upstream_changes u LEFT JOIN first_hashes h ON h.index_id=u.index_id "
                    "AND h.filename=u.filename WHERE u.index_id=? AND u.project=?",
                    (b.id, self.project))}
        return got

    def removed_upstream(self, b, filename):
        """When the mirror ``b``'s upstream was first seen no longer listing the kept file
        ``filename`` (it is then not offered unless ``b`` has mirror_keep_removed), or
        None."""
        change = self.upstream_changes(b).get(filename)
        return change[1] if change is not None and change[0] == "removed" else None

    def _follows_removals(self, b):
        return (b.is_mirror and not b.config.get("mirror_keep_removed")
                and any(c[0] == "removed" for c in self.upstream_changes(b).values()))

    def filters(self, b):
        """Whether ``offers`` may refuse a file of ``b`` (else every file is offered)."""
        return (self.at is not None or (b.is_mirror and b.config.get("mirror_min_age"))
                or self.status_at(b) is not None or self.rules_at(b) is not None
                or self._follows_removals(b))

    def rules_at(self, b):
        """(blocks [(source, rule)], allows [(source, [rule])], reserved (prefix, owners)
        or None) that concern the project's files on ``b``, or None when no rule does;
        worked out once per walk from the compiled policies (Index.policy,
        Model.server_policy), nothing when there are none."""
        if self._rules is None:
            self._rules = self._gather_rules()
        return self._rules.get(b.id)

    def _gather_rules(self):
        server = self.model.server_policy()
        reserved = server.reserved_for(self.project)
        policies = self.model.policies_at(self.chain)
        if not policies and reserved is None:
            return {}
        norm = self.project
        out = {}
        for b in self.chain:
            sources = policies.get(b.id, ())
            blocks = [(p.source, r) for p in sources for r in p.rules("block", norm)]
            allows = [(p.source, p.rules("allow", norm)) for p in sources if p.has("allow")]
            res = server.reserved_against(norm, b.path) if b.is_mirror and reserved \
                else None
            if blocks or allows or res:
                out[b.id] = (blocks, allows, res)
        return out

    def policy_refusal(self, b, version, filename=None):
        """Why the block and allow lists or the reserved namespaces refuse the file
        ``filename`` (None: the release) of ``version`` on ``b``, or None."""
        rules = self.rules_at(b)
        if rules is None:
            return None
        blocks, allows, reserved = rules
        norm = self.project
        what = filename or ("version %s of %s" % (version, norm) if version is not None
                            else "the project %s" % norm)
        if reserved is not None:
            return reserved_message(what, norm, reserved[0], reserved[1],
                                    "the mirror %s does not serve it from upstream" % b.path)
        for source, rule in blocks:
            if rule.matches(norm, version, filename):
                return "%s is blocked by the rule %r of %s (block)" % (what, rule.text, source)
        for source, rules in allows:
            if not any(r.matches(norm, version, filename) for r in rules):
                return ("%s is not offered: it matches no rule of the allow list of %s "
                        "(allow)" % (what, source))
        return None

    def policy_allows(self, b, version, filename=None):
        """Whether the policies let the file ``filename`` (None: the release, also one
        without files) of ``version`` on ``b`` be offered; why not is noted in
        ``refused``."""
        if self.rules_at(b) is None:
            return True
        why = self.policy_refusal(b, version, filename)
        if why is not None:
            self.refused.setdefault(version, why)
        return why is None

    def offers(self, b, version, uploaded, filename=None):
        """Whether the reader is offered a release file ``filename`` (None: a release
        without files) of ``version`` uploaded at ``uploaded`` (for a mirror: upstream's
        upload time, else when it first saw it) on the visible index ``b``: not of a
        quarantined project, not uploaded after the time machine's ``at``, not refused by
        the block and allow lists or a reserved namespace (``policy_refusal``; noted in
        ``refused``), on a mirror not younger than its mirror_min_age unless the
        project is exempt (private uploads are never held back), and on a mirror not a
        kept file ``filename`` its upstream removed (unless mirror_keep_removed). A file
        held back for its age is noted in ``cooling`` and ``next_change``."""
        st = self.status_at(b)
        if st is not None and st[0] == "quarantined":
            return False
        if (filename is not None and b.is_mirror and not b.config.get("mirror_keep_removed")
                and self.removed_upstream(b, filename) is not None):
            return False
        if self.at is not None and uploaded > self.at:
            return False
        if not self.policy_allows(b, version, filename):
            return False
        until = cooling_until(b, self.project, uploaded, self.now)
        if until is not None:
            if until < self.cooling.get(version, until + 1):
                self.cooling[version] = until
            if self.next_change is None or until < self.next_change:
                self.next_change = until
            return False
        return True

    def yanked_then(self, b, f):
        """``f``'s yank state (PEP 592) at the time machine's ``at``, as far as its history
        was kept (yank_state_at); without ``at``, or without history, its state now."""
        if self.at is None:
            return f.yanked
        if b.is_mirror:
            log = f.yank_log
        else:
            if b.id not in self._yank_logs:
                logs = {}
                for ver, at, yanked in self.model.store.conn().execute(
                        "SELECT v.version, y.at, y.yanked FROM yank_history y JOIN versions v "
                        "ON y.version_id=v.id JOIN projects p ON v.project_id=p.id WHERE "
                        "p.index_id=? AND p.name=? ORDER BY y.rowid", (b.id, self.project)):
                    logs.setdefault(ver, []).append((at, yanked))
                self._yank_logs[b.id] = logs
            log = self._yank_logs[b.id].get(f.version)
        return yank_state_at(log, self.at, f.yanked)

    def held_back(self, offered_versions):
        """{version: when it matures} of the versions held back by mirror_min_age that no
        file offers."""
        return {v: t for v, t in self.cooling.items() if v not in offered_versions}

    def blocked(self, offered_versions):
        """{version: why} of the versions the policies refused that no file offers."""
        return {v: why for v, why in self.refused.items() if v not in offered_versions}

    def file_refusal(self, b, filename, version, uploaded):
        """What a file URL of ``b`` (the file, its ``.metadata``, its provenance; ``+f/``
        and ``+e/``) answers for a file of ``version`` uploaded at ``uploaded`` that
        ``offers`` does not offer, or None when it offers it: the guards hold at the file
        URLs, not only in the listings (a lock file or a pasted link names the URL
        itself). 403 with the reason for a quarantined project, 404 for a file held back
        by mirror_min_age (as if upstream did not have it yet), 403 with the rule for one
        the policies refuse, 404 saying when for a kept file its upstream removed.
        ``uploaded`` None: a file the index does not list, refused only by what refuses
        every file of the project and by the policies."""
        if self.offers(b, version, uploaded or 0, filename):
            return None
        st = self.status_at(b)
        if st is not None and st[0] == "quarantined":
            return HTTPError(403, quarantined_message(self.project, st[1], filename))
        why = self.policy_refusal(b, version, filename)
        if why is not None:
            return HTTPError(403, why)
        removed = self.removed_upstream(b, filename)
        if removed is not None and not b.config.get("mirror_keep_removed"):
            return not_found(removed_upstream_message(filename, removed))
        if version in self.cooling:
            return not_found(held_back_message(filename, self.cooling[version]))
        return not_found("no such file")


def yank_state_at(log, at, now_state):
    """The yank state at ``at`` from a history [(time, state), ...] whose first entry has
    time None (the state before the first change recorded); ``now_state`` without one."""
    if not log:
        return now_state
    state = now_state
    for t, value in log:
        if t is None or t <= at:
            state = value
    return state


def cooling_until(ix, norm, uploaded, now):
    """When a file of project ``norm`` uploaded at ``uploaded`` to the mirror ``ix`` is
    old enough for its mirror_min_age, if it is not yet (else None)."""
    age = ix.config.get("mirror_min_age") if ix.is_mirror else None
    if not age or norm in ix.config.get("mirror_min_age_exempt", ()):
        return None
    until = (uploaded or 0) + age
    return until if until > now else None


def held_back_message(what, until):
    return ("%s is held back by mirror_min_age until %s (a cooling-off period for new "
            "upstream releases)" % (what, utcnow_iso(until)))


def removed_upstream_message(filename, since):
    return ("%s was removed upstream on %s (the mirror follows upstream deletions; "
            "mirror_keep_removed=true keeps offering it)" % (filename, utcnow_iso(since)))


def replaced_upstream_text(filename, since, kept, upstream):
    """What a person and the log read of a kept file (sha256 ``kept``) its upstream lists
    with other bytes (sha256 ``upstream``) since ``since``."""
    return ("upstream replaced %s on %s (sha256 kept %s..., upstream now %s...; the kept "
            "file is served)" % (filename, utcnow_iso(since), (kept or "?")[:16],
                                 (upstream or "?")[:16]))


def quarantined_message(norm, reason, filename):
    return ("%s is not served: the project %s is quarantined%s (PEP 792)"
            % (filename, norm, ": " + reason if reason else ""))


PROJECT_STATUS_NAMES = ("active", "archived", "quarantined", "deprecated")  # PEP 792


def when_list(ts=None):
    return list(time.gmtime(ts)[:6])


def overwrite_entry(prev_log, now):
    """The log entry of a file that replaces one with these log entries (devpi's shape:
    ``who`` null, ``count`` how many times the name has been overwritten)."""
    count = max([e.get("count", 1) for e in prev_log if e.get("what") == "overwrite"]
                or [0]) + 1
    return {"what": "overwrite", "who": None, "when": when_list(now), "count": count}


# -- the audit log ----------------------------------------------------------------------
#
# Every change (users, indexes and their ACLs and policies, uploads, pushes, removals,
# yanks, project status, tokens, logins) appends one record to the ``audit`` table, in the
# write transaction that makes the change (Model.audit), so a change and its record commit
# together or not at all. No route or command edits or deletes a record (triggers refuse
# it); ids increase, and so do times (a clock set back records the time of the row before).
# A record never holds a password, a password hash or a token: what changed of a user is
# said as "the password changed", a token by its id and restrictions.

AUDIT_ANONYMOUS = ":anonymous:"  # the actor of a change nobody authenticated for
AUDIT_COMMAND_LINE = "(command line)"  # the actor of a change made offline (passwd, init)
AUDIT_PAGE = 100  # records a page of /+audit holds unless ?limit= says
AUDIT_PAGE_MAX = 1000
AUDIT_LINE_MAX = 64 * 1024  # bytes of a record's line; an import refuses longer ones
AUDIT_TEXT_MAX = 500  # characters of a value a record keeps (a description, custom_data)
AUDIT_ACTIONS = (
    "user.create", "user.modify", "user.delete", "user.login", "user.logout",
    "token.create", "token.delete", "index.create", "index.modify", "index.delete",
    "release.register", "file.upload", "doc.upload", "toxresult.upload", "push",
    "file.remove", "version.remove", "project.remove", "yank", "unyank", "project.status",
    "server.init", "server.import")


def audit_value(value, depth=0):
    """``value`` as a record keeps it: strings cut at AUDIT_TEXT_MAX characters, at most
    100 items a list or object, four levels deep (a record stays small whatever a config
    held)."""
    if isinstance(value, str):
        if len(value) <= AUDIT_TEXT_MAX:
            return value
        return value[:AUDIT_TEXT_MAX - 40] + "... (%d characters)" % len(value)
    if isinstance(value, (list, tuple)):
        if depth >= 4:
            return "(a list of %d)" % len(value)
        return [audit_value(v, depth + 1) for v in value[:100]] + (
            ["... (%d items)" % len(value)] if len(value) > 100 else [])
    if isinstance(value, dict):
        if depth >= 4:
            return "(an object of %d)" % len(value)
        out = {}
        for k in list(value)[:100]:
            out[audit_value(str(k))] = audit_value(value[k], depth + 1)
        return out
    return value


def audit_details(record, details):
    """``details`` (bounded by audit_value), less where the whole ``record`` would not fit
    a line of AUDIT_LINE_MAX bytes (a config of a hundred long values): then each long
    value says only that it was left out, an object's keys kept (which keys changed);
    failing that, only how long it was."""
    size = len(json.dumps(dict(record, details=details)))
    if size <= AUDIT_LINE_MAX - 100:
        return details
    left_out = "(left out: the record would be too long)"
    shorter = {k: v if len(json.dumps(v)) <= 200 else {kk: left_out for kk in v}
               if isinstance(v, dict) else left_out for k, v in details.items()}
    if len(json.dumps(dict(record, details=shorter))) <= AUDIT_LINE_MAX - 100:
        return shorter
    return {"left_out": "%d bytes of details" % size}


def audit_changes(old, new, shown=None):
    """{key: {"old": ..., "new": ...}} of every key whose value differs (a side without
    it: null), whatever the keys are; the values as ``shown`` (a function of a whole
    config) gives them, where a value may hold a secret."""
    shown_old, shown_new = (shown(old), shown(new)) if shown else (old, new)
    return {k: {"old": audit_value(shown_old.get(k)), "new": audit_value(shown_new.get(k))}
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


class AuditContext(threading.local):
    """How the change this thread makes came, for its audit record: the client's address
    (the socket's peer, and what an X-Forwarded-For header claimed), how the request
    authenticated (``auth``: password, login-token, session), or the command line. The
    HTTP layer sets it for each request (App.dispatch, App.authenticate_request), the
    command line for what it changes offline. Calls of an embedding program have none:
    their records say "embedded"."""

    address = None
    forwarded = None
    auth = None
    command_line = False
    quiet = False  # an import building a server: the dump's own records are its log

    def begin(self, address=None, forwarded=None, command_line=False, quiet=False):
        self.address = address
        self.forwarded = forwarded[:200] if forwarded else None
        self.auth = None
        self.command_line = command_line
        self.quiet = quiet


class Model:
    """Users, indexes and releases: every rule of devpi's data model lives here.

    Methods take the acting user's name (``actor``; None for anonymous) and raise
    HTTPError for anything the caller may not do or got wrong.

    ``restrict_reads`` (serve --restrict-reads): indexes that don't say who reads them
    (acl_read) are for logged-in users only, anonymous readers get no user lists and learn
    nothing of the server's state, and (unless ``user_create`` says otherwise) only root
    creates users.
    """

    restrict_reads = False
    user_create = None  # who creates users (serve --user-create); None: see user_creators
    # who creates mirrors (serve --mirror-creators; check_mirror_creators_option's value)
    mirror_creators = frozenset([MIRROR_CREATORS_ROOT])

    def __init__(self, store):
        self.store = store
        self._index_cache = {}
        self._server_policy = None
        self._listing_filters = {}  # chain's index ids -> ListingFilter or None
        self.accounts = Accounts(store)
        self.throttle = self.accounts.throttle
        self._upstream_listeners = []
        self._change_listeners = []
        self.search = SearchIndex(store)
        self._sboms = {}  # sha256 of a wheel: its SBOMs (Model.sboms)
        self._sboms_lock = threading.Lock()
        self.context = AuditContext()

    # -- change notifications ---------------------------------------------------------

    def on_upstream_change(self, fn):
        """Call ``fn(index_id)`` after each commit that gives an index a new mirror_url (the
        mirror, a later section, forgets what it holds of the old upstream)."""
        self._upstream_listeners.append(fn)

    def on_change(self, fn):
        """Call ``fn(config, project_set, projects, kept)`` after each commit that changed
        what pages show: any index's config (``config``), which projects exist
        (``project_set``: True for any index, else the ids of the indexes whose projects
        came or went), the releases of the (normalised) ``projects``, or only which
        files a mirror keeps of the ``kept`` projects, files its simple pages already list
        as they are (the page cache listens)."""
        self._change_listeners.append(fn)

    def mirror_page_changed(self, norm):
        """A mirror stored a page of project ``norm`` that differs from the one it had:
        the pages built from it are out of date (call inside the write transaction)."""
        self._changed(projects=[norm])

    def mirror_kept_changed(self, norm):
        """A mirror kept more of what its upstream lists for project ``norm`` as it is (a
        file's core metadata): the web pages that show it are out of date, its simple
        pages are not (call inside the write transaction)."""
        self._changed(kept=[norm])

    def _changed(self, projects=(), config=False, project_set=False, kept=()):
        if (projects or kept) and not config:  # (a config change changes no release)
            self.search.changed(list(projects) + list(kept))
        # the other processes on the same storage are told in the same words (remote_changed)
        self.store.notify(["changed", config, project_set if project_set is True
                           else list(project_set or ()), [] if config else list(projects),
                           list(kept)])
        self.store.after_commit(lambda _c: self._tell(config, project_set, projects, kept))

    def _tell(self, config, project_set, projects, kept):
        if config:
            self._index_cache = {}
            self._server_policy = None
            self._listing_filters = {}
        for fn in self._change_listeners:
            fn(config, project_set, projects, kept)

    def _upstream_changed(self, index_id):
        """An index got a new mirror_url (call inside the write transaction)."""
        self.store.notify(["upstream", index_id])
        for fn in self._upstream_listeners:
            self.store.after_commit(lambda _c, fn=fn: fn(index_id))

    def remote_changed(self, notes):
        """What another process sharing the storage committed (Store.listen): the same
        caches forgotten as for a change made here. ``notes`` None: anything may have."""
        if notes is None:
            self._tell(True, True, (), ())
            return
        for note in notes:
            if note[0] == "changed":
                self._tell(*note[1:])
            elif note[0] == "upstream":
                for fn in self._upstream_listeners:
                    fn(note[1])

    # -- the audit log (see AuditContext) -----------------------------------------------

    def audit(self, c, actor, action, index=None, project=None, version=None, filename=None,
              auth=None, **details):
        """Append the record of a change to the audit log, in the write transaction ``c``
        that makes it. ``actor`` as the Model's methods take it (a TokenActor says which
        token); ``auth``: how it authenticated, where this thread's AuditContext does not
        know (a login); ``details``: what else the record says (kept bounded)."""
        ctx = self.context
        if ctx.quiet:
            return
        token = getattr(actor, "token", None)
        if ctx.command_line:
            who, how = AUDIT_COMMAND_LINE, "command-line"
        elif actor is None:
            who, how = AUDIT_ANONYMOUS, "anonymous"
        else:
            who = str(actor)
            how = "scoped-token" if token is not None else auth or ctx.auth or "embedded"
        now = round(time.time(), 3)  # (the record's epoch and the row's, equal)
        last = c.execute("SELECT at FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        if last is not None and last[0] > now:
            now = last[0]
        record = {"time": utcnow_iso(now), "epoch": now, "actor": who,
                  "auth": how}
        if token is not None:
            record["token"] = audit_value(token)
        if ctx.address:
            record["address"] = ctx.address
        if ctx.forwarded:
            record["forwarded_for"] = ctx.forwarded  # (what a proxy or the client claims)
        record["action"] = action
        norm = normalize_name(project) if project else None
        for key, value in (("index", index), ("project", norm), ("version", version),
                           ("file", filename)):
            if value is not None:
                record[key] = audit_value(value)
        if details:
            record["details"] = audit_details(record, audit_value(details))
        self.store.insert_audit(c, now, who, action, index, norm, record)

    def audit_ids(self, after=0, limit=AUDIT_PAGE, since=None, until=None, user=None,
                  index=None, project=None, action=None):
        """(ids of the next page of records, newest last; whether more follow). Each
        filter is an indexed lookup: times become a range of ids (times increase with
        ids), the others are (column, id) indexes."""
        c = self.store.conn()
        low, high = after, None
        if since is not None:
            row = c.execute("SELECT id FROM audit WHERE at >= ? ORDER BY at, id LIMIT 1",
                            (since,)).fetchone()
            if row is None:
                return [], False
            low = max(low, row[0] - 1)
        if until is not None:
            row = c.execute("SELECT id FROM audit WHERE at <= ? ORDER BY at DESC, id DESC "
                            "LIMIT 1", (until,)).fetchone()
            if row is None:
                return [], False
            high = row[0]
        where, args = ["id > ?"], [low]
        if high is not None:
            where.append("id <= ?")
            args.append(high)
        for column, value in (("actor", user), ("index_path", index), ("project", project),
                              ("action", action)):
            if value is not None:
                where.append("%s = ?" % column)
                args.append(value)
        ids = [r[0] for r in c.execute("SELECT id FROM audit WHERE %s ORDER BY id LIMIT ?"
                                       % " AND ".join(where), args + [limit + 1])]
        return ids[:limit], len(ids) > limit

    def audit_lines(self, ids):
        """The JSON lines (bytes, each ending in a newline) of the records ``ids``, a few
        hundred at a time (a page is streamed, never built whole)."""
        c = self.store.conn()
        for i in range(0, len(ids), 200):
            chunk = ids[i:i + 200]
            rows = c.execute("SELECT id, record FROM audit WHERE id IN (%s) ORDER BY id"
                             % ",".join("?" * len(chunk)), chunk).fetchall()
            yield "".join(audit_line(r[0], r[1]) for r in rows).encode("utf-8")

    # -- users --------------------------------------------------------------------------

    def get_user_row(self, name):
        return self.accounts.get_user_row(name)

    def make_token(self, name):
        return self.accounts.make_token(name)

    def wait_pending_hashes(self):
        self.accounts.wait_pending_hashes()

    def user_exists(self, name):
        return self.get_user_row(name) is not None

    def user_info(self, name, with_indexes=True, actor=None, offset=0, limit=-1):
        """A user's config and (``with_indexes``) the indexes ``actor`` may read (of
        ``limit`` of them from ``offset`` on, by name; -1: all)."""
        self.check_listing(actor)
        return self._user_info(name, with_indexes, actor, offset, limit)

    def _user_info(self, name, with_indexes=True, actor=None, offset=0, limit=-1):
        row = self.get_user_row(name)
        if row is None:
            raise not_found("no user %r" % name)
        info = {"username": row["name"]}
        info.update(json.loads(row["config"]))
        info["created"] = row["created"]
        if row["modified"]:
            info["modified"] = row["modified"]
        if with_indexes:
            readable = self.readable_indexes(name, actor)
            info["indexes"] = {ix.name: self.shown_config(ix.config, actor) for ix in (
                readable[offset:] if limit < 0 else readable[offset:offset + limit])}
        return info

    def readable_indexes(self, user, actor):
        """The indexes of ``user`` that ``actor`` may read, by name."""
        return [ix for ix in self.user_indexes(user) if self.may_read(actor, ix)]

    def users_page(self, actor, offset, limit):
        """(the number of users, {name: user_info} of ``limit`` users from ``offset`` on, by
        name, with at most ``limit`` of their indexes each, and [(user, number of
        indexes)] of those who have more): a page of a list of users of any length."""
        self.check_listing(actor)
        c = self.store.conn()
        total = c.execute("SELECT COUNT(*) FROM users").fetchone()[0]
        names = [r[0] for r in c.execute("SELECT name FROM users ORDER BY name LIMIT ? "
                                         "OFFSET ?", (limit, offset))]
        users, more = {}, []
        for n in names:
            users[n] = self._user_info(n, actor=actor, limit=limit)
            count = len(self.readable_indexes(n, actor))
            if count > limit:
                more.append((n, count))
        return total, users, more

    def list_users(self, actor=None):
        """Every user with the indexes ``actor`` may read."""
        self.check_listing(actor)
        names = [r[0] for r in self.store.conn().execute("SELECT name FROM users ORDER BY name")]
        return {n: self._user_info(n, actor=actor) for n in names}

    USER_KEYS = ("password", "email", "title", "description", "custom_data")

    def create_user(self, actor, name, body, pwhash=None, hash_soon=False):
        self.check_user_create(actor)
        check_user_name(name)
        if not isinstance(body, dict):
            raise bad_request("user config must be a JSON object")
        body = dict(body)
        if pwhash is None and "pwhash" in body:
            # devpi accepts a precomputed hash; only root may set one, and only of a kind
            # this server can check, so that no account ends up with a password nobody knows.
            given = body.pop("pwhash")
            if actor == "root" and is_known_hash(given) and "password" not in body:
                pwhash = given
        unknown = sorted(k for k in body if k not in self.USER_KEYS)
        if unknown:
            raise bad_request("Unknown keys in user config: %s" % ", ".join(unknown))
        password = body.pop("password", None)
        if pwhash is None:
            if password is None:
                raise bad_request("password needs to be set")
            if not isinstance(password, str):
                raise bad_request("password must be a string")
            pwhash = "!pending" if hash_soon else hash_password(password)
        config = self._user_config({}, body)
        with self.store.write() as c:
            if c.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise HTTPError(409, "user already exists")
            c.execute("INSERT INTO users (name, pwhash, config, created) VALUES (?,?,?,?)",
                      (name, pwhash, json.dumps(config), utcnow_iso()))
            self.audit(c, actor, "user.create", user=name, config=config,
                       password="set" if password is not None else "set as a hash")
        if pwhash == "!pending":
            self.accounts.set_password_soon(name, password)
        return self._user_info(name)

    def _user_config(self, config, body):
        config = dict(config)
        for k, v in body.items():
            if k == "custom_data" or k not in self.USER_KEYS:
                config[k] = v
            elif not isinstance(v, str):
                raise bad_request("%s must be a string" % k)
            else:
                config[k] = v
        return config

    def can_modify_user(self, actor, name):
        return actor is not None and (actor == name or actor == "root")

    def modify_user(self, actor, name, body):
        """Returns a new login token when the password changed, else None."""
        row = self.get_user_row(name)
        if row is None:
            raise not_found("no user %r" % name)
        if not self.can_modify_user(actor, name):
            raise forbidden("no permission to modify user %r" % name)
        if not isinstance(body, dict):
            raise bad_request("user config must be a JSON object")
        body = {k: v for k, v in body.items()
                if k not in ("created", "modified", "username", "indexes")}
        stored = json.loads(row["config"])
        rules = {k: body.pop(k) for k in SERVER_POLICY_KEYS if k in body}
        if rules:
            rules = self._server_rules(actor, name, rules)
        # keys it already has (imported from devpi's plugins) come back from devpi-client
        unknown = sorted(k for k in body if k not in self.USER_KEYS and k not in stored)
        if unknown:
            raise bad_request("Unknown keys in user config: %s" % ", ".join(unknown))
        password = body.pop("password", None)
        if password is not None and not isinstance(password, str):
            raise bad_request("password must be a string")
        config = self._user_config(stored, body)
        config.update(rules)
        with self.store.write() as c:
            pwhash = row["pwhash"] if password is None else hash_password(password)
            c.execute("UPDATE users SET pwhash=?, config=?, modified=? WHERE name=?",
                      (pwhash, json.dumps(config), utcnow_iso(), name))
            details = {"changed": audit_changes(stored, config)}
            if password is not None:
                details["password"] = "changed"
            self.audit(c, actor, "user.modify", user=name, **details)
            if any(stored.get(k) != v for k, v in rules.items()):
                # every index inherits them: every page is built again
                self._changed(config=True)
        if password is not None:
            return self.make_token(name)
        return None

    @staticmethod
    def _server_rules(actor, name, rules):
        """The clean server-wide rules (block, allow, reserved_namespaces) of a change of
        user ``name``'s record by ``actor``: root's own record carries them, and only
        root sets them (403; devpi-client's ``user -m`` sends back what it read, and no
        other record has them)."""
        if name != "root" or actor != "root":
            raise forbidden("only root sets the server-wide rules (%s), on its own user "
                            "record" % ", ".join(sorted(rules)))
        return {k: check_reserved_namespaces(v) if k == "reserved_namespaces"
                else check_policy_entries(k, v) for k, v in rules.items()}

    def delete_user(self, actor, name):
        if self.get_user_row(name) is None:
            raise not_found("no user %r" % name)
        if not self.can_modify_user(actor, name):
            raise forbidden("no permission to delete user %r" % name)
        if name == "root":
            raise forbidden("root user can not be deleted")
        with self.store.write() as c:
            # checked in the transaction: nothing can change in between
            indexes = self.user_indexes(name)
            fixed = [ix.name for ix in indexes if not ix.volatile]
            if fixed:
                raise forbidden("user %r has non-volatile index: %s" % (name, ",".join(fixed)))
            for ix in indexes:
                self._check_not_a_base(ix, exclude_user=name)
            shas = self._file_shas(c, "f.index_id IN (SELECT id FROM indexes WHERE user=?)",
                                   (name,))
            c.execute("DELETE FROM users WHERE name=?", (name,))
            # the name leaves every ACL, so whoever registers it next inherits no rights
            left = []
            for ix_id, ix_user, ix_name, config_json in c.execute(
                    "SELECT id, user, name, config FROM indexes").fetchall():
                config = json.loads(config_json)
                if any(name in config.get(k, ()) for k in ACL_KEYS):
                    for k in ACL_KEYS:
                        if k in config:
                            config[k] = [u for u in config[k] if u != name]
                    c.execute("UPDATE indexes SET config=? WHERE id=?",
                              (json.dumps(config), ix_id))
                    left.append("%s/%s" % (ix_user, ix_name))
            self.audit(c, actor, "user.delete", user=name,
                       indexes_deleted=[ix.path for ix in indexes], acls_left=left)
            self.store.drop_unused_blobs(shas)
            self._changed(config=True, project_set=True, projects=self._all_project_names(c))

    def set_password_hash(self, actor, name, pwhash):
        """A new password (its hash) for user ``name``: what ``passwd`` does offline."""
        with self.store.write() as c:
            self.accounts.set_password_hash(name, pwhash)
            self.audit(c, actor, "user.modify", user=name, password="changed")

    # -- logins and tokens: the Accounts' changes, recorded ------------------------------

    def logged_in(self, name, via):
        """Record that ``name`` logged in with a password (``via``: what for: a login
        token, a browser's session)."""
        with self.store.write() as c:
            self.audit(c, name, "user.login", auth="password", user=name, via=via)

    def end_sessions(self, actor, name):
        """Log ``name`` out of every browser (Accounts.end_sessions), recorded."""
        with self.store.write() as c:
            self.accounts.end_sessions(name)
            self.audit(c, actor, "user.logout", auth="session", user=name)

    def create_scoped_token(self, actor, name, restrictions):
        """A new devpi-tokens token of user ``name``; the record has its id and
        restrictions, never the token."""
        with self.store.write() as c:
            token_id, token = self.accounts.create_scoped_token(name, restrictions)
            self.audit(c, actor, "token.create", user=name, token_id=token_id,
                       restrictions=restrictions)
        return token

    def delete_scoped_token(self, actor, name, token_id):
        with self.store.write() as c:
            self.accounts.delete_scoped_token(name, token_id)
            self.audit(c, actor, "token.delete", user=name, token_id=token_id)

    def _all_project_names(self, c):
        return [r[0] for r in c.execute("SELECT DISTINCT name FROM projects")]

    # -- indexes --------------------------------------------------------------------------

    def server_policy(self):
        """The server-wide block and allow lists and reserved namespaces (root's user
        record) as a Policy, compiled once per config change (``_changed``)."""
        policy = self._server_policy
        if policy is None:
            row = self.get_user_row("root")
            config = json.loads(row["config"]) if row is not None else {}
            policy = self._server_policy = Policy("root (server-wide)", config)
        return policy

    def policies_at(self, chain):
        """{index id: [Policy]}: the block and allow lists that apply to a file of each
        index b of ``chain`` read through its first: the server-wide ones and those of
        every index of the chain that inherits from b or is b (BaseWalk's rule); {} when
        no list has entries."""
        server = self.server_policy()
        ruled = [c for c in chain if c.policy]
        if not server and not ruled:
            return {}
        reach = {c.id: {x.id for x in self.resolve_bases(c)} for c in ruled}
        return {b.id: [server] + [c.policy for c in ruled if b.id in reach[c.id]]
                for b in chain}

    def listing_filter(self, chain):
        """The ListingFilter of a project list through ``chain`` (its first index's), or
        None when no rule leaves a name out of it; made once per config change."""
        ids = tuple(b.id for b in chain)
        got = self._listing_filters.get(ids, False)
        if got is False:
            got = self._listing_filter(chain)
            if len(self._listing_filters) > 1000:
                self._listing_filters = {}
            self._listing_filters[ids] = got
        return got

    def _listing_filter(self, chain):
        server = self.server_policy()
        policies = self.policies_at(chain)
        judges = []
        for b in chain:
            blocked, allows = set(), []
            for p in policies.get(b.id, ()):
                names, allowed = p.whole()
                blocked |= names
                if allowed is not None:
                    allows.append(allowed)
            judges.append((frozenset(blocked), allows,
                           b.path if b.is_mirror and server.reserved else None))
        if not any(j[0] or j[1] or j[2] for j in judges):
            return None
        return ListingFilter(server, judges)

    def check_namespace(self, ix, norm):
        """403 when the project ``norm`` is in a namespace reserved for other indexes than
        ``ix`` (root's reserved_namespaces): only those take uploads and pushes of it."""
        reserved = self.server_policy().reserved_against(norm, ix.path)
        if reserved is not None:
            raise forbidden(reserved_message("no upload to %s" % ix.path, norm, reserved[0],
                                             reserved[1], "only those indexes take it"))

    def get_index(self, path):
        """The Index at 'user/name', or None."""
        ix = self._index_cache.get(path)
        if ix is not None:
            return ix
        user, _, name = path.partition("/")
        row = self.store.conn().execute(
            "SELECT id, user, name, config FROM indexes WHERE user=? AND name=?",
            (user, name)).fetchone()
        if row is None:
            return None
        ix = Index.from_row(row)
        if len(self._index_cache) > 10000:
            self._index_cache = {}
        self._index_cache[path] = ix
        return ix

    def require_index(self, path):
        ix = self.get_index(path)
        if ix is None:
            raise not_found("The stage %s could not be found." % path)
        return ix

    def user_indexes(self, user):
        rows = self.store.conn().execute(
            "SELECT id, user, name, config FROM indexes WHERE user=? ORDER BY name", (user,))
        return [Index.from_row(r) for r in rows]

    def all_indexes(self):
        rows = self.store.conn().execute(
            "SELECT id, user, name, config FROM indexes ORDER BY user, name")
        return [Index.from_row(r) for r in rows]

    @staticmethod
    def shown_config(config, actor):
        """An index config as ``actor`` may see it: a mirror_url's credentials are shown to
        root only (root needs them to read the config back and set it again)."""
        config = dict(config)
        if actor != "root" and "mirror_url" in config:
            config["mirror_url"] = shown_mirror_url(config["mirror_url"])
        return config

    def can_modify_index(self, actor, ix_user):
        return actor is not None and (actor == ix_user or actor == "root")

    def validate_index_config(self, path, config):
        """Check and coerce a whole index config; returns the clean config."""
        ixtype = config.get("type", "stage")
        if ixtype not in ("stage", "mirror"):
            raise bad_request("unknown index type %r" % (ixtype,))
        allowed = STAGE_KEYS if ixtype == "stage" else MIRROR_KEYS
        unknown = sorted(k for k in config if k not in allowed)
        if unknown:
            raise bad_request("indexconfig got unexpected keyword arguments: %s" % ", ".join(
                "%s=%s" % (k, config[k]) for k in unknown))
        clean = {k: coerce_index_value(k, v) for k, v in config.items()}
        clean["type"] = ixtype
        if ixtype == "stage":
            bases = []
            for base in clean.get("bases", []):
                base = base.lstrip("/")  # devpi takes "/root/pypi" for root/pypi
                if base.count("/") != 1:
                    raise bad_request("base index %r is not of the form user/index" % base)
                if base == path:
                    raise bad_request("index %s can't be a base of itself" % path)
                if self.get_index(base) is None:
                    raise bad_request("base index %r does not exist" % base)
                if base not in bases:
                    bases.append(base)
            clean["bases"] = bases
            wl = []
            for name in clean.get("mirror_whitelist", []):
                name = name if name == "*" else normalize_name(name)
                if name not in wl:
                    wl.append(name)
            clean["mirror_whitelist"] = wl
        for key in ACL_KEYS:  # devpi spells the special names in capitals
            if key in clean:
                clean[key] = [SPECIAL_ACL.get(x.upper(), x) for x in clean[key]]
        return clean

    def _check_cycle(self, path, bases):
        """Refuse bases through which ``path`` would inherit from itself (devpi allows it)."""
        seen = set()
        todo = list(bases)
        while todo:
            b = todo.pop()
            if b == path:
                raise bad_request("bases of %s would form a cycle through %s" % (path, b))
            if b in seen:
                continue
            seen.add(b)
            ix = self.get_index(b)
            if ix is not None:
                todo.extend(ix.config.get("bases", []))

    def _check_new_bases(self, actor, action, path, bases, old=()):
        """An index reads what its bases hold: each base added (not in ``old``) must be
        one the actor may read (acl_read), and one its scoped token, if any, names (for
        ``action``, the change being made), else the new config would pass on what they
        may not read themselves."""
        scope = getattr(actor, "scope", None)
        for base in bases:
            if base in old:
                continue
            bix = self.get_index(base)
            if bix is not None and not self.may_read(actor, bix):
                raise forbidden("base index %s: user %r may not read it, so %s can't "
                                "inherit from it" % (base, actor, path))
            why = scope.refusal(action, base) if scope is not None else None
            if why:
                raise forbidden("base index %s: %s" % (base, why))

    def create_index(self, actor, path, body):
        user, _, name = path.partition("/")
        check_index_name(name)
        if not self.user_exists(user):
            raise not_found("no user %r" % user)
        if not self.can_modify_index(actor, user):
            raise forbidden("no permission to create index %s" % path)
        check_scope(actor, "index_create", path)
        if not isinstance(body, dict):
            raise bad_request("index config must be a JSON object")
        ixtype = body.get("type", "stage")
        if ixtype == "mirror" or "mirror_url" in body:
            self.check_mirror_create(actor)
        config = index_defaults(ixtype, user, self.restrict_reads)
        config.update(body)
        if ixtype == "mirror" and "mirror_url" not in config:
            # devpi's default is the public index: here the one pip is configured with
            default = pip_index_url()
            if not default:
                raise bad_request("a mirror index needs a mirror_url (no default: pip "
                                  "has no index configured)")
            config["mirror_url"] = default
        config = self.validate_index_config(path, config)
        self._check_cycle(path, config.get("bases", []))
        self._check_new_bases(actor, "index_create", path, config.get("bases", []))
        with self.store.write() as c:
            if not c.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone():
                raise not_found("no user %r" % user)  # deleted meanwhile
            if c.execute("SELECT 1 FROM indexes WHERE user=? AND name=?",
                         (user, name)).fetchone():
                raise HTTPError(409, "index %r exists" % path)
            self.store.insert_index(c, user, name, config)
            self.audit(c, actor, "index.create", path, config=self.shown_config(config, None))
            self._changed(config=True)
        return config

    def modify_index(self, actor, path, patch):
        ix = self.require_index(path)
        if not self.can_modify_index(actor, ix.user):
            raise forbidden("no permission to modify index %s" % path)
        check_scope(actor, "index_modify", path)
        with self.store.write() as c:
            # the patch applies to the config as it is now: a change committed meanwhile
            # (a deleted user's name leaving the ACLs) is not undone
            row = c.execute("SELECT config FROM indexes WHERE id=?", (ix.id,)).fetchone()
            if row is None:
                raise not_found("The stage %s could not be found." % path)
            current = json.loads(row["config"])
            new = apply_index_patch(current, patch)
            to_mirror = new.get("type") == "mirror" and current["type"] != "mirror"
            if to_mirror or new.get("mirror_url") != current.get("mirror_url"):
                self.check_mirror_create(actor)
            if new.get("type", current["type"]) != current["type"]:
                raise bad_request("the 'type' of an index can't be changed")
            new["type"] = current["type"]
            config = self.validate_index_config(path, new)
            self._check_cycle(path, config.get("bases", []))
            self._check_new_bases(actor, "index_modify", path, config.get("bases", []),
                                  current.get("bases", []))
            c.execute("UPDATE indexes SET config=? WHERE id=?", (json.dumps(config), ix.id))
            self.audit(c, actor, "index.modify", path, changed=audit_changes(
                current, config, lambda cfg: self.shown_config(cfg, None)))
            if config.get("mirror_url") != current.get("mirror_url"):
                # a new upstream takes effect at once: forget what the old one said
                c.execute("DELETE FROM mirror_pages WHERE index_id=?", (ix.id,))
                self._upstream_changed(ix.id)
            self._changed(config=True, project_set=True, projects=self._all_project_names(c))
        return config

    def _check_not_a_base(self, ix, exclude_user=None):
        users = [other.path for other in self.all_indexes()
                 if ix.path in other.config.get("bases", []) and other.user != exclude_user
                 and other.path != ix.path]
        if users:
            # devpi-server allows this and leaves the others naming a base that is gone; we refuse.
            raise HTTPError(409, "index %s is a base of %s; remove it from their bases first"
                            % (ix.path, ", ".join(users)))

    def delete_index(self, actor, path):
        ix = self.require_index(path)
        if not self.can_modify_index(actor, ix.user):
            raise forbidden("no permission to delete index %s" % path)
        check_scope(actor, "index_delete", path)
        if not ix.volatile:
            raise forbidden("index %s non-volatile, cannot delete" % path)
        self._check_not_a_base(ix)
        with self.store.write() as c:
            shas = self._file_shas(c, "f.index_id=?", (ix.id,))
            c.execute("DELETE FROM indexes WHERE id=?", (ix.id,))
            self.audit(c, actor, "index.delete", path)
            self.store.drop_unused_blobs(shas)
            self._changed(config=True, project_set=True, projects=self._all_project_names(c))

    def _file_shas(self, c, where, args):
        shas = []
        for sha, meta in c.execute("SELECT f.sha256, f.core_metadata FROM files f WHERE "
                                   + where, args):
            shas.append(sha)
            shas.append(meta)
        return shas

    def resolve_bases(self, ix):
        """The index and all it inherits from, in devpi's resolution order: private indexes
        breadth first, each once, then the mirrors among the bases. Bases that vanished
        are skipped."""
        order = [ix]
        mirrors = []
        seen = {ix.path}
        i = 0
        while i < len(order):
            for base in order[i].config.get("bases", []):
                if base not in seen:
                    seen.add(base)
                    b = self.get_index(base)
                    if b is not None:
                        (mirrors if b.is_mirror else order).append(b)
            i += 1
        return order + mirrors

    def chain(self, ix, reader, ignore_bases=False):
        """The indexes ``reader`` reads through ``ix``: ``ix`` and, unless ``ignore_bases``,
        what it inherits from (resolve_bases), without those ``reader`` may not read
        (``may_read``; ``ix`` itself too: an index one may not read gives nothing). Every
        read through bases starts here or at ``walk``, so that a rule about who may read
        what is a change in this one place.

        ``reader`` is the user name asking (None: anonymous), or a function giving it,
        called only when a rule needs to know: a page anyone may read does not have to
        authenticate the request."""
        return [b for b in ([ix] if ignore_bases else self.resolve_bases(ix))
                if self.may_read(reader, b)]

    def walk(self, ix, norm, reader, ignore_bases=False, at=None):
        """The walk through bases for the project ``norm``, as ``reader`` sees it from
        ``ix`` (with ``at``: as it was then, the time machine): a BaseWalk."""
        return BaseWalk(self, ix, norm, reader, self.chain(ix, reader, ignore_bases), at)

    def file_refusal(self, ix, norm, filename, version, uploaded):
        """The refusal a file URL of ``ix`` answers for a file of project ``norm``
        (BaseWalk.file_refusal), None when ``ix`` offers it. The walk is ``ix`` alone and
        needs no reader: the route has allowed reading ``ix``, and what ``ix`` offers of
        its own files is the same for every reader."""
        return BaseWalk(self, ix, norm, None, [ix]).file_refusal(ix, filename, version,
                                                                 uploaded)

    def withholds(self, ix, norm):
        """Whether the mirror ``ix`` serves nothing of the project ``norm`` and asks its
        upstream nothing about it (BaseWalk.withholds: a reserved namespace)."""
        return BaseWalk(self, ix, norm, None, [ix]).withholds(ix)

    # -- permissions -----------------------------------------------------------------------

    def read_acl(self, ix):
        """Who may read ``ix`` besides its owner and root (its acl_read, else the default)."""
        acl = ix.config.get("acl_read")
        if acl is None:
            return RESTRICTED_READ_ACL if self.restrict_reads else PUBLIC_READ_ACL
        return acl

    def may_read(self, reader, ix):
        """The read rule: whether ``reader`` (a user name, None, or a function giving one,
        asked only when the index is not readable by anyone) may see ``ix`` and what it
        holds."""
        acl = self.read_acl(ix)
        if ":ANONYMOUS:" in acl:
            return True
        name = reader() if callable(reader) else reader
        if name is None:
            return False
        return name == "root" or name == ix.user or ":AUTHENTICATED:" in acl or name in acl

    @staticmethod
    def read_refusal(reader, what):
        """The one answer for a read of ``what`` (an index path) that is not allowed, the
        same whether or not anything below it exists: 401 asking for credentials when
        anonymous, else 403."""
        name = reader() if callable(reader) else reader
        if name is None:
            return HTTPError(401, "authentication required to read %s" % what,
                             challenge=True)
        return forbidden("user %r may not read %s" % (name, what))

    def check_read(self, reader, ix):
        if not self.may_read(reader, ix):
            raise self.read_refusal(reader, ix.path)

    def is_public(self, ix):
        """Whether anyone reads ``ix`` and all it inherits from: what is served from it is
        the same for every reader (and a shared cache may keep it)."""
        return all(":ANONYMOUS:" in self.read_acl(b) for b in self.resolve_bases(ix))

    def check_listing(self, actor):
        """With restrict_reads, the lists of users and their indexes need a login."""
        if self.restrict_reads and (actor() if callable(actor) else actor) is None:
            raise HTTPError(401, "authentication required to list users and indexes",
                            challenge=True)

    def may_see_state(self, actor):
        """The one rule for what the server tells of its own state: the write serial (the
        X-Devpi-Serial header of every answer, /+status) and the counts of users, indexes,
        projects, versions, files and stored bytes. Anyone sees them, but with
        restrict_reads only logged-in users (``actor``: a name, None, or a function giving
        one, asked only then). The server directory's path is for root alone, always
        (may_see_serverdir)."""
        if not self.restrict_reads:
            return True
        return (actor() if callable(actor) else actor) is not None

    @staticmethod
    def may_see_serverdir(actor):
        """Whether ``actor`` learns where the server keeps its files: root, in every mode
        (and not with a token limited by caveats)."""
        name = actor() if callable(actor) else actor
        return name == "root" and getattr(name, "scope", None) is None

    def user_creators(self):
        """Who creates users: USER_CREATE_ROOT or USER_CREATE_ANYONE, as the server was
        told (user_create), else only root with restrict_reads (there a new account would
        read everything open to logged-in users), and anyone otherwise, as devpi."""
        if self.user_create is not None:
            return self.user_create
        return USER_CREATE_ROOT if self.restrict_reads else USER_CREATE_ANYONE

    def check_mirror_create(self, actor):
        """Refuses (403, saying who may) ``actor``'s making a mirror or setting a
        mirror_url (on an index ``actor`` may modify: that is checked before)."""
        creators = self.mirror_creators
        if actor == "root" or (actor is not None and (
                creators == MIRROR_CREATORS_ANYONE or actor in creators)):
            return
        raise forbidden(only_mirror_creators(creators))

    def check_user_create(self, actor):
        """Refuses (403, saying who may) a user creation ``actor`` may not make."""
        if self.user_creators() == USER_CREATE_ROOT and actor != "root":
            raise forbidden("only root may create users on this server")

    def can_upload(self, actor, ix, acl_key="acl_upload"):
        acl = ix.config.get(acl_key, [])
        if ":ANONYMOUS:" in acl:
            return True
        if actor is None:
            return False
        return actor == "root" or actor in acl or ":AUTHENTICATED:" in acl

    def check_upload(self, actor, ix):
        if ix.is_mirror:
            raise not_found("cannot submit to mirror index")
        if not self.can_upload(actor, ix):
            if actor is None:
                raise unauthorized()
            raise forbidden("no permission to submit")

    def check_release_admin(self, actor, ix):
        """Removing releases: the index owner or root (as devpi)."""
        if not self.can_modify_index(actor, ix.user):
            if actor is None:
                raise unauthorized()
            raise forbidden("no permission to modify index %s" % ix.path)

    # -- releases: writing ------------------------------------------------------------------

    def _project_id(self, c, ix, name, display, create):
        row = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                        (ix.id, name)).fetchone()
        if row:
            return row["id"]
        if not create:
            return None
        self._changed(project_set=[ix.id])
        return c.execute("INSERT INTO projects (index_id, name, display) VALUES (?,?,?)",
                         (ix.id, name, display)).lastrowid

    def _version_id(self, c, project_id, version, meta, now):
        row = c.execute("SELECT id, metadata FROM versions WHERE project_id=? AND version=?",
                        (project_id, version)).fetchone()
        if row:
            if meta:
                old = json.loads(row["metadata"])
                old.update({k: v for k, v in meta.items() if v not in ("", [])})
                c.execute("UPDATE versions SET metadata=? WHERE id=?",
                          (json.dumps(old), row["id"]))
            return row["id"]
        return c.execute("INSERT INTO versions (project_id, version, metadata, created) "
                         "VALUES (?,?,?,?)", (project_id, version, json.dumps(meta), now)).lastrowid

    def register(self, actor, ix, name, version, meta):
        """Create a version without files (upload form ``:action=submit``)."""
        self.check_upload(actor, ix)
        check_project_name(name)
        check_scope(actor, "upload", ix.path, name)
        if not version:
            raise bad_request("version needs to be set")
        check_version(version)
        refusal = self.private_refusal(ix, "%s %s" % (name, version), meta)
        if refusal is not None:
            raise refusal
        norm = normalize_name(name)
        self.check_namespace(ix, norm)
        with self.store.write() as c:
            pid = self._project_id(c, ix, norm, name, True)
            self._version_id(c, pid, version, meta, time.time())
            self.audit(c, actor, "release.register", ix.path, norm, version)
            self._changed(projects=[norm])

    def add_file(self, actor, ix, name, version, filename, tmp_path, sha256, size, meta,
                 rel="releasefile", for_filename=None, log_entry=None, core_metadata=None,
                 uploaded=None, as_listed=False, audit=None):
        """Store an uploaded file; the temporary file is consumed in all cases.
        ``as_listed``: a mirror keeps a file its upstream page lists with this hash, which
        changes nothing of the simple pages that list it (they are not built again).
        ``audit``: the action the audit log records (file.upload, doc.upload); None for
        what a mirror keeps (a cache, no change).

        Returns a reason phrase for the 200 answer. Raises 409 for a different file under
        an existing name on a non-volatile index.
        """
        try:
            norm = normalize_name(name)
            now = time.time() if uploaded is None else uploaded
            requires_python = meta.get("requires_python", "") or ""
            entry = log_entry or {"what": "upload", "who": actor, "when": when_list(now),
                                  "dst": ix.path}
            with self.store.write() as c:
                if c.execute("SELECT 1 FROM indexes WHERE id=?", (ix.id,)).fetchone() is None:
                    raise not_found("The stage %s could not be found." % ix.path)
                if core_metadata and not os.path.exists(self.store.blob_path(core_metadata)):
                    core_metadata = None  # (removed meanwhile: a row must not name it)
                if rel == "releasefile" and not ix.is_mirror:
                    refusal = self.substitution_refusal(c, ix, filename, sha256)
                    if refusal is not None:
                        raise refusal
                old = c.execute("SELECT id, sha256, log, core_metadata FROM files "
                                "WHERE index_id=? AND filename=?", (ix.id, filename)).fetchone()
                log_list = [entry]
                if old is not None:
                    if old["sha256"] == sha256:
                        if not ix.volatile:
                            _unlink_quiet(tmp_path)
                            return "Upload of identical file to non volatile index."
                    elif not ix.volatile:
                        raise HTTPError(409, "%s already exists in non-volatile index" % filename)
                    log_list = [overwrite_entry(json.loads(old["log"]), now), entry]
                    self._retire_file(c, ix.id, old["id"], filename, old["sha256"],
                                      old["core_metadata"])
                pid = self._project_id(c, ix, norm, name, True)
                vid = self._version_id(c, pid, version, meta, now)
                self.store.place_blob(tmp_path, sha256)
                self.store.insert_file(c, ix.id, vid, filename, rel, sha256, size, now,
                                       requires_python, core_metadata, for_filename, log_list)
                if audit:
                    self.audit(c, actor, audit, ix.path, norm, version, filename,
                               sha256=sha256, size=size, replaced=old is not None)
                if as_listed and old is None:
                    self._changed(kept=[norm])
                else:
                    self._changed(projects=[norm])
            return "OK"
        finally:
            if os.path.exists(tmp_path):
                _unlink_quiet(tmp_path)

    def first_hash(self, ix, filename):
        """The sha256 ``ix`` first kept under ``filename`` (the first_hashes table, filled
        by Store.insert_file and at the migration to schema 4), or None."""
        row = self.store.conn().execute(
            "SELECT sha256 FROM first_hashes WHERE index_id=? AND filename=?",
            (ix.id, filename)).fetchone()
        return row[0] if row is not None else None

    def substitution_refusal(self, c, ix, filename, sha256):
        """The 409 for storing ``filename`` with ``sha256`` on the private index ``ix``
        (an upload, a push) when a mirror kept that name with other bytes: a mirror of
        root's (the server's upstream: a private file must not pass for its real one) or
        any mirror ``ix`` inherits from. No silent substitution. (A mirror of another
        user's, not among the bases, refuses nothing: what its owner's upstream holds must
        not keep others from uploading.)

        Allowed, as devpi does it: a volatile index overwriting its own earlier file, and
        a stage shadowing a file of a private base, volatile or not (devpi's inheritance;
        devpi-client's test_push_existing_to_volatile and _nonvolatile rely on both).
        Neither is silent: the file's log says "overwrite", the project page says which
        index a release shadows; and one walk never serves two hashes for one name (the
        first index of the chain that has it gives it). None when nothing refuses it."""
        bases = {b.id for b in self.resolve_bases(ix)[1:] if b.is_mirror}
        # (a mirror's kept files never change bytes: first_hashes holds every one of them,
        # found by its index on the name, where the files table has none)
        for index_id, other in c.execute(
                "SELECT index_id, sha256 FROM first_hashes WHERE filename=? AND sha256<>? "
                "AND index_id<>?", (filename, sha256, ix.id)).fetchall():
            b = self.index_by_id(c, index_id)
            if b is not None and (b.id in bases or (b.is_mirror and b.user == "root")):
                return HTTPError(409, "%s was kept on %s with other bytes (sha256 %s...) than "
                                      "this one's (sha256 %s...): a file name is never served "
                                      "with two contents (no silent substitution); release "
                                      "it under a new version"
                                 % (filename, b.path, other[:16], sha256[:16]))
        return None

    def index_by_id(self, c, index_id):
        row = c.execute("SELECT id, user, name, config FROM indexes WHERE id=?",
                        (index_id,)).fetchone()
        return Index.from_row(row) if row is not None else None

    def refuses_private(self, ix):
        """Whether ``ix`` refuses files classified ``Private :: ...`` (its refuse_private;
        unset: when anonymous users may read it, where a mirror of it could expose them)."""
        value = ix.config.get("refuse_private")
        if value is None:
            return ":ANONYMOUS:" in self.read_acl(ix)
        return bool(value)

    def private_refusal(self, ix, filename, *metas):
        """The 400 for a file whose metadata (``metas``: the upload form's, the file's own
        core metadata, a pushed release's) has a ``Private ::`` classifier, on an index
        that refuses_private; None otherwise."""
        if not self.refuses_private(ix):
            return None
        for meta in metas:
            for cls in (meta or {}).get("classifiers") or ():
                if isinstance(cls, str) and cls.strip().startswith("Private ::"):
                    return bad_request(
                        "%s is classified %r and %s refuses private packages (its readers "
                        "include anonymous users: set refuse_private=false on the index to "
                        "allow it, or restrict acl_read)" % (filename, cls.strip(), ix.path))
        return None

    def upload_file(self, actor, ix, filename, tmp_path, sha256, size, fields):
        """Check and store one uploaded distribution file (consumes ``tmp_path``).

        ``fields`` are the upload form's (name, value) pairs; name, version and metadata
        missing from them are read from the file itself. Returns (reason phrase, relpath).
        """
        self.check_upload(actor, ix)
        check_filename(filename)
        first = {}
        for k, v in fields:
            first.setdefault(k, v)
        name = (first.get("name") or "").strip()
        version = (first.get("version") or "").strip()
        meta = metadata_from_form(fields)
        core = read_core_metadata(tmp_path, filename)
        file_meta = metadata_from_pkginfo(core) if core else {}
        if not name:
            name = file_meta.get("name", "")
        if not version:
            version = file_meta.get("version", "")
        split = split_filename(filename, version or None)
        if not name and split:
            name = split[0]
        if not version and split:
            version = split[1]
        if not name:
            raise bad_request("name needs to be set (no name field and none in the file)")
        if not version:
            raise bad_request("version needs to be set (no version field and none in the file)")
        check_project_name(name)
        check_version(version)
        check_scope(actor, "upload", ix.path, name)  # the project it is filed under
        self._check_open_for_uploads(ix, normalize_name(name))
        split = split_filename(filename, version)
        if split is None or split[2] == "doczip":
            raise bad_request("filename %r does not contain version %r" % (filename, version))
        if normalize_name(split[0]) != normalize_name(name):
            raise bad_request("filename %r does not match project name %r" % (filename, name))
        refusal = self.private_refusal(ix, filename, meta, file_meta)
        if refusal is not None:
            raise refusal
        if not meta or set(meta) <= {"metadata_version"}:
            file_meta.pop("name", None)
            file_meta.pop("version", None)
            meta.update(file_meta)
        elif "requires_python" not in meta and file_meta.get("requires_python"):
            meta["requires_python"] = file_meta["requires_python"]
        core_sha = None
        with self.store.write():  # the metadata blob is placed where the row naming it is
            if core is not None and filename.endswith(".whl"):
                core_sha = self.store.put_bytes(core)
            reason = self.add_file(actor, ix, name, version, filename, tmp_path, sha256, size,
                                   meta, core_metadata=core_sha, audit="file.upload")
        return reason, file_relpath(ix.path, sha256, filename)

    def _check_open_for_uploads(self, ix, norm):
        """PEP 792: an archived or quarantined project takes no new uploads; nor does a
        name reserved for other indexes (check_namespace)."""
        self.check_namespace(ix, norm)
        status = Store.project_status(self.store.conn(), ix.id, norm)
        if status is not None and status[0] in ("archived", "quarantined"):
            raise forbidden("project %s on %s is %s (PEP 792): it takes no uploads"
                            % (norm, ix.path, status[0]))

    def set_project_status(self, actor, ix, name, status, reason=None):
        """Root sets the PEP 792 status of a project of a private index ("active" clears
        it); returns {"status": ..., "reason": ...}."""
        if actor != "root":
            raise forbidden("only root can set a project's status")
        check_scope(actor, "index_modify", ix.path, name)
        if ix.is_mirror:
            raise bad_request("a mirror's project status is upstream's")
        if status not in PROJECT_STATUS_NAMES:
            raise bad_request("status must be one of %s" % ", ".join(PROJECT_STATUS_NAMES))
        if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
            raise bad_request("reason must be a string of at most 1000 characters")
        norm = normalize_name(name)
        with self.store.write() as c:
            if not c.execute("SELECT 1 FROM projects WHERE index_id=? AND name=?",
                             (ix.id, norm)).fetchone():
                raise not_found("no project %r on %s" % (norm, ix.path))
            old = Store.project_status(c, ix.id, norm)
            Store.set_project_status(c, ix.id, norm, None if status == "active"
                                     else (status, reason or None))
            self.audit(c, actor, "project.status", ix.path, norm, status=status,
                       reason=reason or None, old_status=old[0] if old else "active",
                       old_reason=old[1] if old else None)
            self._changed(projects=[norm])
        return {"status": status, "reason": reason or None}

    def upload_doczip(self, actor, ix, name, version, tmp_path, sha256, size):
        """Store a documentation zip for a release (``:action=doc_upload``). Without a
        version, the project's latest version in ``ix`` is taken, as devpi does."""
        self.check_upload(actor, ix)
        if not name:
            raise bad_request("name needs to be set for a doc upload")
        check_project_name(name)
        check_scope(actor, "upload", ix.path, name)
        norm = normalize_name(name)
        self.check_namespace(ix, norm)
        if not version:
            versions = self.version_data(ix, norm)
            if not versions:
                raise bad_request("doczip has no version and '%s' has no releases to "
                                  "derive one from" % norm)
            version = max(versions, key=version_key)
        check_version(version)
        try:
            with open(tmp_path, "rb") as f:
                doc_zip_members(f)
        except ValueError as e:
            raise bad_request("documentation zip has %s" % e)
        except (zipfile.BadZipFile, OSError):
            raise bad_request("documentation upload is not a zip file")
        filename = "%s-%s.doc.zip" % (norm, version)  # devpi's name for it
        check_filename(filename)
        return self.add_file(actor, ix, name, version, filename, tmp_path, sha256, size, {},
                             rel="doczip", audit="doc.upload")

    def _prune_toxresults(self, c, ix, for_filename):
        """Only the newest TOXRESULTS_KEPT tox results of a release file are kept (anyone
        may post one by default): the older go (no longer served; their names not used
        again)."""
        old = [r["id"] for r in c.execute(
            "SELECT id FROM files WHERE +index_id=? AND rel='toxresult' AND for_filename=? "
            "ORDER BY uploaded DESC, id DESC LIMIT ? OFFSET ?",
            (ix.id, for_filename, 2 ** 62, TOXRESULTS_KEPT)).fetchall()]
        if old:
            marks = ",".join("?" * len(old))
            self._delete_files(c, ix, "f.id IN (%s)" % marks, old)
            c.execute("DELETE FROM files WHERE id IN (%s)" % marks, old)

    def add_toxresult(self, actor, ix, filename, sha_prefix, report):
        """Keep a tox JSON report (what ``devpi test`` posts to a release file's URL) with
        that file, named as devpi names it: <file>.toxresult-<UTC YYYYmmddHHMMSS>-<n>, and
        served below the release file's hash directory. Allowed by the index's
        acl_toxresult_upload. Returns its path below the server root with #sha256=."""
        if ix.is_mirror:
            raise forbidden("cannot store toxresults on mirror index %s" % ix.path)
        if not self.can_upload(actor, ix, "acl_toxresult_upload"):
            # (anonymous too, as devpi: devpi test, the one poster, sends its credentials
            # up front and never answers a 401, so the message with the way out is better)
            raise forbidden("No permission to upload tox results. You can use the devpi "
                            "test --no-upload option to skip the upload.")
        if not isinstance(report, dict):
            raise bad_request("a toxresult is a JSON object (tox's JSON report)")
        data = json.dumps(report, ensure_ascii=False).encode("utf-8")
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        sha = None
        try:
            with self.store.write() as c:
                row = c.execute(
                    "SELECT f.sha256, f.rel, f.version_id, p.name FROM files f "
                    "JOIN versions v ON f.version_id=v.id JOIN projects p ON v.project_id=p.id "
                    "WHERE f.index_id=? AND f.filename=?", (ix.id, filename)).fetchone()
                if row is None or not row["sha256"].startswith(sha_prefix):
                    raise self._missing_file(c, ix, filename, sha_prefix)
                if row["rel"] != "releasefile":
                    raise not_found("no release file found at %s"
                                    % file_relpath(ix.path, sha_prefix, filename))
                check_scope(actor, "toxresult_upload", ix.path, row["name"])
                n = 0  # (a name once used, its result since gone, is not used again)
                while c.execute("SELECT 1 FROM files WHERE index_id=? AND filename=? UNION ALL "
                                "SELECT 1 FROM gone WHERE index_id=? AND filename=?",
                                (ix.id, "%s.toxresult-%s-%d" % (filename, stamp, n)) * 2
                                ).fetchone():
                    n += 1
                name = "%s.toxresult-%s-%d" % (filename, stamp, n)
                check_filename(name)
                entry = {"what": "upload", "who": actor, "when": when_list(now), "dst": ix.path}
                sha = self.store.put_bytes(data)  # (only once the request is allowed)
                self.store.insert_file(c, ix.id, row["version_id"], name, "toxresult", sha,
                                       len(data), now, "", None, filename, [entry])
                self.audit(c, actor, "toxresult.upload", ix.path, row["name"],
                           filename=name, sha256=sha, size=len(data), result_for=filename)
                self._prune_toxresults(c, ix, filename)
                self._changed(projects=[row["name"]])
        except Exception:
            if sha is not None:
                with self.store.write():
                    self.store.drop_unused_blobs([sha])
            raise
        return file_relpath(ix.path, row["sha256"], name) + "#sha256=" + sha

    def _retire_file(self, c, index_id, file_id, filename, sha256, core_metadata):
        """Drop a file row that another of its name replaces: its URL answers 410, and its
        blobs go once nothing names them."""
        c.execute("DELETE FROM files WHERE id=?", (file_id,))
        c.execute("INSERT INTO gone VALUES (?,?,?) ON CONFLICT DO NOTHING",
                  (index_id, filename, sha256))
        self.store.drop_unused_blobs([sha256, core_metadata])

    def _delete_files(self, c, ix, where, args):
        rows = c.execute("SELECT f.id, f.filename, f.sha256, f.core_metadata FROM files f "
                         "WHERE " + where, args).fetchall()
        for r in rows:
            c.execute("INSERT INTO gone VALUES (?,?,?) ON CONFLICT DO NOTHING",
                      (ix.id, r["filename"], r["sha256"]))
        shas = [r["sha256"] for r in rows] + [r["core_metadata"] for r in rows]
        self.store.drop_unused_blobs(shas)
        return rows

    def _check_removable(self, actor, ix, force):
        if ix.is_mirror:
            raise forbidden("cannot delete from mirror index %s" % ix.path)
        self.check_release_admin(actor, ix)
        if not ix.volatile and not force:
            return False
        return True

    def _version_id_of(self, c, ix, norm, version):
        row = c.execute("SELECT v.id FROM versions v JOIN projects p ON v.project_id=p.id "
                        "WHERE p.index_id=? AND p.name=? AND v.version=?",
                        (ix.id, norm, version)).fetchone()
        if row is None:
            raise not_found("The version %s of project %s does not exist." % (version, norm))
        return row["id"]

    def delete_version(self, actor, ix, name, version, force=False):
        norm = normalize_name(name)
        check_scope(actor, "del_verdata", ix.path, norm)
        if not self._check_removable(actor, ix, force):
            raise forbidden("cannot delete version on non-volatile index")
        with self.store.write() as c:
            version_id = self._version_id_of(c, ix, norm, version)
            rows = self._delete_files(c, ix, "f.version_id=?", (version_id,))
            c.execute("DELETE FROM versions WHERE id=?", (version_id,))
            self.audit(c, actor, "version.remove", ix.path, norm, version,
                       files=[r["filename"] for r in rows])
            self._changed(projects=[norm], project_set=[ix.id] if self._drop_empty(
                c, ix, norm) else ())

    def _drop_empty(self, c, ix, norm, version_id=None):
        """As devpi: a version whose last file is removed goes (``version_id``), and a
        project whose last version goes. Returns whether the project went."""
        if version_id is not None:
            c.execute("DELETE FROM versions WHERE id=? AND NOT EXISTS "
                      "(SELECT 1 FROM files WHERE version_id=?)", (version_id, version_id))
        return c.execute("DELETE FROM projects WHERE index_id=? AND name=? AND NOT EXISTS "
                         "(SELECT 1 FROM versions WHERE project_id=projects.id)",
                         (ix.id, norm)).rowcount > 0

    def delete_project(self, actor, ix, name, force=False):
        norm = normalize_name(name)
        check_scope(actor, "del_project", ix.path, norm)
        if not self._check_removable(actor, ix, force):
            raise forbidden("cannot delete project on non-volatile index")
        with self.store.write() as c:
            row = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                            (ix.id, norm)).fetchone()
            if row is None:
                raise not_found("project %r not found on %s" % (norm, ix.path))
            rows = self._delete_files(c, ix, "f.version_id IN (SELECT id FROM versions "
                                             "WHERE project_id=?)", (row["id"],))
            c.execute("DELETE FROM projects WHERE id=?", (row["id"],))
            self.audit(c, actor, "project.remove", ix.path, norm,
                       files=[r["filename"] for r in rows])
            self._changed(projects=[norm], project_set=[ix.id])

    def delete_file(self, actor, ix, filename, sha_prefix, force=False):
        if not self._check_removable(actor, ix, force):
            raise forbidden("cannot delete file on non-volatile index")
        with self.store.write() as c:
            row = c.execute(
                "SELECT f.id, f.sha256, f.version_id, p.name FROM files f "
                "JOIN versions v ON f.version_id=v.id "
                "JOIN projects p ON v.project_id=p.id WHERE f.index_id=? AND f.filename=?",
                (ix.id, filename)).fetchone()
            if row is None or not row["sha256"].startswith(sha_prefix):
                raise self._missing_file(c, ix, filename, sha_prefix)
            check_scope(actor, "del_entry", ix.path, row["name"])  # the file's own project
            # toxresults of this file go with it
            # (+index_id: found by id and files_for_filename, not by a walk of the index)
            rows = self._delete_files(c, ix, "+f.index_id=? AND (f.id=? OR f.for_filename=?)",
                                      (ix.id, row["id"], filename))
            c.execute("DELETE FROM files WHERE +index_id=? AND (id=? OR for_filename=?)",
                      (ix.id, row["id"], filename))
            self.audit(c, actor, "file.remove", ix.path, row["name"], filename=filename,
                       sha256=row["sha256"], files=[r["filename"] for r in rows])
            self._changed(projects=[row["name"]], project_set=[ix.id] if self._drop_empty(
                c, ix, row["name"], row["version_id"]) else ())

    def set_yanked(self, actor, ix, name, version, yanked):
        """PEP 592: yank (True or a reason) or unyank (False) a release on a private index."""
        if ix.is_mirror:
            raise forbidden("cannot yank on mirror index %s" % ix.path)
        if not (self.can_modify_index(actor, ix.user) or
                (actor is not None and self.can_upload(actor, ix))):
            if actor is None:
                raise unauthorized()
            raise forbidden("no permission to yank on %s" % ix.path)
        if yanked is True:
            value = ""
        elif yanked is False or yanked is None:
            value = None
        elif isinstance(yanked, str):
            value = yanked
        else:
            raise bad_request("'yanked' must be true, false or a reason string")
        norm = normalize_name(name)
        check_scope(actor, "del_verdata", ix.path, norm)
        with self.store.write() as c:
            version_id = self._version_id_of(c, ix, norm, version)
            old = c.execute("SELECT yanked FROM versions WHERE id=?", (version_id,)).fetchone()
            if old[0] != value:  # kept for the time machine (BaseWalk.yanked_then)
                if not c.execute("SELECT 1 FROM yank_history WHERE version_id=? LIMIT 1",
                                 (version_id,)).fetchone():
                    c.execute("INSERT INTO yank_history VALUES (?,NULL,?)",
                              (version_id, old[0]))
                c.execute("INSERT INTO yank_history VALUES (?,?,?)",
                          (version_id, time.time(), value))
            c.execute("UPDATE versions SET yanked=? WHERE id=?", (value, version_id))
            self.audit(c, actor, "unyank" if value is None else "yank", ix.path, norm,
                       version, reason=value, was_yanked=old[0] is not None)
            self._changed(projects=[norm])

    def push(self, actor, src, name, version, target, no_docs=False, only_docs=False):
        """Copy a release with its files to another index; returns devpi's action log.

        The release is read in the transaction that writes the copy: one deleted meanwhile
        is not pushed, and no row is ever written for bytes that are gone."""
        norm = normalize_name(name)
        check_scope(actor, "pkg_read", src.path, norm)
        check_scope(actor, "upload", target.path, norm)
        if target.is_mirror:
            raise not_found("cannot submit to mirror index")
        if not self.can_upload(actor, target):
            raise HTTPError(401 if actor is None else 403,
                            "user %r cannot upload to %r" % (actor, target.path))
        self.check_namespace(target, norm)
        now = time.time()
        with self.store.write() as c:
            if c.execute("SELECT 1 FROM indexes WHERE id=?", (target.id,)).fetchone() is None:
                raise not_found("The stage %s could not be found." % target.path)
            found = None
            for ix in self.chain(src, actor):
                row = c.execute(
                    "SELECT v.id, v.metadata, p.display, v.version FROM versions v "
                    "JOIN projects p ON v.project_id=p.id "
                    "WHERE p.index_id=? AND p.name=? AND v.version=?",
                    (ix.id, norm, version)).fetchone()
                if row is not None:
                    found = (ix, row)
                    break
            if found is None:
                raise bad_request("there are no files for %s %s on stage %s"
                                  % (name, version, src.path))
            ix, release = found
            display, version = release["display"], release["version"]
            files = c.execute(
                "SELECT filename, rel, sha256, size, uploaded, requires_python, core_metadata, "
                "log FROM files WHERE version_id=? AND rel IN ('releasefile', 'doczip') "
                "ORDER BY id",
                (release["id"],)).fetchall()
            if no_docs:
                files = [f for f in files if f["rel"] != "doczip"]
            if only_docs:
                files = [f for f in files if f["rel"] == "doczip"]
            actionlog = [[200, "register", display, version, "->", target.path]]
            for f in files:
                old = c.execute("SELECT sha256 FROM files WHERE index_id=? AND filename=?",
                                (target.id, f["filename"])).fetchone()
                if old is not None and not target.volatile and old["sha256"] != f["sha256"]:
                    raise HTTPError(409, "%s already exists in non-volatile index"
                                    % f["filename"])
                if f["rel"] == "releasefile":
                    refusal = self.substitution_refusal(c, target, f["filename"], f["sha256"])
                    if refusal is None and self.refuses_private(target):
                        refusal = self.private_refusal(
                            target, f["filename"], json.loads(release["metadata"]),
                            self._file_core_metadata(f["filename"], f["sha256"],
                                                     f["core_metadata"]))
                    if refusal is not None:
                        raise refusal
            pid = self._project_id(c, target, norm, display, True)
            tvid = self._version_id(c, pid, version, json.loads(release["metadata"]), now)
            for f in files:
                filename, sha = f["filename"], f["sha256"]
                store_what = "store_%s" % ("releasefile" if f["rel"] == "releasefile"
                                           else "doczip")
                stored = file_relpath(target.path, sha, filename)
                old = c.execute("SELECT id, sha256, core_metadata, log FROM files "
                                "WHERE index_id=? AND filename=?",
                                (target.id, filename)).fetchone()
                # as devpi writes it: the target's overwrite entry, the file's history
                # (a release file's without its overwrites at the source; a mirrored
                # file's origin is not history), the push
                log_list = []
                if old is not None:
                    if old["sha256"] == sha:
                        actionlog.append([200, store_what, stored])
                        continue
                    log_list.append(overwrite_entry(json.loads(old["log"]), now))
                    self._retire_file(c, target.id, old["id"], filename, sha256=old["sha256"],
                                      core_metadata=old["core_metadata"])
                log_list.extend(e for e in json.loads(f["log"] or "[]")
                                if e.get("what") != "mirror" and (
                                    f["rel"] != "releasefile" or e.get("what") != "overwrite"))
                log_list.append({"what": "push", "who": actor, "when": when_list(now),
                                 "src": ix.path, "dst": target.path})
                self.store.insert_file(c, target.id, tvid, filename, f["rel"], sha, f["size"],
                                       f["uploaded"], f["requires_python"], f["core_metadata"],
                                       log=log_list)
                actionlog.append([200, store_what, stored])
            if not only_docs:
                self._push_toxresults(c, release["id"], ix, target, tvid, files, actor, now,
                                      actionlog)
            self.audit(c, actor, "push", target.path, norm, version, source=ix.path,
                       files=[a[2].rpartition("/")[2] for a in actionlog[1:]])
            self._changed(projects=[norm])
        return actionlog

    def _file_core_metadata(self, filename, sha256, core_sha=None):
        """The core metadata a stored release file carries in itself ({} if none can be
        read), as upload_file reads it (a wheel's kept PEP 658 blob when there is one): a
        push is held to what the file says, not only to the release's metadata."""
        try:
            if core_sha:
                with open(self.store.blob_path(core_sha), "rb") as f:
                    core = f.read(MAX_METADATA_BYTES + 1)
            else:
                core = read_core_metadata(self.store.blob_path(sha256), filename)
        except (HTTPError, OSError):
            return {}
        return metadata_from_pkginfo(core) if core else {}

    def _push_toxresults(self, c, vid, src, target, tvid, files, actor, now, actionlog):
        """The toxresults of the pushed release files go with them (as in devpi), their
        log kept and a push entry added."""
        pushed = {f["filename"]: f["sha256"] for f in files if f["rel"] == "releasefile"}
        for t in c.execute("SELECT filename, sha256, size, uploaded, for_filename, log "
                           "FROM files WHERE version_id=? AND rel='toxresult' ORDER BY id",
                           (vid,)).fetchall():
            rsha = pushed.get(t["for_filename"])
            if rsha is None:
                continue
            stored = file_relpath(target.path, rsha, t["filename"])
            if c.execute("SELECT 1 FROM files WHERE index_id=? AND filename=?",
                         (target.id, t["filename"])).fetchone() is None:
                log_list = [e for e in json.loads(t["log"]) if e.get("what") != "overwrite"]
                log_list.append({"what": "push", "who": actor, "when": when_list(now),
                                 "src": src.path, "dst": target.path})
                self.store.insert_file(c, target.id, tvid, t["filename"], "toxresult",
                                       t["sha256"], t["size"], t["uploaded"], "", None,
                                       t["for_filename"], log=log_list)
                self._prune_toxresults(c, target, t["for_filename"])
            actionlog.append([200, "store_toxresult", stored])

    # -- releases: reading ------------------------------------------------------------------

    def project_names(self, ix, reader, ignore_bases=False, at=None):
        """{normalised name: display name} of the projects an index serves to ``reader``;
        with ``at``, those that had a release file uploaded at or before it."""
        return dict(self.project_listing(ix, reader, ignore_bases, at, displays=True))

    def project_listing(self, ix, reader, ignore_bases=False, at=None, displays=False):
        """The normalised names of the projects an index serves to ``reader``
        (``project_names``), sorted, each once; with ``displays``, (name, display name)
        pairs, the display name of the first index in the chain that has it. A generator
        that reads each index's rows in the order of the projects table's key (index_id,
        name; without ``displays`` from that key alone) and merges them: a listing of any
        size comes out in bounded memory, without a sort."""
        sql = "SELECT name%s FROM projects p WHERE index_id=?" % (
            ", display" if displays else "")
        if at is not None:
            sql += (" AND EXISTS (SELECT 1 FROM versions v JOIN files f ON f.version_id=v.id"
                    " WHERE v.project_id=p.id AND f.rel='releasefile' AND f.uploaded<=?)")
        sql += " ORDER BY name"

        def rows(b):
            cur = self.store.conn().cursor()
            cur.row_factory = None  # (plain tuples: a third faster than sqlite3.Row)
            return cur.execute(sql, (b.id,) if at is None else (b.id, at))

        def ranked(rank, b):
            for row in rows(b):
                yield row[0], rank, row
        chain = self.chain(ix, reader, ignore_bases)
        rules = self.listing_filter(chain)  # (names blocked or withheld stay out)
        if len(chain) == 1:
            keeps = rules.keeps if rules is not None else None
            for row in rows(chain[0]):
                if keeps is None or keeps(0, row[0]):
                    yield row if displays else row[0]
            return
        last = None
        # (by name, then rank: at one name, the row of the index first in the chain first;
        # one that index leaves out may still come from another that offers it)
        for norm, rank, row in heapq.merge(*[ranked(i, b) for i, b in enumerate(chain)]):
            if norm != last and (rules is None or rules.keeps(rank, norm)):
                last = norm
                yield row if displays else norm

    def project_rows(self, ix, offset, limit):
        """(the number of projects ``ix`` itself holds, [(name, display, latest version,
        summary, uploaded)] of ``limit`` of them from ``offset`` on, by name): a page of a
        list of any length, read in the order of the projects table's key."""
        c = self.store.conn()
        total = c.execute("SELECT COUNT(*) FROM projects WHERE index_id=?",
                          (ix.id,)).fetchone()[0]
        rows = c.execute(
            "SELECT p.name, p.display, COALESCE(s.version, ''), COALESCE(s.summary, ''), "
            "s.uploaded FROM projects p LEFT JOIN search s ON s.project_id=p.id "
            "WHERE p.index_id=? ORDER BY p.name LIMIT ? OFFSET ?", (ix.id, limit, offset))
        return total, [tuple(r) for r in rows]

    _FILE_COLS = ("f.filename, f.rel, f.sha256, f.size, f.uploaded, f.requires_python, "
                  "f.core_metadata, v.yanked, f.for_filename, f.log")

    def local_files(self, ix, norm):
        """Release files an index itself holds for a project (None: no such project)."""
        c = self.store.conn()
        rows = c.execute(
            "SELECT v.version, " + self._FILE_COLS + " FROM projects p "
            "JOIN versions v ON v.project_id=p.id "
            "LEFT JOIN files f ON f.version_id=v.id AND f.rel='releasefile' "
            "WHERE p.index_id=? AND p.name=? ORDER BY f.id", (ix.id, norm)).fetchall()
        if not rows:
            if c.execute("SELECT 1 FROM projects WHERE index_id=? AND name=?",
                         (ix.id, norm)).fetchone():
                return []
            return None
        return [File.from_row(ix.path, norm, r["version"], r) for r in rows
                if r["filename"] is not None]

    def project_files(self, walk, mirror_files=None):
        """Release files of the walk's project through its visible indexes: a file name
        already seen in an earlier index is not repeated. None if no index has the project.
        ``mirror_files(mirror_index, name)`` gives a mirror's files (fetching them
        upstream); without it, mirrors give what they hold locally."""
        norm = walk.project
        files = []
        seen = set()
        found = False
        for b in walk.visible:
            if b.is_mirror:
                got = mirror_files(b, norm) if mirror_files else self.local_files(b, norm)
            else:
                got = self.local_files(b, norm) if walk.holds(b) else None
            if got is None:
                continue
            found = True
            check = walk.filters(b)
            for f in got:
                if f.filename not in seen and (not check or walk.offers(
                        b, f.version, f.uploaded, f.filename)):
                    seen.add(f.filename)
                    if walk.at is not None:
                        f.yanked = walk.yanked_then(b, f)
                    files.append(f)
        return files if found else None

    def project_versions(self, ix, norm, reader, walk=None):
        """Every version string of a project through the index and its bases (the mirrors
        the whitelist hides included: what they kept), as ``walk`` offers them: a version
        with release files only if one of them is offered (BaseWalk.offers), one without
        (registered only) if it was created by the walk's ``at``."""
        walk = walk or self.walk(ix, norm, reader)
        out = set()
        c = self.store.conn()
        for b in walk.chain:
            if not walk.holds(b):
                continue
            if not walk.filters(b):
                for (v,) in c.execute("SELECT v.version FROM versions v JOIN projects p "
                                      "ON v.project_id=p.id WHERE p.index_id=? AND p.name=?",
                                      (b.id, norm)):
                    out.add(v)
                continue
            for v, created, uploaded, filename in c.execute(
                    "SELECT v.version, v.created, f.uploaded, f.filename FROM versions v "
                    "JOIN projects p ON v.project_id=p.id LEFT JOIN files f ON "
                    "f.version_id=v.id AND f.rel='releasefile' WHERE p.index_id=? AND "
                    "p.name=?", (b.id, norm)):
                if v in out:
                    continue
                if uploaded is None:
                    if (walk.at is None or created <= walk.at) and walk.offers(b, v, created):
                        out.add(v)
                elif walk.offers(b, v, uploaded, filename):
                    out.add(v)
        return out

    def releases(self, walk, mirror_data, version=None, sources=False):
        """{version: [(metadata, yanked, [File]), ...]} of the walk's project through its
        visible indexes: first the release that counts, then the ones it shadows (devpi's
        ``+shadowing``), in the order of the chain; only ``version`` if given. None when no
        index has the project. ``mirror_data(mirror_index)`` gives a mirror's
        {version: (metadata, yanked, [File])}, or None. With ``sources``, each release
        also names the index it comes from: (metadata, yanked, [File], index path)."""
        out = {}
        found = False
        for b in walk.visible:
            if b.is_mirror:
                data = mirror_data(b)
                if data is None:
                    continue
            elif walk.holds(b):
                data = self.version_data(b, walk.project, version)
            else:
                continue
            found = True
            check = walk.filters(b)
            for ver, release in data.items():
                if version is None or ver == version:
                    if check and any(f.rel == "releasefile" for f in release[2]):
                        offered = [f for f in release[2] if f.rel != "releasefile" or
                                   walk.offers(b, ver, f.uploaded, f.filename)]
                        if not any(f.rel == "releasefile" for f in offered):
                            continue  # every release file held back: no such release
                        release = (release[0], release[1], offered)
                    elif check and not walk.policy_allows(b, ver):
                        continue  # (a release without files, blocked)
                    out.setdefault(ver, []).append(release + (b.path,) if sources
                                                   else release)
        return out if found else None

    def version_data(self, ix, norm, version=None):
        """{version: (metadata dict, yanked, [File])} of one index's own project."""
        c = self.store.conn()
        args = [ix.id, norm]
        sql = ("SELECT v.id, v.version, v.metadata, v.yanked, p.display FROM versions v "
               "JOIN projects p ON v.project_id=p.id WHERE p.index_id=? AND p.name=?")
        if version is not None:
            sql += " AND v.version=?"
            args.append(version)
        out = {}
        for vid, ver, meta, yanked, display in c.execute(sql, args).fetchall():
            files = [File.from_row(ix.path, norm, ver, r) for r in c.execute(
                "SELECT " + self._FILE_COLS.replace("v.yanked", "NULL AS yanked") +
                " FROM files f WHERE f.version_id=? ORDER BY f.id", (vid,))]
            meta = json.loads(meta)
            meta = full_metadata(display, ver, meta)
            out[ver] = (meta, yanked, files)
        return out

    @staticmethod
    def _missing_file(c, ix, filename, sha_prefix):
        """The error for a +f URL that names no file: 410 if it named a deleted one."""
        if c.execute("SELECT 1 FROM gone WHERE index_id=? AND filename=? AND sha256 LIKE ?",
                     (ix.id, filename, sha_prefix + "%")).fetchone():
            return HTTPError(410, "file %r existed, deleted in later serial" % filename)
        return not_found("no such file")

    def find_file(self, ix, filename, sha_prefix):
        """(File, blob path) for a +f URL; raises 404, or 410 for a deleted file."""
        c = self.store.conn()
        row = c.execute(
            "SELECT p.name, v.version, " + self._FILE_COLS + " FROM files f "
            "JOIN versions v ON f.version_id=v.id JOIN projects p ON v.project_id=p.id "
            "WHERE f.index_id=? AND f.filename=?", (ix.id, filename)).fetchone()
        path_sha = row["sha256"] if row is not None else ""
        if row is not None and row["rel"] == "toxresult":  # under its release file's hash
            rf = c.execute("SELECT sha256 FROM files WHERE index_id=? AND filename=?",
                           (ix.id, row["for_filename"])).fetchone()
            path_sha = rf["sha256"] if rf is not None else ""
        if row is None or not path_sha.startswith(sha_prefix):
            raise self._missing_file(c, ix, filename, sha_prefix)
        return File.from_row(ix.path, row["name"], row["version"], row)

    SBOM_CACHE_WHEELS = 4096  # wheels whose SBOM lists are kept (by content)

    def sboms(self, f):
        """PEP 770: {name: zip entry} of the SBOMs in the release file ``f``: those of a
        wheel whose bytes the server keeps (a mirrored wheel once it was first fetched),
        else none. Read from the wheel's central directory when first asked, then kept
        by content (the sha256), for the last SBOM_CACHE_WHEELS wheels."""
        if not f.filename.endswith(".whl") or not f.sha256 or f.rel != "releasefile":
            return {}
        found = self._sboms.get(f.sha256)
        if found is None:
            try:
                with open(self.store.blob_path(f.sha256), "rb") as fh:
                    found = wheel_sboms(fh)
            except FileNotFoundError:
                return {}
            except (OSError, ValueError, zipfile.BadZipFile) as e:  # (ArchiveTooLarge too)
                log("WARNING: the SBOMs of %s can't be read: %s" % (f.filename, e))
                found = {}
            with self._sboms_lock:
                while len(self._sboms) >= self.SBOM_CACHE_WHEELS:
                    self._sboms.pop(next(iter(self._sboms)), None)
                self._sboms[f.sha256] = found
        return found


# ===================================================================================
# 6. mirror
# ===================================================================================

MIRROR_CONNECT_TIMEOUT = 5.0   # seconds; pip's own default timeout (15 s) stays larger
MIRROR_READ_TIMEOUT = 10.0
# Upstream answers are bounded: a project page is read up to MAX_PAGE_BYTES and may list at
# most MAX_PAGE_LINKS files (the largest real pages are well below both); the project list
# (600,000 names, ~30 MB today) is streamed to disk, never held whole, and bounded too.
# Pages and the list are asked for gzipped and the caps hold on the decompressed bytes, as
# they stream (a gzip bomb stops at the cap). Files are asked for uncompressed and kept as
# sent; a file is bounded by --max-request-body-size, as an upload is.
MAX_PAGE_BYTES = 20 * 1024 * 1024
MAX_PAGE_LINKS = 100000
MAX_ROOT_BYTES = 256 * 1024 * 1024
MAX_ROOT_NAMES = 2000000
MAX_REDIRECTS = 5
FAILURE_BACKOFF = 10.0  # seconds a failed upstream page is not asked for again
# A read timeout bounds each read, not a whole fetch: an upstream that sends a byte a
# second would hold a thread for ever. So each fetch also has a total deadline (Fetch):
# a page (project page, metadata, provenance) must be done within the connect timeout +
# PAGE_DEADLINE_READS read timeouts; a file or the project list must average at least
# --mirror-min-rate bytes a second (MIRROR_MIN_RATE) from its start, after a grace of
# the connect + read timeouts (a file of N bytes: done within connect + read + N/rate).
# A fetch nobody waits for any more (every client that asked went away) goes on only
# while it keeps that rate counted from then: a healthy download still fills the cache.
PAGE_DEADLINE_READS = 3
MIRROR_MIN_RATE = 16 * 1024
WATCH_INTERVAL = 0.25  # seconds between the watchdog's looks at the fetches under way
# Names upstream has no project for (404) are remembered in memory only, the last
# NEGATIVE_KEPT of them, each for the index's mirror_cache_expiry: anonymous requests
# for random names leave neither rows nor an ever-growing cache.
NEGATIVE_KEPT = 10000
FRESH_KEPT = 20000  # (index, project) -> time of the last upstream check, kept in memory
VIA_HEADER = "X-Minidevpi-Via"  # marks our own upstream requests, to detect a loop


class UpstreamError(HTTPError):
    """The upstream of a mirror failed: 502 (bad answer) or 504 (no answer in time)."""


# -- simple pages: what the mirror's project list and the HTTP layer's pages share ----

def simple_html_head(title, heading=False, version="1.1", meta=()):
    """The start of a simple page in HTML (PEP 503; the repository version of PEP 629),
    through <body> and, with ``heading``, the title as <h1>; SIMPLE_HTML_END ends it.
    ``meta``: more (name, content) <meta> elements."""
    t = html.escape(title)
    more = "".join('<meta name="%s" content="%s">' % (html.escape(n), html.escape(c))
                   for n, c in meta)
    return ('<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" '
            'content="%s">%s<title>%s</title></head><body>\n' % (version, more, t)
            + ("<h1>%s</h1>\n" % t if heading else ""))


SIMPLE_HTML_END = "</body></html>\n"


LISTING_BATCH = 2000  # names a chunk of a project list holds (simple_root_chunks)
_PLAIN_TEXT = re.compile(r"[A-Za-z0-9._ -]*")  # (what HTML and JSON take as it is)


def simple_root_links(names, prefix=""):
    """The <a> lines of a project list from (normalised name, name shown) pairs, the
    links relative, after ``prefix``."""
    names = list(names)
    p = html.escape(prefix)
    if _PLAIN_TEXT.fullmatch(" ".join(n for pair in names for n in pair)):
        esc = str  # (project names are: a list of 100k is built in a quarter of the time)
    else:
        esc = html.escape
    return "".join('<a href="%s%s/">%s</a>\n' % (p, esc(norm), esc(shown))
                   for norm, shown in names)


SIMPLE_ROOT_JSON_HEAD = '{"meta": {"api-version": "1.1"}, "projects": ['
SIMPLE_ROOT_JSON_END = "]}"


def simple_root_json_items(names):
    """The items of a project list in JSON (PEP 691), comma-separated, from names."""
    quote = json.encoder.encode_basestring
    return ", ".join('{"name": %s}' % quote(n) for n in names)


def simple_root_chunks(names, fmt, prefix=""):
    """An index's project list (PEP 503 HTML or PEP 691 JSON) as chunks of bytes, made
    as ``names`` (normalised, sorted; an iterable of any length) come: a list of any
    size in bounded memory. HTML links relative, after ``prefix``."""
    batch = []

    def batches():
        for n in names:
            batch.append(n)
            if len(batch) >= LISTING_BATCH:
                yield batch
                del batch[:]
        if batch:
            yield batch
    if fmt == "json":
        yield SIMPLE_ROOT_JSON_HEAD.encode()
        sep = ""
        for b in batches():
            yield (sep + simple_root_json_items(b)).encode()
            sep = ", "
        yield SIMPLE_ROOT_JSON_END.encode()
        return
    yield simple_html_head("Simple index").encode()
    for b in batches():
        yield simple_root_links(((n, n) for n in b), prefix).encode()
    yield SIMPLE_HTML_END.encode()


# -- the upstream HTTP client ---------------------------------------------------------

PARSED_PAGES_KEPT = 64     # mirrored pages whose parsed entries the mirror keeps in memory
POOL_IDLE_SECONDS = 30.0   # an idle upstream connection older than this is not reused
POOL_PER_HOST = 16         # idle connections kept per (scheme, host, port, proxy)
POOL_TOTAL = 64            # idle connections kept in all
_STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
# A host's addresses are looked up once and used (checked by the mirror policy where it
# applies) for this long: a cold install opens tens of connections at once, and a resolver
# that loses a query makes each lookup wait its retry (5 s with glibc's defaults).
DNS_CACHE_SECONDS = 60.0
DNS_CACHE_HOSTS = 256      # (host, port) pairs kept; more, and all are forgotten


class Client:
    """Who waits for the answer a thread works on: the HTTP layer gives each request one
    (``serving``) with ``check``, a look whether its connection is still there; ``here()``
    until it went away or was given up on (``left``). The mirror's fetches ask it."""

    _local = threading.local()

    def __init__(self, check=None):
        self.check = check
        self.left = False

    def here(self):
        if self.left:
            return False
        try:
            return self.check is None or bool(self.check())
        except Exception:
            return False

    @classmethod
    def current(cls):
        return getattr(cls._local, "client", None)

    @classmethod
    def waiters(cls):
        """The clients waiting for this thread's work: those of the flight it leads, else
        its own request's (a list, shared and growing while followers join)."""
        got = getattr(cls._local, "waiters", None)
        if got is not None:
            return got
        me = cls.current()
        return [me] if me is not None else []

    @classmethod
    @contextlib.contextmanager
    def serving(cls, client):
        cls._local.client, cls._local.waiters = client, None
        try:
            yield client
        finally:
            client.left = True  # (answered: it waits no more, whatever its connection does)
            cls._local.client = cls._local.waiters = None


class SingleFlight:
    """Many threads, one doing the work: ``flight(key)`` yields True to the one caller that
    should do it; the others wait (at most ``wait`` seconds) until it is done and get False
    (they then read what it stored, or do it themselves if it failed). The clients of
    those waiting are the leader's too (``Client.waiters``): a fetch nobody waits for
    any more is found out."""

    def __init__(self, wait, across=None):
        self.wait = wait
        self._flights = {}
        self._lock = threading.Lock()
        # ``across(key, wait)``: a context that makes the leader one across processes too
        # (Store.flight_lock); the leader then looks again at what the other one stored
        self._across = across

    @contextlib.contextmanager
    def flight(self, key):
        me = Client.current()
        with self._lock:
            got = self._flights.get(key)
            leader = got is None
            if leader:
                got = self._flights[key] = (threading.Event(), list(Client.waiters()))
            elif me is not None:
                got[1].append(me)
        ev, waiters = got
        if not leader:
            ev.wait(self.wait)
            yield False
            return
        outer = getattr(Client._local, "waiters", None)
        Client._local.waiters = waiters
        try:
            if self._across is None:
                yield True
            else:
                with self._across(key, self.wait):
                    yield True
        finally:
            Client._local.waiters = outer
            with self._lock:
                self._flights.pop(key, None)
            ev.set()


class _Resolver:
    """getaddrinfo for the mirror's connections, each answer kept DNS_CACHE_SECONDS and
    looked up by one thread at a time (the others wait for its answer). Failures are not
    kept; a host whose kept addresses refuse a connection is looked up again (``forget``).
    Only what the mirror policy saw is ever connected to: the kept answer is the one it
    checked."""

    def __init__(self):
        self._lock = threading.Lock()
        self._known = {}  # (host, port) -> (monotonic time of the lookup, infos)
        self._flights = SingleFlight(60)

    def _kept(self, key):
        with self._lock:
            got = self._known.get(key)
        if got is not None and time.monotonic() - got[0] < DNS_CACHE_SECONDS:
            return got[1]
        return None

    def resolve(self, host, port):
        key = (host, port)
        infos = self._kept(key)
        if infos is not None:
            return infos
        with self._flights.flight(key) as leader:
            infos = None if leader else self._kept(key)  # (else its lookup failed: ours)
            if infos is None:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                with self._lock:
                    if len(self._known) >= DNS_CACHE_HOSTS:
                        self._known.clear()
                    self._known[key] = (time.monotonic(), infos)
            return infos

    def forget(self, host, port):
        with self._lock:
            self._known.pop((host, port), None)


class _SSLContexts:
    """One client SSL context for the process, built on first use and built again only
    when the CA configuration changes: SSL_CERT_FILE / SSL_CERT_DIR (what the stdlib's
    default context reads) or the file's size and mtime."""

    def __init__(self):
        self.lock = threading.Lock()
        self.key = None
        self.context = None

    def get(self):
        import ssl
        cafile, capath = os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR")
        try:
            st = os.stat(cafile or ssl.get_default_verify_paths().openssl_cafile)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except (OSError, TypeError, ValueError):
            stamp = None
        key = (cafile, capath, stamp)
        with self.lock:
            if self.context is None or key != self.key:
                self.context = ssl.create_default_context()
                self.key = key
            return self.context


SSL_CONTEXTS = _SSLContexts()


class _Lease:
    """An upstream connection lent to one response: ``close()`` gives it back to the pool
    when the response was read to its end and may be followed by another, else closes it;
    either way its fetch (``fetch``) is over."""

    def __init__(self, upstream, key, conn, resp, fetch=None):
        self.upstream, self.key, self.conn, self.resp = upstream, key, conn, resp
        self.fetch = fetch

    def close(self):
        conn, self.conn = self.conn, None
        if self.fetch is not None and not self.fetch.finish():
            if conn is not None:
                conn.close()  # (cut: its socket is shut)
            return
        if conn is not None:
            self.upstream._release(self.key, conn, self.resp)


class Fetch:
    """One upstream request under way, from its first connection to its body's last
    byte, under a total deadline. The watchdog (``Upstream._watch``) enforces it by
    shutting the socket, whatever read it waits in (the status line, a header, a chunk
    size, the body); the reader then raises ``error()``, a 504.

    A page (``min_rate`` None): the connect timeout + PAGE_DEADLINE_READS read timeouts.
    A file or project list: connect + read timeout + bytes received / ``min_rate``.
    Once no client waits for it (``waiters``, Client), it must keep ``rate`` bytes a
    second counted from that moment, after a read timeout's grace."""

    def __init__(self, upstream, url, min_rate=None):
        now = time.monotonic()
        self.upstream = upstream
        self.url = url
        self.rate = min_rate
        self.start = now
        self.grace = upstream.connect_timeout + upstream.read_timeout
        self.fixed = None if min_rate else (
            now + upstream.connect_timeout + PAGE_DEADLINE_READS * upstream.read_timeout)
        self.received = 0  # bytes on the wire, all hops
        self.base = 0      # (the bytes that count for the rate: those after ``start``)
        self.conn = None
        self.cut = None    # why the watchdog cut it
        self.done = False
        self.waiters = Client.waiters()
        self.abandoned = False
        self.lock = threading.Lock()

    def deadline(self):
        d = self.fixed if self.fixed is not None else float("inf")
        if self.rate:
            d = min(d, self.start + self.grace + (self.received - self.base) / self.rate)
        return d

    def attach(self, conn):
        """The connection this fetch now reads from (one per redirect hop)."""
        with self.lock:
            self.conn = conn
            if self.cut is not None:
                raise self.error()

    def error(self):
        return UpstreamError(504, "upstream %s: %s" % (_safe_url(self.url), self.cut))

    def client_gone(self):
        """The leader's own client stopped reading (its answer could not be sent)."""
        me = Client.current()
        if me is not None:
            me.left = True

    def look(self, now):
        """The watchdog's look: abandoned? past the deadline? then cut."""
        if not self.abandoned and self.waiters and not any(
                c.here() for c in list(self.waiters)):
            self.abandoned = True  # from now on: the minimum rate, or cut
            self.rate = self.upstream.min_rate
            self.start, self.base = now, self.received
            self.grace = self.upstream.read_timeout
        if now <= self.deadline():
            return
        if self.abandoned:
            why = ("cut: no client waits for it and it came at less than %d bytes a "
                   "second" % self.upstream.min_rate)
        elif self.fixed is not None:
            why = ("not read within %g seconds (the connect timeout + %d read timeouts)"
                   % (self.fixed - self.start, PAGE_DEADLINE_READS))
        else:
            why = ("cut: it came at less than %d bytes a second (--mirror-min-rate)"
                   % self.rate)
        self.stop(why)

    def stop(self, why):
        with self.lock:
            if self.done or self.cut is not None:
                return
            self.cut = why
            conn = self.conn
        self.upstream._untrack(self)  # (its reader raises error(), and finishes it)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:  # (the plain socket's shutdown, also under TLS: wakes any read)
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass
        log("WARNING: upstream fetch of %s %s" % (_safe_url(self.url), why))

    def finish(self):
        """The fetch is over; False if it had been cut (its connection is not reused)."""
        with self.lock:
            self.done = True
            self.conn = None
        self.upstream._untrack(self)
        return self.cut is None


class Upstream:
    """The mirror's HTTP client: GET with a few redirects, each hop checked against the
    mirror policy first (``_route``), bodies read within a bound, credentials sent in a
    header and never repeated in a message. Requests carry VIA_HEADER with ``server_id``,
    so that a mirror of this very server is found out.

    Connections are HTTP/1.1 keep-alive, kept in a small pool per (scheme, host, port,
    proxy) after an answer was read to its end; one is dropped on any error, on an answer
    that says close, when idle too long or found closed by the peer, and is reused only for
    a request whose checked addresses include the one it is connected to. A request on a
    reused connection that the peer had closed meanwhile (nothing of an answer received)
    is sent once more on a new connection."""

    def __init__(self, server_id, connect_timeout=MIRROR_CONNECT_TIMEOUT,
                 read_timeout=MIRROR_READ_TIMEOUT, allow_hosts=(), min_rate=MIRROR_MIN_RATE):
        self.server_id = server_id
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.min_rate = max(1, min_rate or MIRROR_MIN_RATE)
        self._fetches = set()  # Fetch objects under way, which the watchdog looks at
        self._watch_lock = threading.Lock()
        self._watcher = None
        self.allow_hosts = parse_allow_hosts(allow_hosts)
        self._idle = {}  # pool key -> [(connection, time it went idle)], newest last
        self._idle_count = 0
        self._pool_lock = threading.Lock()
        self.resolver = _Resolver()
        self.connections_made = 0  # (for tests and the benchmark)

    def open(self, url, origin, headers=None, compressed=False, large=False):
        """GET ``url`` upstream (following a few redirects), for the mirror whose
        ``mirror_url`` is ``origin``; every hop must pass the mirror policy (``_route``).
        ``compressed`` asks for gzip (pages: ``body_chunks`` decompresses within its
        bound; never for files, which are kept as upstream sends them). Returns
        (response, final URL, connection); the caller reads the body and closes the
        connection (which goes back to the pool if the body was read to its end).

        The whole fetch, all hops and the body, is one Fetch under a deadline: a page's
        fixed one, or with ``large`` (files, the project list) the minimum rate's.
        (The response carries it as ``resp.minidevpi_fetch``, for ``body_chunks``.)"""
        fetch = Fetch(self, url, self.min_rate if large else None)
        self._track(fetch)
        try:
            resp, url, lease = self._open(url, origin, headers, compressed, fetch)
        except BaseException:
            fetch.finish()
            raise
        lease.fetch = fetch
        resp.minidevpi_fetch = fetch
        return resp, url, lease

    def _track(self, fetch):
        with self._watch_lock:
            self._fetches.add(fetch)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, daemon=True,
                                                 name="minidevpi-upstream-watch")
                self._watcher.start()

    def _untrack(self, fetch):
        with self._watch_lock:
            self._fetches.discard(fetch)

    def _watch(self):
        """The watchdog: a look at each fetch under way every WATCH_INTERVAL; it ends when
        there is none (the next fetch starts it again)."""
        while True:
            with self._watch_lock:
                if not self._fetches:
                    self._watcher = None
                    return
                fetches = list(self._fetches)
            now = time.monotonic()
            for f in fetches:
                try:
                    f.look(now)
                except Exception as e:  # (never let the watchdog die)
                    log("ERROR: upstream watchdog: %r" % (e,))
            time.sleep(WATCH_INTERVAL)

    def cut_all(self, why="cut: the server stops"):
        """Cut every fetch under way (the server stops)."""
        with self._watch_lock:
            fetches = list(self._fetches)
        for f in fetches:
            f.stop(why)

    def _open(self, url, origin, headers, compressed, fetch):
        import http.client
        import ssl
        seen = set()
        for _hop in range(MAX_REDIRECTS + 1):
            if fetch.cut is not None:
                raise fetch.error()
            if url in seen:
                raise UpstreamError(502, "upstream redirect loop at %s" % _safe_url(url))
            seen.add(url)
            try:
                u = urllib.parse.urlsplit(url)
                port = u.port or (443 if u.scheme == "https" else 80)
                if u.scheme not in ("http", "https") or not u.hostname:
                    raise ValueError
            except ValueError:
                raise UpstreamError(502, "unsupported upstream URL %s" % _safe_url(url))
            addresses = self._route(u, port, origin)
            proxy = _proxy_for(u)
            key = (u.scheme, u.hostname, port, proxy)
            target = u.path or "/"
            if u.query:
                target += "?" + u.query
            if proxy and u.scheme != "https":
                target = _safe_url(url.partition("#")[0])  # credentials go in a header
            h = {"User-Agent": "minidevpi/%s" % __version__,
                 "Accept-Encoding": "gzip" if compressed else "identity",
                 VIA_HEADER: self.server_id}
            h.update(headers or {})
            if u.username is not None:
                h["Authorization"] = "Basic " + base64.b64encode(("%s:%s" % (
                    urllib.parse.unquote(u.username),
                    urllib.parse.unquote(u.password or ""))).encode()).decode()
            conn = None
            try:
                conn = self._pooled(key, None if proxy else addresses)
                if conn is not None:
                    fetch.attach(conn)
                    try:
                        conn.request("GET", target, headers=h)
                        resp = conn.getresponse()
                    except _STALE_ERRORS + (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                        # closed by the peer while idle, before any answer: once more, anew
                        conn.close()
                        conn = None
                if conn is None:
                    conn = self._connect(u, port, addresses, proxy)
                    fetch.attach(conn)
                    conn.request("GET", target, headers=h)
                    resp = conn.getresponse()
            except UpstreamError:
                if conn is not None:
                    conn.close()
                raise
            except socket.timeout:
                if conn is not None:
                    conn.close()
                if fetch.cut is not None:
                    raise fetch.error()
                raise UpstreamError(504, "upstream %s did not answer in time" % _safe_url(url))
            except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as e:
                if conn is not None:
                    conn.close()
                if fetch.cut is not None:
                    raise fetch.error()
                # (what a host root did not name answered is not repeated to the client)
                detail = e if addresses is None else type(e).__name__
                raise UpstreamError(502, "upstream %s failed: %s" % (_safe_url(url), detail))
            lease = _Lease(self, key, conn, resp)
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                try:
                    url = urllib.parse.urljoin(url, resp.getheader("Location"))
                except ValueError:
                    url = ""  # (refused as unsupported at the next hop)
                self._drain(resp)
                with fetch.lock:
                    fetch.conn = None  # (pooled again: no more this fetch's to cut)
                lease.close()
                continue
            if resp.status == 400 and resp.getheader(VIA_HEADER) == self.server_id:
                lease.close()
                raise UpstreamError(502, "mirror_url %s points at this server itself; "
                                         "refusing to mirror from ourselves" % _safe_url(url))
            return resp, url, lease
        raise UpstreamError(502, "upstream %s redirects too often" % _safe_url(url))

    def _connect(self, u, port, addresses, proxy):
        """A new connection for URL ``u``: to ``addresses`` (checked) unless None."""
        import http.client
        host, hport = (proxy[0], proxy[1]) if proxy else (u.hostname, port)
        if u.scheme == "https":
            conn = http.client.HTTPSConnection(host, hport, timeout=self.connect_timeout,
                                               context=SSL_CONTEXTS.get())
        else:
            conn = http.client.HTTPConnection(host, hport, timeout=self.connect_timeout)
        conn.auto_open = 0  # never connects again by itself (a pooled one: to anywhere)
        try:
            # connect to the addresses that were checked, not to whatever the name
            # resolves to a moment later (DNS rebinding); TLS still checks the name. A
            # host the policy does not check (or a proxy): its kept addresses.
            if addresses is None or proxy:
                addresses = self.resolver.resolve(host, hport)
            conn._create_connection = _connect_to(addresses)
            if proxy and u.scheme == "https":
                conn.set_tunnel(u.hostname, port)
            conn.connect()
            conn.sock.settimeout(self.read_timeout)
        except BaseException as e:
            conn.close()
            if isinstance(e, OSError) and not isinstance(e, socket.gaierror):
                self.resolver.forget(host, hport)  # (moved? looked up again next time)
            raise
        self.connections_made += 1
        return conn

    def _pooled(self, key, addresses):
        """An idle connection for ``key`` that is still open and, where the policy gave
        ``addresses``, connected to one of them; or None."""
        import select
        now = time.monotonic()
        drop = []
        found = None
        with self._pool_lock:
            idle = self._idle.get(key)
            while idle:
                conn, since = idle.pop()
                self._idle_count -= 1
                if now - since > POOL_IDLE_SECONDS:
                    drop.append(conn)
                    continue
                found = conn
                break
            if idle is not None and not idle:
                del self._idle[key]
        for conn in drop:
            conn.close()
        if found is None:
            return None
        try:
            if found.sock is None:
                raise OSError
            if addresses is not None:
                peer = found.sock.getpeername()[:2]
                if not any(a[4][:2] == peer for a in addresses):
                    raise OSError  # (connected where this request may not go)
            # readable while idle: the peer closed it (or sent what nobody asked for)
            if hasattr(select, "poll"):  # (select() refuses descriptors above 1023)
                poller = select.poll()
                poller.register(found.sock, select.POLLIN)
                readable = poller.poll(0)
            else:
                readable = select.select([found.sock], [], [], 0)[0]
            if readable:
                raise OSError
        except (OSError, ValueError):
            found.close()
            return None
        return found

    def _release(self, key, conn, resp):
        """Back into the pool if ``resp`` was read to its end and the connection may go on."""
        try:
            if resp is not None and not resp.isclosed() and resp.length == 0:
                resp.read()  # (an empty body: 304, or Content-Length: 0)
        except Exception:
            pass
        if resp is None or not resp.isclosed() or resp.will_close or conn.sock is None:
            conn.close()
            return
        drop = []
        with self._pool_lock:
            idle = self._idle.setdefault(key, [])
            idle.append((conn, time.monotonic()))
            self._idle_count += 1
            if len(idle) > POOL_PER_HOST:
                drop.append(idle.pop(0)[0])
                self._idle_count -= 1
            while self._idle_count > POOL_TOTAL:
                oldest = min(self._idle, key=lambda k: self._idle[k][0][1])
                drop.append(self._idle[oldest].pop(0)[0])
                self._idle_count -= 1
                if not self._idle[oldest]:
                    del self._idle[oldest]
        for c in drop:
            c.close()

    def close_idle(self):
        """Close every pooled connection."""
        with self._pool_lock:
            conns = [c for idle in self._idle.values() for c, _ in idle]
            self._idle.clear()
            self._idle_count = 0
        for c in conns:
            c.close()

    def _drain(self, resp, limit=65536):
        """Read a small body (a redirect's) to its end so that the connection can go on."""
        try:
            if resp.length is not None and resp.length <= limit and not resp.chunked:
                resp.read()
        except Exception:
            pass

    def _route(self, u, port, origin):
        """The mirror policy for one request to URL ``u`` (split) on ``port``: None when
        it may go wherever the host name leads (the host of the index's own ``mirror_url``,
        same scheme and port, which root chose; or a ``--mirror-allow-host``). Any other
        host must resolve to publicly routable addresses only: then those addresses, the
        only ones to connect to. Anything else is refused before a connection is made,
        with the same answer whatever (if anything) is there."""
        host = u.hostname
        if origin is not None and _origin(origin) == (u.scheme, host, port):
            return None
        if (host, port) in self.allow_hosts or (host, None) in self.allow_hosts:
            return None
        try:
            infos = self.resolver.resolve(host, port)
        except (OSError, UnicodeError, ValueError):
            infos = []
        if infos and all(is_public_address(info[4][0]) for info in infos):
            return infos
        shown = "[%s]" % host if ":" in host else host
        raise UpstreamError(502, "the link to %s://%s:%d was refused by the mirror policy "
                                 "(a mirror fetches only from its mirror_url's own host, "
                                 "from hosts with public addresses only, and from hosts "
                                 "allowed with --mirror-allow-host)" % (u.scheme, shown, port))

    def read_body(self, resp, url, limit, what="page"):
        """The whole body, checked against Content-Length: a short body is an error."""
        return b"".join(self.body_chunks(resp, url, limit, what=what))

    def body_chunks(self, resp, url, limit, size=65536, what="page", too_large=None,
                    decode=True, partial=False):
        """The body in chunks, checked against ``limit`` (raising ``too_large`` beyond it)
        and Content-Length: a short body is an error. With ``decode`` a gzip body is
        decompressed as it streams and ``limit`` holds for the decompressed bytes (a
        file is never decoded: it is kept as sent). With ``partial`` a chunk is what
        one read gives, not ``size`` bytes (a stream's first bytes go on at once)."""
        import http.client
        want = resp.getheader("Content-Length")
        if too_large is None:
            too_large = UpstreamError(502, "upstream %s %s is larger than %d bytes; not read"
                                      % (what, _safe_url(url), limit))
        if want is not None and want.isdigit() and int(want) > limit:
            raise too_large
        encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
        gunzip = None
        if decode and encoding in ("gzip", "x-gzip"):
            import zlib
            gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif decode and encoding != "identity":
            raise UpstreamError(502, "upstream %s %s came with Content-Encoding %r, which "
                                     "minidevpi does not read" % (what, _safe_url(url),
                                                                  encoding[:40]))
        read = resp.read1 if partial else resp.read
        fetch = getattr(resp, "minidevpi_fetch", None)
        wire = total = 0
        while True:
            try:
                chunk = read(size)
            except socket.timeout:
                if fetch is not None and fetch.cut is not None:
                    raise fetch.error()
                raise UpstreamError(504, "upstream %s stalled" % _safe_url(url))
            except (OSError, http.client.HTTPException, ValueError) as e:
                if fetch is not None and fetch.cut is not None:
                    raise fetch.error()
                raise UpstreamError(502, "upstream %s broke off: %s" % (_safe_url(url), e))
            if fetch is not None:
                if fetch.cut is not None:
                    raise fetch.error()
                fetch.received += len(chunk)
            if not chunk:
                break
            wire += len(chunk)
            if gunzip is None:
                total += len(chunk)
                if total > limit:
                    raise too_large
                yield chunk
                continue
            while chunk:
                for part in self._gunzip(gunzip, chunk, limit - total, size, url, what):
                    total += len(part)
                    if total > limit:
                        raise UpstreamError(502, "upstream %s %s is larger than %d bytes "
                                            "(decompressed); not read"
                                            % (what, _safe_url(url), limit))
                    yield part
                chunk = gunzip.unused_data if gunzip.eof else b""
                if chunk:  # another gzip member follows
                    gunzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
        if want is not None and want.isdigit() and int(want) != wire:
            raise UpstreamError(502, "upstream %s sent %d of %s bytes"
                                % (_safe_url(url), wire, want))
        if gunzip is not None and not gunzip.eof:
            raise UpstreamError(502, "upstream %s %s: its gzip stream is cut short"
                                % (what, _safe_url(url)))

    @staticmethod
    def _gunzip(d, data, room, size, url, what):
        """Decompressed parts of ``data``, each at most ``size`` bytes, stopping once more
        than ``room`` came out (the caller refuses that): memory stays bounded."""
        import zlib
        out = 0
        while data:
            try:
                part = d.decompress(data, max(1, min(size, room - out + 1)))
            except zlib.error:
                raise UpstreamError(502, "upstream %s %s is not valid gzip"
                                    % (what, _safe_url(url)))
            out += len(part)
            if part:
                yield part
            if out > room or d.eof:
                return
            data = d.unconsumed_tail
            if not part and not data:
                return


def _with_userinfo(url, shown, unreadable):
    """``url`` with the user info before its host replaced by ``shown(userinfo)`` (None:
    left out); ``unreadable`` for a URL that can't be split."""
    try:
        u = urllib.parse.urlsplit(url)
    except ValueError:
        return unreadable
    if "@" not in u.netloc:
        return url
    userinfo, _, hostport = u.netloc.rpartition("@")
    userinfo = shown(userinfo)
    netloc = hostport if userinfo is None else userinfo + "@" + hostport
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def _safe_url(url):
    """A URL without its credentials, for messages and logs."""
    return _with_userinfo(url, lambda _userinfo: None, "(unreadable URL)")


def shown_mirror_url(url):
    """``mirror_url`` as shown to anyone but root: the password (or a user name alone,
    which may be a token) replaced by ``***``."""
    if not isinstance(url, str) or "@" not in url:
        return url
    return _with_userinfo(url, lambda userinfo: userinfo.partition(":")[0] + ":***"
                          if ":" in userinfo else "***", "***")


def _origin(url):
    """(scheme, host, port) of a URL, or None."""
    try:
        u = urllib.parse.urlsplit(url)
        return u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
    except ValueError:
        return None


def parse_allow_hosts(values):
    """{(host, port or None)} from ``--mirror-allow-host`` values: HOST, HOST:PORT,
    [IPv6] or [IPv6]:PORT, each value possibly a comma-separated list."""
    out = set()
    if isinstance(values, str):  # (from a config file)
        values = [values]
    for value in values or ():
        for item in str(value).split(","):
            item = item.strip().lower()
            if not item:
                continue
            port = None
            if item.startswith("["):
                host, _, rest = item[1:].partition("]")
                if rest:
                    if not rest.startswith(":"):
                        raise ValueError("bad --mirror-allow-host %r" % item)
                    port = rest[1:]
            elif item.count(":") == 1:
                host, _, port = item.partition(":")
            else:
                host = item  # a name, an IPv4 address or a bare IPv6 address
            if port is not None:
                if not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError("bad port in --mirror-allow-host %r" % item)
                port = int(port)
            if not host:
                raise ValueError("bad --mirror-allow-host %r" % item)
            out.add((host, port))
    return out


def is_public_address(addr):
    """True for an address that is publicly routable: not loopback, private, link-local,
    site-local, shared (CGNAT), multicast, reserved or unspecified -- also when an IPv6
    address carries an IPv4 one (IPv4-mapped, 6to4, NAT64)."""
    import ipaddress
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in ipaddress.ip_network("64:ff9b::/96"):
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return is_public_address(str(inner))
        if ip.is_site_local or ip.teredo is not None:
            return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _connect_to(addresses):
    """A replacement for http.client's socket.create_connection that connects only to
    ``addresses`` (getaddrinfo results), in order."""
    def create(_address, timeout=None, source_address=None):
        error = None
        for family, socktype, proto, _name, sockaddr in addresses:
            sock = socket.socket(family, socktype, proto)
            try:
                if isinstance(timeout, (int, float)):
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error or OSError("no address to connect to")
    return create


# what urllib reads to choose a proxy for http(s) (REQUEST_METHOD: under CGI it ignores
# HTTP_PROXY, a header a client can set)
_PROXY_ENV = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
              "REQUEST_METHOD")
_PROXY_ANSWERS = {}


def _proxy_for(u):
    """(host, port) of the proxy for a URL, from the usual environment variables; kept per
    scheme and host while those variables are unchanged (urllib reads them by walking the
    whole environment, twice: 0.2 ms a request, on every upstream request of a cold
    install)."""
    key = (u.scheme, u.hostname, tuple(map(os.environ.get, _PROXY_ENV)))
    answer = _PROXY_ANSWERS.get(key, False)
    if answer is False:
        answer = _proxy_lookup(u)
        if len(_PROXY_ANSWERS) >= 256:
            _PROXY_ANSWERS.clear()
        _PROXY_ANSWERS[key] = answer
    return answer


def _proxy_lookup(u):
    import urllib.request
    if urllib.request.proxy_bypass(u.hostname or ""):
        return None
    proxy = urllib.request.getproxies().get(u.scheme)
    if not proxy:
        return None
    p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
    if not p.hostname:
        return None
    return p.hostname, p.port or 80


# -- upstream pages ------------------------------------------------------------------

class _LinkParser:
    """Collects the <a> elements of a PEP 503 page: (attributes, text); more than
    ``limit`` of them is an error (raised while parsing, before they take memory)."""

    def __init__(self, limit=None, page_url=""):
        from html.parser import HTMLParser
        outer = self

        class P(HTMLParser):
            def handle_starttag(self, tag, attrs):
                if tag == "meta":
                    d = dict(attrs)
                    if d.get("name") in PAGE_META_NAMES and isinstance(d.get("content"), str):
                        outer.meta.setdefault(d["name"], d["content"])
                if tag == "a":
                    if limit is not None and len(outer.links) >= limit:
                        raise _too_many_links(page_url)
                    outer._current = dict(attrs)
                    outer._text = []

            def handle_data(self, data):
                if outer._current is not None:
                    outer._text.append(data)

            def handle_endtag(self, tag):
                if tag == "a" and outer._current is not None:
                    outer.links.append((outer._current, "".join(outer._text).strip()))
                    outer._current = None

        self.links = []
        self.meta = {}  # the <meta> of PAGE_META_NAMES: name -> content
        self._current = None
        self._text = []
        self.parser = P(convert_charrefs=True)

    def feed(self, text):
        self.parser.feed(text)
        return self


MAX_YANK_LOG = 50  # changes of a mirrored file's yank state kept (the latest)
# a PEP 740 provenance document is a few KiB (attestations of one file); larger is refused
MAX_PROVENANCE_BYTES = 256 * 1024


PAGE_META_NAMES = ("pypi:project-status", "pypi:project-status-reason")
MAX_STATUS_REASON = 1000  # characters of a status reason kept (upstream's text is data)


def clean_project_status(status, reason):
    """(status, reason) of PEP 792 from upstream's values, or None for active (also for
    an unknown status: PEP 792 has no others, and none of them is a reason to hide)."""
    if not isinstance(status, str) or status not in PROJECT_STATUS_NAMES or status == "active":
        return None
    reason = reason[:MAX_STATUS_REASON] if isinstance(reason, str) and reason else None
    return status, reason


def parse_upload_time(value):
    """A PEP 700 upload-time (ISO 8601, UTC) as a POSIX timestamp, or None."""
    if not isinstance(value, str):
        return None
    import datetime
    if _FROMISOFORMAT_READS_Z:  # (what upstream pages hold, thousands a page: the C way)
        try:
            return datetime.datetime.fromisoformat(value).timestamp()
        except (ValueError, OverflowError):
            pass
    try:
        v = value.strip().replace("Z", "+00:00")
        if "." in v:  # fromisoformat on 3.9/3.10 wants 3 or 6 fraction digits
            head, _, rest = v.partition(".")
            digits = re.match(r"\d*", rest).group(0)
            v = head + "." + (digits + "000000")[:6] + rest[len(digits):]
        return datetime.datetime.fromisoformat(v).timestamp()
    except (ValueError, OverflowError):
        return None


_FROMISOFORMAT_READS_Z = sys.version_info >= (3, 11)


def _entry(filename, url, sha256, requires_python=None, yanked=None, core_metadata=None,
           size=None, upload_time=None, md5=None, provenance=None):
    e = {"filename": filename, "url": url, "sha256": sha256,
         "requires_python": requires_python or "", "yanked": yanked,
         "core_metadata": core_metadata, "size": size, "upload_time": upload_time}
    if sha256 is None:  # a link upstream gives no sha256 for: fetched, then hashed here
        e["md5"] = md5
    elif provenance:  # PEP 740: upstream's URL of the file's provenance document
        e["provenance"] = provenance
    return e


_PLAIN_URL_RE = re.compile(r"https?://[A-Za-z0-9._~%!$&'()*+,=:@-]+(?:/[^?#;\[\]\\\x00-\x20\x7f]*)?\Z")


def _page_link(page_url, href):
    """``href`` of an upstream page made absolute, as ``urllib.parse.urljoin`` does; a
    plain absolute http(s) URL (ASCII, a host, no query, fragment, parameters, brackets,
    control characters, space or backslash: what an index's file links are) is taken as it is, which is
    what urljoin would give, without its cost (half of parsing a large page)."""
    if href.isascii() and _PLAIN_URL_RE.match(href):
        return href
    return urllib.parse.urljoin(page_url, href)


def _join_url(page_url, value):
    """An upstream URL (PEP 740's provenance) made absolute, or None when not one."""
    if not isinstance(value, str) or not value or len(value) > 4096:
        return None
    try:
        url = urllib.parse.urljoin(page_url, value)
    except ValueError:
        return None
    return url if url.startswith(("http://", "https://")) else None


_EXT_KEY_PART_RE = re.compile(r"^[A-Za-z0-9.-]+$")
EXT_KEY_MAX = 200
# what the +e route takes as a key: ext_key's text form or its hash form (16 hex digits)
EXT_KEY_RE = re.compile(r"^(?:https?_[A-Za-z0-9._-]+|[0-9a-f]{16})$")


def ext_key(url):
    """The key of an upstream file that has no sha256 in our URL for it (+e/KEY/name):
    devpi's text, the scheme, host, port and directories of upstream's URL joined by
    ``_`` (``http://localhost:8080/pkg/a.zip``: ``http_localhost_8080_pkg``), when each of
    them is letters, digits, ``.`` and ``-`` only, not dots alone (so the key is one path
    segment, and no part holds the separator or is ``..``) and the URL has no query or credentials;
    else (and past EXT_KEY_MAX) ``ext_hash_key``. Two URLs of one page may still give one
    text (a port or a directory): find_entry answers such a key for neither."""
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError:
        return ext_hash_key(url)
    host = u.netloc.rpartition(":")[0] if port is not None else u.netloc
    parts = [u.scheme, host] + ([str(port)] if port is not None else []) + \
        u.path.split("/")[1:-1]
    if (u.scheme not in ("http", "https") or u.query or "@" in u.netloc
            or not all(_EXT_KEY_PART_RE.match(x) and x.strip(".") for x in parts)):
        return ext_hash_key(url)
    key = "_".join(parts)
    return key if len(key) <= EXT_KEY_MAX else ext_hash_key(url)


def ext_hash_key(url):
    """The +e key of an upstream URL whose text ext_key does not use (and of every URL
    before keys took devpi's text: the +e URLs a lock file holds from then still work):
    stable for as long as upstream's URL is, and nothing of that URL's text."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]


_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")


def _clean_sha(value):
    if isinstance(value, str) and _SHA256_RE.match(value):
        return value.lower()
    return None


def _clean_md5(value):
    if isinstance(value, str) and _MD5_RE.match(value):
        return value.lower()
    return None


_MIRROR_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.!+_]*$")


def mirror_file_project(filename):
    """The project (normalised) a mirror files a distribution named ``filename`` under: the
    one whose upstream page it is looked up on (Mirror.find_entry), or None."""
    split = split_filename(filename)
    return normalize_name(split[0]) if split else None


@functools.lru_cache(maxsize=16384)  # (asked again for each entry of a page it lists)
def _file_of_project(filename, norm):
    """Whether an upstream file name is a distribution of project ``norm`` (a link on
    one project's page that names another project's file is dropped)."""
    try:
        check_filename(filename)
    except HTTPError:
        return False
    split = split_filename(filename)
    return bool(split and normalize_name(split[0]) == norm
                and _MIRROR_VERSION_RE.match(split[1]))


def _is_display_of(display, norm):
    """Whether an upstream display name is a valid project name spelling ``norm``."""
    return (isinstance(display, str) and len(display) <= 200
            and bool(PROJECT_NAME_RE.match(display)) and normalize_name(display) == norm)


def _too_many_links(page_url):
    return UpstreamError(502, "upstream page %s lists more than %d files; not read"
                         % (_safe_url(page_url), MAX_PAGE_LINKS))


def parse_project_page(body, content_type, page_url, status=None):
    """(display name, [file entries]) of an upstream PEP 691 JSON or PEP 503 HTML page.
    A link without a (well-formed) sha256 gets sha256 None (and its md5 if one is given):
    it is hashed when first fetched. A page with more than MAX_PAGE_LINKS links is refused.
    ``status``, a list, gets the page's PEP 792 project status appended (None: active)."""
    status = status if status is not None else []
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in (SIMPLE_JSON, JSON_TYPE) or ctype.endswith("+json"):
        # every JSON value but the last in a container is followed by a comma: counting
        # commas and brackets bounds what json.loads would build, before it builds it
        if body.count(b",") + body.count(b"{") + body.count(b"[") > MAX_PAGE_LINKS * 20:
            raise _too_many_links(page_url)
        try:
            data = json.loads(body.decode("utf-8"))
            raw = data["files"]
            if not isinstance(raw, list):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
            raise UpstreamError(502, "upstream %s answered with an unreadable JSON page"
                                % _safe_url(page_url))
        if len(raw) > MAX_PAGE_LINKS:
            raise _too_many_links(page_url)
        entries = []
        for f in raw:
            if not isinstance(f, dict):
                continue
            filename, href = f.get("filename"), f.get("url")
            if not isinstance(filename, str) or not isinstance(href, str):
                continue
            hashes = f.get("hashes")
            if not isinstance(hashes, dict):
                hashes = {}
            meta = f.get("core-metadata") if "core-metadata" in f else \
                f.get("dist-info-metadata")
            meta_sha = _clean_sha(meta.get("sha256")) if isinstance(meta, dict) else None
            yanked = f.get("yanked")
            yanked = (yanked if isinstance(yanked, str) else "") if yanked else None
            size = f.get("size")
            rp = f.get("requires-python")
            provenance = f.get("provenance")
            try:
                url = _page_link(page_url, href)
            except ValueError:
                continue
            entries.append(_entry(filename, url, _clean_sha(hashes.get("sha256")),
                                  rp if isinstance(rp, str) else None, yanked, meta_sha,
                                  size if isinstance(size, int) else None,
                                  parse_upload_time(f.get("upload-time")),
                                  _clean_md5(hashes.get("md5")),
                                  _join_url(page_url, provenance) if provenance else None))
        name = data.get("name") if isinstance(data.get("name"), str) else None
        ps = data.get("project-status")
        status.append(clean_project_status(ps.get("status"), ps.get("reason"))
                      if isinstance(ps, dict) else None)
        return name, entries
    if ctype in ("text/html", SIMPLE_HTML, "application/xhtml+xml", ""):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = body.decode("latin-1")
        entries = []
        parsed = _LinkParser(MAX_PAGE_LINKS, page_url).feed(text)
        status.append(clean_project_status(parsed.meta.get("pypi:project-status"),
                                           parsed.meta.get("pypi:project-status-reason")))
        for attrs, label in parsed.links:
            href = attrs.get("href")
            if not href:
                continue
            try:  # (the fragment split off first: a plain link then needs no urljoin)
                url, _, fragment = href.partition("#")
                url = _page_link(page_url, url)
            except ValueError:
                continue
            filename = urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])
            sha = md5 = None
            if fragment.startswith("sha256="):
                sha = _clean_sha(fragment[7:])
            elif fragment.startswith("md5="):
                md5 = _clean_md5(fragment[4:])
            meta = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
            meta_sha = _clean_sha(meta[7:]) if meta and meta.startswith("sha256=") else None
            # PEP 592: the attribute yanks, with or without a value (none: no reason)
            yanked = (attrs["data-yanked"] or "") if "data-yanked" in attrs else None
            entries.append(_entry(filename, url, sha, attrs.get("data-requires-python"),
                                  yanked, meta_sha, None,
                                  parse_upload_time(attrs.get("data-upload-time")), md5,
                                  _join_url(page_url, attrs.get("data-provenance"))))
        return None, entries
    raise UpstreamError(502, "upstream %s answered with %r, not an index page"
                        % (_safe_url(page_url), content_type))


class Mirror:
    """On-demand mirrors (indexes of type ``mirror``): project pages fetched from
    ``mirror_url`` and kept ``mirror_cache_expiry`` seconds, files fetched on first
    download, checked against upstream's sha256 and kept for good, so installs keep
    working with the upstream unplugged. ``offline`` makes no upstream traffic at all."""

    def __init__(self, model, offline=False, connect_timeout=MIRROR_CONNECT_TIMEOUT,
                 read_timeout=MIRROR_READ_TIMEOUT, max_file=DEFAULT_MAX_BODY, allow_hosts=(),
                 min_rate=MIRROR_MIN_RATE):
        import collections
        self.model = model
        self.store = model.store
        self.offline = offline
        self.upstream = Upstream(model.store.uuid, connect_timeout, read_timeout, allow_hosts,
                                 min_rate)
        self.max_file = max_file
        # (a follower waits at most as long as the slowest upstream answer may take)
        self._flights = SingleFlight(connect_timeout + read_timeout * 6 + 60,
                                     model.store.flight_lock)
        self._fresh = {}  # (index id, project) -> time upstream last confirmed the page
        self._failed = {}  # (index id, project) -> (time, error) of the last upstream failure
        self._root_refreshing = set()
        self._root_keys = {}  # index id -> the rules key its project list file has
        self._parsed = {}  # (index id, project) -> (files column, its entries), see _entries
        # (index id, project) -> when upstream said it has no such project (404): the
        # last NEGATIVE_KEPT, each valid for the index's mirror_cache_expiry
        self._negative = collections.OrderedDict()
        self._negative_lock = threading.Lock()
        model.on_upstream_change(self._forget_index)

    @staticmethod
    def origin_of(ix):
        """The upstream ``ix`` may fetch from whatever its addresses (Upstream._route): its
        mirror_url for a mirror of root's, which only root configures; None for another
        user's (--mirror-creators), held to public hosts and --mirror-allow-host like
        every other link, whoever set its mirror_url (an import, a later change of the
        option, root itself: nothing makes a user's mirror_url trusted)."""
        return ix.config.get("mirror_url") if ix.user == "root" else None

    def _forget_index(self, index_id):
        with self._negative_lock:
            for key in [k for k in self._negative if k[0] == index_id]:
                self._negative.pop(key, None)
        for cache in (self._fresh, self._failed, self._parsed):
            for key in [k for k in cache if k[0] == index_id]:
                cache.pop(key, None)
        self._root_keys.pop(index_id, None)
        shutil.rmtree(os.path.join(self.store.serverdir, "+mirror", str(index_id)),
                      ignore_errors=True)

    # -- one fetch at a time per thing --------------------------------------------------

    def single_flight(self, key):
        """Yields True to the one caller that should do the work; the others wait until
        it is done and get False (they then read what it stored)."""
        return self._flights.flight(key)

    # -- project pages ------------------------------------------------------------------

    def _page_url(self, ix, norm):
        base = ix.config.get("mirror_url", "")
        return base.rstrip("/") + "/" + norm + "/"

    def _expiry(self, ix):
        # at least a second, so that one request (or a burst) asks upstream once
        return max(1.0, ix.config.get("mirror_cache_expiry", DEFAULT_MIRROR_CACHE_EXPIRY))

    def _row(self, ix, norm):
        return self.store.conn().execute(
            "SELECT fetched, status, etag, last_modified, display, files FROM mirror_pages "
            "WHERE index_id=? AND project=?", (ix.id, norm)).fetchone()

    def _entries(self, ix, norm, text):
        """The entries of a kept page from its ``files`` column, parsed again only when
        that changed: a cold page is read by the page's build, and each file and metadata
        request reads it again (a large upstream page takes milliseconds to parse). The
        entries are shared: nobody changes them."""
        key = (ix.id, norm)
        got = self._parsed.get(key)
        if got is not None and (got[0] is text or got[0] == text):
            return got[1]
        entries = json.loads(text)
        self._remember(key, text, entries)
        return entries

    def _missing(self, ix, key):
        """True while upstream's "no such project" for ``key`` is younger than the
        index's expiry."""
        when = self._negative.get(key)
        return when is not None and time.time() - when < self._expiry(ix)

    def _remember_missing(self, key, now):
        with self._negative_lock:
            self._negative.pop(key, None)
            self._negative[key] = now
            while len(self._negative) > NEGATIVE_KEPT:
                self._negative.popitem(last=False)

    def _forget_missing(self, key):
        if key in self._negative:
            with self._negative_lock:
                self._negative.pop(key, None)

    def _mark_fresh(self, key, when):
        fresh = self._fresh
        if key not in fresh and len(fresh) >= FRESH_KEPT:
            fresh.clear()  # (only saves a look at the row: read again when wanted)
        fresh[key] = when

    def _remember(self, key, text, entries):
        parsed = self._parsed
        parsed.pop(key, None)
        parsed[key] = (text, entries)
        while len(parsed) > PARSED_PAGES_KEPT:
            try:
                del parsed[next(iter(parsed))]
            except (KeyError, StopIteration, RuntimeError):
                break

    def page(self, ix, norm):
        """(display, entries) of a mirrored project, or None when upstream has no such
        project. Fetches or revalidates upstream when the cached page expired; serves a
        stale page (logging a warning) when upstream fails. A name that is not a valid
        project name is no project: upstream is not asked."""
        if self.offline or len(norm) > 200 or not PROJECT_NAME_RE.match(norm):
            return None
        key = (ix.id, norm)
        if self._missing(ix, key):
            return None
        fresh = self._fresh.get(key)
        if fresh is not None and time.time() - fresh < self._expiry(ix):
            row = self._row(ix, norm)
            if row is not None:
                return (row["display"], self._entries(ix, norm, row["files"])) if row["status"] == 200 else None
        row = self._row(ix, norm)
        if row is not None and time.time() - row["fetched"] < self._expiry(ix):
            self._mark_fresh(key, row["fetched"])
            return (row["display"], self._entries(ix, norm, row["files"])) if row["status"] == 200 else None
        failed = self._failed.get(key)
        if failed is not None and time.time() - failed[0] < min(FAILURE_BACKOFF,
                                                                 self._expiry(ix)):
            # upstream failed a moment ago: don't make every request wait for it again
            if row is not None and row["status"] == 200:
                return row["display"], self._entries(ix, norm, row["files"])
            raise failed[1]
        with self.single_flight(("page",) + key) as leader:
            # the one before us in the flight may have just fetched it, found that upstream
            # has no such project, or failed (then its answer is ours: no second try)
            if not leader:
                if self._missing(ix, key):
                    return None
                failed = self._failed.get(key)
                if failed is not None and time.time() - failed[0] < min(
                        FAILURE_BACKOFF, self._expiry(ix)):
                    if row is not None and row["status"] == 200:
                        return row["display"], self._entries(ix, norm, row["files"])
                    raise failed[1]
            newer = self._row(ix, norm)
            if newer is not None and (not leader or row is None or newer["fetched"] > row["fetched"]):
                return (newer["display"], self._entries(ix, norm, newer["files"])) if newer["status"] == 200 else None
            row = newer
            try:
                result = self._fetch_page(ix, norm, row)
                self._failed.pop(key, None)
                return result
            except UpstreamError as e:
                if len(self._failed) > 10000:
                    self._failed.clear()
                self._failed[key] = (time.time(), e)
                if row is not None and row["status"] == 200:
                    log("WARNING: serving a stale page of %s on %s: %s" % (norm, ix.path,
                                                                          e.message))
                    return row["display"], self._entries(ix, norm, row["files"])
                raise

    def ensure_fresh(self, ix, norm):
        """Revalidate a mirrored page upstream if it expired (cheap when it has not)."""
        if self.offline:
            return
        fresh = self._fresh.get((ix.id, norm))
        if fresh is not None and time.time() - fresh < self._expiry(ix):
            return
        try:
            self.page(ix, norm)
        except HTTPError:
            pass  # reported when the page itself is built

    def forget_project(self, ix, norm):
        """Expire a cached page (devpi's refresh): the next request fetches it whole from
        upstream (what was kept of its files' history, first_seen and yanks, stays)."""
        with self.store.write() as c:
            c.execute("UPDATE mirror_pages SET fetched=0, etag=NULL, last_modified=NULL "
                      "WHERE index_id=? AND project=?", (ix.id, norm))
        self._fresh.pop((ix.id, norm), None)
        self._failed.pop((ix.id, norm), None)
        self._forget_missing((ix.id, norm))

    def _fetch_page(self, ix, norm, row):
        url = self._page_url(ix, norm)
        headers = {"Accept": "%s, %s;q=0.2, text/html;q=0.1" % (SIMPLE_JSON, SIMPLE_HTML)}
        if row is not None and row["status"] == 200:
            if row["etag"]:
                headers["If-None-Match"] = row["etag"]
            if row["last_modified"]:
                headers["If-Modified-Since"] = row["last_modified"]
        resp, final_url, conn = self.upstream.open(url, self.origin_of(ix), headers,
                                                   compressed=True)
        try:
            now = time.time()
            if resp.status == 304 and row is not None:
                with self.store.write() as c:
                    c.execute("UPDATE mirror_pages SET fetched=? WHERE index_id=? AND project=?",
                              (now, ix.id, norm))
                self._mark_fresh((ix.id, norm), now)
                return row["display"], self._entries(ix, norm, row["files"])
            if resp.status == 404:
                self.upstream.read_body(resp, url, 1024 * 1024)
                if row is not None and row["status"] == 200:
                    # a project upstream had: its kept page says it is gone (such rows
                    # come from upstream's 200 answers only, so they are bounded)
                    self._store_page(ix, norm, now, 404, None, None, None, [])
                else:  # any other name: remembered in memory only (bounded, expires)
                    if row is not None:  # (a row of an older version's)
                        with self.store.write() as c:
                            c.execute("DELETE FROM mirror_pages WHERE index_id=? AND "
                                      "project=? AND status=404", (ix.id, norm))
                    self._remember_missing((ix.id, norm), now)
                if self.model.local_files(ix, norm):
                    log("WARNING: upstream has no project %s (404) any more; %s" % (
                        norm, "%s keeps listing the files it kept (stale: mirror_keep_removed)"
                        % ix.path if ix.config.get("mirror_keep_removed") else
                        "the files %s kept are no longer offered" % ix.path))
                return None
            if resp.status != 200:
                raise UpstreamError(502, "upstream %s answered %d" % (_safe_url(url),
                                                                     resp.status))
            body = self.upstream.read_body(resp, final_url, MAX_PAGE_BYTES)
            pstatus = []
            display, entries = parse_project_page(body, resp.getheader("Content-Type"),
                                                  final_url, pstatus)
            del body
            # upstream's names are data: files are taken only under the project whose
            # page lists them, and a display name only if it is a valid spelling of it
            entries = [e for e in entries if _file_of_project(e["filename"], norm)]
            if not _is_display_of(display, norm):
                display = row["display"] if row and _is_display_of(row["display"], norm) else norm
            self._store_page(ix, norm, now, 200, resp.getheader("ETag"),
                             resp.getheader("Last-Modified"), display, entries, pstatus[0])
            return display, entries
        finally:
            conn.close()

    def _store_page(self, ix, norm, now, status, etag, last_modified, display, entries,
                    project_status=None):
        """Keep a fetched page; an entry upstream gives no upload time keeps the time this
        mirror first saw it (``first_seen``: mirror_min_age counts from it), and the
        page's PEP 792 status (None: active) is kept with it. The entries are merged with
        the kept page and written as JSON before the write lock (a large page takes tens of
        milliseconds, and every other write of a cold install would wait for them); only
        if the kept row changed meanwhile is that done again inside it."""
        old = self._row(ix, norm)
        data = self._merged(ix, norm, old, entries, now)
        kept = self.model.local_files(ix, norm) or ()
        with self.store.write() as c:
            # (only the row's stamp: its files, megabytes for a large page, are read again
            # only when it changed)
            stamp = c.execute("SELECT fetched, status FROM mirror_pages WHERE index_id=? AND "
                              "project=?", (ix.id, norm)).fetchone()
            if (stamp is None) != (old is None) or (
                    old is not None and tuple(stamp) != (old["fetched"], old["status"])):
                old = self._row(ix, norm)
                data = self._merged(ix, norm, old, entries, now)
            c.execute("INSERT INTO mirror_pages VALUES (?,?,?,?,?,?,?,?) ON CONFLICT "
                      "(index_id, project) DO UPDATE SET fetched=excluded.fetched, "
                      "status=excluded.status, etag=excluded.etag, "
                      "last_modified=excluded.last_modified, display=excluded.display, "
                      "files=excluded.files",
                      (ix.id, norm, now, status, etag, last_modified, display, data))
            # (the next reads of this page take these entries, not a parse of ``data``)
            self.store.after_commit(lambda _c: self._remember((ix.id, norm), data, entries))
            had = Store.project_status(c, ix.id, norm)
            if had != project_status:
                Store.set_project_status(c, ix.id, norm, project_status)
            noted = self._note_changes(c, ix, norm, kept, entries, now)
            if (old is None or old["files"] != data or old["status"] != status
                    or had != project_status or noted):
                self.model.mirror_page_changed(norm)
        self._mark_fresh((ix.id, norm), now)
        self._forget_missing((ix.id, norm))

    def _note_changes(self, c, ix, norm, kept, entries, now):
        """Record what upstream's answer (``entries``: its page; [] for its 404) changed of
        the files ``kept`` of the project: one it no longer lists is 'removed' since the
        first refresh that saw it missing (BaseWalk.offers then stops offering it), one it
        lists with another sha256 is 'replaced' (Mirror.files keeps listing the kept bytes,
        never the new ones); one that is listed as kept again loses its note. Each new
        note is logged once. Only upstream's answers come here: an unreachable upstream
        (offline, 5xx, a timeout) never marks anything. Returns whether a note changed."""
        listed = {e["filename"]: e["sha256"] for e in entries}
        had = {r[0]: (r[1], r[2], r[3]) for r in c.execute(
            "SELECT filename, what, since, sha256 FROM upstream_changes WHERE index_id=? "
            "AND project=?", (ix.id, norm))}
        want = {}
        for f in kept:
            if f.filename not in listed:
                want[f.filename] = ("removed", None)
            elif listed[f.filename] is not None and listed[f.filename] != f.sha256:
                want[f.filename] = ("replaced", listed[f.filename])
        changed = False
        for filename in had:
            if filename not in want or had[filename][0] != want[filename][0]:
                c.execute("DELETE FROM upstream_changes WHERE index_id=? AND filename=?",
                          (ix.id, filename))
                changed = True
        for filename, (what, sha) in want.items():
            was = had.get(filename)
            if was is not None and was[0] == what and was[2] == sha:
                continue
            since = was[1] if was is not None and was[0] == what else now
            c.execute("INSERT INTO upstream_changes VALUES (?,?,?,?,?,?) ON CONFLICT "
                      "(index_id, filename) DO UPDATE SET project=excluded.project, "
                      "what=excluded.what, since=excluded.since, sha256=excluded.sha256",
                      (ix.id, norm, filename, what, since, sha))
            changed = True
            if what == "removed":
                log("NOTICE: %s: %s%s" % (ix.path, removed_upstream_message(filename, since),
                                          " (kept: mirror_keep_removed)"
                                          if ix.config.get("mirror_keep_removed") else ""))
            else:
                log("WARNING: %s: %s" % (ix.path, replaced_upstream_text(
                    filename, since, next(f.sha256 for f in kept if f.filename == filename),
                    sha)))
        return changed

    def _merged(self, ix, norm, old, entries, now):
        """``entries`` (changed in place) with what the kept page ``old`` (a row or None)
        knew of the same files: first_seen, the yank history. Returns their JSON."""
        before = {e["filename"]: e for e in (self._entries(ix, norm, old["files"])
                                             if old is not None else [])}
        for e in entries:
            was = before.get(e["filename"])
            e.pop("yank_log", None)  # (of a merge with another kept page, done again)
            if e["upload_time"] is None:
                e["first_seen"] = was.get("first_seen", now) if was else now
            if was is not None:  # a yank's history, for the time machine
                log = was.get("yank_log")
                if was["yanked"] != e["yanked"]:
                    log = (log or [[None, was["yanked"]]]) + [[now, e["yanked"]]]
                if log:  # (bounded: the state before the first, the latest changes)
                    e["yank_log"] = log[:1] + log[1:][-MAX_YANK_LOG:]
        return json.dumps(entries)

    def files(self, ix, norm):
        """The files of a mirrored project as the model lists them (upstream's, and those
        kept locally), or None when neither has the project."""
        local = self.model.local_files(ix, norm)
        page = self.page(ix, norm)
        if page is None:
            return self._mark_provenance(ix, norm, local, ())
        display, entries = page
        have = {f.filename: f for f in (local or [])}
        out = []
        for e in entries:
            if not _file_of_project(e["filename"], norm):
                continue  # another project's
            version = filename_version(e["filename"])
            kept = have.pop(e["filename"], None)
            if e["sha256"] is None:
                if kept is not None:
                    kept.yank_log = e.get("yank_log")
                    out.append(kept)  # hashed when it was fetched: listed with its hash
                else:
                    out.append(File(ix.path, norm, version, filename=e["filename"],
                                    rel="releasefile", sha256=None, size=e["size"] or 0,
                                    uploaded=e["upload_time"] or e.get("first_seen") or 0,
                                    requires_python=e["requires_python"], yanked=e["yanked"],
                                    ext=ext_key(e["url"])))
                continue
            if kept is not None and kept.sha256 != e["sha256"]:
                # upstream replaced a kept file: its kept bytes, never the new ones (no
                # silent substitution; noted by _note_changes)
                kept.yank_log = e.get("yank_log")
                out.append(kept)
                continue
            core = e["core_metadata"]
            out.append(File(ix.path, norm, version, filename=e["filename"], rel="releasefile",
                            sha256=e["sha256"], size=e["size"] or 0,
                            uploaded=e["upload_time"] or (kept.uploaded if kept else
                                                          e.get("first_seen") or 0),
                            requires_python=e["requires_python"], core_metadata=core,
                            yanked=e["yanked"]))
            out[-1].yank_log = e.get("yank_log")
        out.extend(have.values())
        return self._mark_provenance(ix, norm, out, [e["filename"] for e in entries
                                                     if e.get("provenance")])

    def _mark_provenance(self, ix, norm, files, offered):
        """``files`` with File.provenance set for those upstream offers a provenance
        for (``offered``, names) or whose document is kept (PEP 740)."""
        if not files:
            return files
        names = set(offered)
        names.update(r[0] for r in self.store.conn().execute(
            "SELECT filename FROM provenance WHERE index_id=? AND project=?", (ix.id, norm)))
        if names:
            for f in files:
                if f.sha256 and f.filename in names:
                    f.provenance = True
        return files

    def find_entry(self, ix, filename, sha_prefix, ext=None):
        """(display name, entry) of a file on its project's upstream page, or None; with
        ``ext``, the link without a hash whose ext_key that is."""
        norm = mirror_file_project(filename)
        if norm is None:
            return None
        if not _file_of_project(filename, norm):
            return None
        page = self.page(ix, norm)
        if page is None:
            return None
        display = page[0] if _is_display_of(page[0], norm) else norm
        found = None
        for e in page[1]:
            if e["filename"] != filename:
                continue
            if e["sha256"]:
                if e["sha256"].startswith(sha_prefix):
                    return display, found or e
            elif ext is not None and ext in (ext_key(e["url"]), ext_hash_key(e["url"])):
                if found is not None and found["url"] != e["url"]:
                    return None  # (one key of two links: which is meant can't be told)
                found = e
        return (display, found) if found is not None else None

    def offered_entry(self, ix, filename, sha_prefix, ext=None):
        """find_entry for a file URL of the mirror: (display name, entry) of a file it
        offers; raises the refusal of a file it does not offer (Model.file_refusal: a
        quarantined project, mirror_min_age), 404 for one upstream does not list. Its
        page is fetched first: the status read is the one upstream gives now."""
        split = split_filename(filename)
        if split is not None and self.model.withholds(ix, normalize_name(split[0])):
            raise self.model.file_refusal(ix, normalize_name(split[0]), filename, split[1],
                                          None)  # (upstream is not asked)
        found = self.find_entry(ix, filename, sha_prefix, ext)
        if split is not None:
            uploaded = None
            if found is not None:
                uploaded = found[1]["upload_time"] or found[1].get("first_seen")
            refusal = self.model.file_refusal(ix, normalize_name(split[0]), filename,
                                              split[1], uploaded)
            if refusal is not None:
                raise refusal
        if found is None:
            raise not_found("no such file")
        return found

    # -- files ----------------------------------------------------------------------------

    def download(self, ix, filename, sha_prefix, ext=None):
        """For a file not yet kept: (size, chunks) streaming it from upstream; the bytes are
        kept only when complete and matching upstream's sha256, and the last chunk is held
        back until then, so no client ever receives a bad file complete. Returns None when
        another request just fetched it (serve it from disk). With ``ext`` (a link upstream
        gives no sha256 for): kept when complete (and matching its md5 if upstream gave
        one), under the sha256 computed here."""
        if self.offline:
            raise not_found("no such file (offline mode: only files already kept are served)")
        display, entry = self.offered_entry(ix, filename, sha_prefix, ext)
        if entry["sha256"] is not None:
            self._refuse_substitution(ix, filename, entry["sha256"])
        if entry["size"] is not None and entry["size"] > self.max_file:
            raise self._too_large(filename)
        flight = self.single_flight(("file", ix.id, entry["sha256"] or "+e/" + ext))
        leader = flight.__enter__()
        if leader and self._kept(ix, filename, sha_prefix):
            leader = False  # another request kept it between our look and our turn
        if not leader:
            flight.__exit__(None, None, None)
            return None
        try:
            resp, url, conn = self.upstream.open(entry["url"], self.origin_of(ix),
                                                 large=True)
            if resp.status != 200:
                conn.close()
                raise UpstreamError(404 if resp.status == 404 else 502,
                                    "error %d getting %s" % (resp.status, _safe_url(url)))
            length = resp.getheader("Content-Length")
            size = int(length) if length and length.isdigit() else None
            if size is not None and size > self.max_file:
                conn.close()
                raise self._too_large(filename)
        except BaseException:
            flight.__exit__(None, None, None)
            raise
        done = []

        def cleanup():
            if not done:
                done.append(True)
                conn.close()
                flight.__exit__(None, None, None)
        chunks = Download(self._stream(ix, display, entry, resp, size, cleanup), cleanup,
                          conn.fetch)
        if size is None:
            # no length to announce: fetch it whole first, then serve it from disk
            try:
                for _ in chunks:
                    pass
            finally:
                chunks.close()
            return None
        return size, chunks

    def _too_large(self, filename):
        return UpstreamError(502, "upstream file %s is larger than %d bytes, the limit "
                                  "(--max-request-body-size); not kept"
                             % (filename, self.max_file))

    def _kept(self, ix, filename, sha_prefix):
        try:
            self.model.find_file(ix, filename, sha_prefix)
        except HTTPError:
            return False
        return True

    def _stream(self, ix, display, entry, resp, size, cleanup):
        f, tmp = self.store.new_tmp()
        digest = hashlib.sha256()
        md5 = hashlib.md5(usedforsecurity=False) if entry["sha256"] is None and entry.get("md5") else None
        total = 0
        held = None
        ok = False
        try:
            with f:
                for chunk in self.upstream.body_chunks(
                        resp, entry["url"], self.max_file, 256 * 1024, "file",
                        too_large=self._too_large(entry["filename"]), decode=False,
                        partial=True):
                    total += len(chunk)
                    f.write(chunk)
                    digest.update(chunk)
                    if md5 is not None:
                        md5.update(chunk)
                    if size is not None:
                        # bytes go on as they arrive; only the very last is held back
                        if total >= size:
                            chunk, held = chunk[:-1], chunk[-1:]
                        if chunk:
                            yield chunk
                        continue
                    if held is not None:
                        yield held
                    held = chunk
                if self.store.sync_each_blob:
                    f.flush()
                    os.fsync(f.fileno())  # (here, not under the write lock of _keep)
            sha = digest.hexdigest()
            if entry["sha256"] is not None and sha != entry["sha256"]:
                raise UpstreamError(502, "%s from upstream does not match its sha256; not kept"
                                    % entry["filename"])
            if md5 is not None and md5.hexdigest() != entry["md5"]:
                raise UpstreamError(502, "%s from upstream does not match its md5; not kept"
                                    % entry["filename"])
            self._keep(ix, display, entry, tmp, total, sha)
            ok = True
            cleanup()  # (the connection and the flight are free before the last bytes go)
            if entry.get("provenance"):  # kept with the file: offline clients get it too
                try:
                    self._fetch_provenance(ix, entry)
                except HTTPError as e:
                    log("WARNING: provenance of %s on %s not kept: %s"
                        % (entry["filename"], ix.path, e.message))
            if held is not None:
                yield held
        finally:
            if not ok:
                _unlink_quiet(tmp)
                log("WARNING: mirror download of %s on %s failed" % (entry["filename"], ix.path))
            cleanup()

    def _refuse_substitution(self, ix, filename, sha):
        """409 when the mirror once kept ``filename`` with another sha256 than ``sha``
        (Model.first_hash): upstream replaced it, and the kept bytes stay the only ones
        served under that name."""
        first = self.model.first_hash(ix, filename)
        if first is not None and first != sha:
            raise HTTPError(409, "%s: upstream now offers other bytes (sha256 %s...) than "
                                 "the ones this mirror kept (sha256 %s...); only the kept "
                                 "file is served (no silent substitution)"
                            % (filename, sha[:16], first[:16]))

    def _keep(self, ix, display, entry, tmp, size, sha):
        self._refuse_substitution(ix, entry["filename"], sha)
        version = filename_version(entry["filename"])
        meta = {"requires_python": entry["requires_python"]} if entry["requires_python"] else {}
        core = entry["core_metadata"]
        if core and not os.path.exists(self.store.blob_path(core)):
            core = None  # offered, but not fetched yet: it is fetched on first request
        # (concurrent cold downloads queue for the write lock: keep its hold short)
        self.store.stage_blob(tmp, sha)
        self.model.add_file(None, ix, display, version, entry["filename"], tmp, sha,
                            size, meta, core_metadata=core,
                            uploaded=entry["upload_time"] or entry.get("first_seen")
                            or time.time(),
                            log_entry={"what": "mirror", "who": None, "when": when_list(),
                                       "src": _safe_url(entry["url"])},
                            as_listed=entry["sha256"] == sha)

    def core_metadata(self, ix, filename, sha_prefix):
        """Blob path of a mirrored wheel's PEP 658 metadata, fetched once and checked."""
        if self.offline:
            raise not_found("no such file")
        entry = self.offered_entry(ix, filename, sha_prefix)[1]
        sha = entry["core_metadata"]
        if not sha:
            raise not_found("upstream offers no metadata file for %s" % filename)
        path = self.store.blob_path(sha)
        if os.path.exists(path):
            return path, sha
        with self.single_flight(("meta", sha)):
            if not os.path.exists(path):  # (kept meanwhile by the one before us?)
                resp, url, conn = self.upstream.open(entry["url"] + ".metadata",
                                                self.origin_of(ix))
                try:
                    if resp.status != 200:
                        raise UpstreamError(502, "upstream answered %d for %s.metadata"
                                            % (resp.status, filename))
                    data = self.upstream.read_body(resp, url, MAX_METADATA_BYTES, "metadata file")
                finally:
                    conn.close()
                if hashlib.sha256(data).hexdigest() != sha:
                    raise UpstreamError(502, "%s.metadata from upstream does not match its "
                                             "sha256; not kept" % filename)
                self.store.put_bytes(data)
                split = split_filename(filename)
                if split is not None:
                    with self.store.write():  # (a version page shows what it says)
                        self.model.mirror_kept_changed(normalize_name(split[0]))
        return path, sha

    def kept_refusal(self, ix, f):
        """Model.file_refusal of the kept file ``f``, as of upstream's status today: its
        page is revalidated first if it expired (a URL from a lock file reaches the file
        without its page), not in offline mode; nor for a project the mirror withholds."""
        if not self.model.withholds(ix, f.project):
            self.ensure_fresh(ix, f.project)
        return self.model.file_refusal(ix, f.project, f.filename, f.version, f.uploaded)

    # -- PEP 740 provenance ---------------------------------------------------------------

    def provenance(self, ix, filename, sha_prefix):
        """(blob path, sha256) of the provenance document kept for a mirrored file; fetched
        from upstream now if it was not kept with the file (not in offline mode)."""
        found = None
        try:  # (the URL must name the file's hash)
            f = self.model.find_file(ix, filename, sha_prefix)
        except HTTPError:
            if self.offline:
                raise not_found("no such file")
            found = self.offered_entry(ix, filename, sha_prefix)
        else:
            refusal = self.kept_refusal(ix, f)
            if refusal is not None:
                raise refusal
        path = self._kept_provenance(ix, filename)
        if path is not None:
            return path
        if self.offline:
            raise not_found("no provenance kept for %s (offline mode)" % filename)
        found = found or self.find_entry(ix, filename, sha_prefix)
        if found is None or not found[1].get("provenance"):
            raise not_found("upstream offers no provenance for %s" % filename)
        return self._fetch_provenance(ix, found[1])

    def _kept_provenance(self, ix, filename):
        row = self.store.conn().execute(
            "SELECT sha256 FROM provenance WHERE index_id=? AND filename=?",
            (ix.id, filename)).fetchone()
        if row is not None and os.path.exists(self.store.blob_path(row[0])):
            return self.store.blob_path(row[0]), row[0]
        return None

    def _fetch_provenance(self, ix, entry):
        filename = entry["filename"]
        with self.single_flight(("provenance", ix.id, filename)):
            kept = self._kept_provenance(ix, filename)
            if kept is not None:
                return kept
            resp, url, conn = self.upstream.open(entry["provenance"],
                                                 self.origin_of(ix))
            try:
                if resp.status != 200:
                    raise UpstreamError(502, "upstream answered %d for the provenance of %s"
                                        % (resp.status, filename))
                data = self.upstream.read_body(resp, url, MAX_PROVENANCE_BYTES,
                                               "provenance document")
            finally:
                conn.close()
            try:
                if not isinstance(json.loads(data.decode("utf-8")), dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise UpstreamError(502, "the provenance of %s from upstream is not a JSON "
                                         "object; not kept" % filename)
            with self.store.write() as c:
                sha = self.store.put_bytes(data)
                c.execute("INSERT INTO provenance VALUES (?,?,?,?) ON CONFLICT (index_id, "
                          "filename) DO UPDATE SET project=excluded.project, "
                          "sha256=excluded.sha256",
                          (ix.id, normalize_name(split_filename(filename)[0]), filename, sha))
        return self.store.blob_path(sha), sha

    # -- the project list -----------------------------------------------------------------

    def root_listing(self, ix, fmt):
        """(path of a file holding the mirror's whole project list in ``fmt``, its gzip
        twin) -- upstream may list 600,000 projects: fetched once, converted once, then
        served from disk; refreshed in the background after ``mirror_cache_expiry``."""
        d = os.path.join(self.store.serverdir, "+mirror", str(ix.id))
        path = os.path.join(d, "root." + fmt)
        try:
            age = time.time() - os.stat(path).st_mtime
        except OSError:
            age = None
        rules = self.model.listing_filter([ix])  # (names blocked or reserved stay out)
        key = rules.key() if rules is not None else ""
        if age is None:
            if self.offline:
                return None
            with self.single_flight(("root", ix.id)):
                if not os.path.exists(path):  # (fetched meanwhile by the one before us?)
                    self._fetch_root(ix, d)
        elif self._root_key(ix, d) != key:  # a rule changed: written again from the names
            with self.single_flight(("root", ix.id)):
                self._root_keys.pop(ix.id, None)
                if self._root_key(ix, d) != key:
                    try:
                        with open(os.path.join(d, "root.names"), encoding="utf-8") as f:
                            _write_root_listing(self.store, d, _root_name_batches(f),
                                                rules)
                    except FileNotFoundError:  # (written before names were kept)
                        if self.offline:
                            return None
                        self._fetch_root(ix, d)
                    self._root_keys.pop(ix.id, None)
        elif age > self._expiry(ix) and not self.offline and ix.id not in self._root_refreshing:
            self._root_refreshing.add(ix.id)

            def refresh():
                try:
                    with self.single_flight(("root", ix.id)) as leader:
                        if leader:
                            self._fetch_root(ix, d)
                except HTTPError as e:
                    log("WARNING: refreshing the project list of %s failed: %s"
                        % (ix.path, e.message))
                finally:
                    self._root_refreshing.discard(ix.id)
            threading.Thread(target=refresh, daemon=True).start()
        return path, path + ".gz"

    def _root_key(self, ix, d):
        """The rules key the project list file of the mirror ``ix`` was written with (read
        from it once, not at every request)."""
        key = self._root_keys.get(ix.id)
        if key is None:
            key = self._root_keys[ix.id] = _root_rules_key(d)
        return key

    def _fetch_root(self, ix, d):
        """Fetch upstream's project list and write it as HTML and JSON, each also gzipped,
        in one streaming pass: the list is never held in memory whole (600,000 names)."""
        url = ix.config.get("mirror_url", "").rstrip("/") + "/"
        resp, final_url, conn = self.upstream.open(
            url, self.origin_of(ix), {"Accept": "%s, text/html;q=0.1" % SIMPLE_JSON},
            compressed=True, large=True)
        try:
            if resp.status != 200:
                raise UpstreamError(502, "upstream %s answered %d" % (_safe_url(url),
                                                                       resp.status))
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            chunks = self.upstream.body_chunks(resp, url, MAX_ROOT_BYTES, 1 << 20, "project list")
            if ctype.endswith("json"):
                names = _root_names(chunks, _ROOT_JSON_NAME_RE, b"}", b'"projects"')
            elif ctype in ("text/html", SIMPLE_HTML, ""):
                names = _root_names(chunks, _ROOT_HTML_NAME_RE, b"</a>", None)
            else:
                raise UpstreamError(502, "upstream %s answered with %r, not an index"
                                    % (_safe_url(url), ctype))
            os.makedirs(d, exist_ok=True)
            _write_root_listing(self.store, d, names, self.model.listing_filter([ix]))
            self._root_keys.pop(ix.id, None)
        finally:
            conn.close()



# A project list is scanned, not parsed: only names that are valid project names are
# taken, so a name can never carry markup or JSON escapes into the pages written from it.
_ROOT_JSON_NAME_RE = re.compile(rb'"name"\s*:\s*"([^"\\]{1,200})"')
_ROOT_HTML_NAME_RE = re.compile(rb"<a\b[^>]*>\s*([^<]{1,200}?)\s*</a>", re.IGNORECASE)


def _root_names(chunks, pattern, boundary, required):
    """Lists of project names found in a streamed project list. Each chunk is scanned up
    to the last ``boundary`` (the end of an entry); the rest waits for the next chunk."""
    buf = b""
    seen_required = required is None
    count = 0
    for chunk in chunks:
        buf += chunk
        cut = buf.rfind(boundary) if boundary != b"</a>" else buf.lower().rfind(boundary)
        if cut < 0:
            if len(buf) > 1024 * 1024 * 4:
                raise UpstreamError(502, "upstream project list is unreadable")
            continue
        cut += len(boundary)
        part, buf = buf[:cut], buf[cut:]
        if not seen_required and required in part:
            seen_required = True
        names = _valid_names(pattern.findall(part), boundary == b"</a>")
        count += len(names)
        if count > MAX_ROOT_NAMES:
            raise UpstreamError(502, "upstream project list has more than %d names; not read"
                                % MAX_ROOT_NAMES)
        yield names
    if buf:
        yield _valid_names(pattern.findall(buf), boundary == b"</a>")
    if not seen_required:
        raise UpstreamError(502, "upstream project list is unreadable")


def _valid_names(raw, is_html):
    out = []
    for r in raw:
        try:
            n = r.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if is_html and "&" in n:
            n = html.unescape(n)
        if PROJECT_NAME_RE.match(n):
            out.append(n)
    return out


def _root_rules_key(d):
    """The ListingFilter key the mirror's project list in ``d`` was written with."""
    try:
        with open(os.path.join(d, "root.rules"), encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return ""


def _root_name_batches(f):
    """Batches of the names of a root.names file (one a line, as upstream listed them)."""
    batch = []
    for line in f:
        batch.append(line.rstrip("\n"))
        if len(batch) >= LISTING_BATCH:
            yield batch
            batch = []
    yield batch


def _write_root_listing(store, d, batches, rules=None):
    """root.html and root.json in ``d``, each with a .gz twin, from batches of names,
    less those the ListingFilter ``rules`` leaves out; root.names keeps every name (to
    write the lists again when a rule changes) and root.rules the filter's key."""
    outs = {}
    try:
        names_f, names_tmp = store.new_tmp()
        outs["names"] = (names_f, names_tmp, None, None, None)
        for fmt in ("html", "json"):
            f, tmp = store.new_tmp()
            gf, gtmp = store.new_tmp()
            outs[fmt] = (f, tmp, gf, gtmp, gzip.GzipFile(fileobj=gf, mode="wb",
                                                          compresslevel=6, mtime=0))

        def write(fmt, text):
            data = text.encode()
            outs[fmt][0].write(data)
            outs[fmt][4].write(data)
        write("html", simple_html_head("Simple index"))
        write("json", SIMPLE_ROOT_JSON_HEAD)
        first = True
        for names in batches:
            if not names:
                continue
            names_f.write("".join(n + "\n" for n in names).encode())
            pairs = [(normalize_name(n), n) for n in names]
            if rules is not None:
                pairs = [p for p in pairs if rules.keeps(0, p[0])]
                if not pairs:
                    continue
            write("html", simple_root_links(pairs))
            write("json", ("" if first else ", ") + simple_root_json_items(
                [n for _, n in pairs]))
            first = False
        write("html", SIMPLE_HTML_END)
        write("json", SIMPLE_ROOT_JSON_END)
        names_f.close()
        for fmt, (f, tmp, gf, gtmp, gz) in outs.items():
            if gz is not None:
                gz.close()
                gf.close()
                f.close()
        for fmt, (f, tmp, gf, gtmp, gz) in outs.items():
            if gz is not None:
                os.replace(gtmp, os.path.join(d, "root.%s.gz" % fmt))
            os.replace(tmp, os.path.join(d, "root." + fmt))
        rules_f, rules_tmp = store.new_tmp()
        with rules_f:
            rules_f.write((rules.key() if rules is not None else "").encode())
        os.replace(rules_tmp, os.path.join(d, "root.rules"))
        outs = {}
    finally:
        for f, tmp, gf, gtmp, gz in outs.values():
            for x in (gz, gf, f):
                if x is None:
                    continue
                try:
                    x.close()
                except Exception:
                    pass
            _unlink_quiet(tmp)
            if gtmp is not None:
                _unlink_quiet(gtmp)


class Download:
    """Chunks of a file coming from upstream; ``close()`` releases the upstream connection
    whether or not the chunks were ever read. Closed before its end (the client went away
    or stopped reading), the download goes on for the cache as long as its ``fetch`` keeps
    the minimum rate with no client waiting (Fetch); a trickle is cut."""

    def __init__(self, chunks, cleanup, fetch=None):
        self.chunks = chunks
        self.cleanup = cleanup
        self.fetch = fetch

    def __iter__(self):
        return self.chunks

    def close(self):
        fetch, self.fetch = self.fetch, None
        try:
            if fetch is not None and not fetch.done and fetch.cut is None:
                fetch.client_gone()
                try:
                    for _ in self.chunks:
                        pass
                except Exception:
                    pass  # (_stream logged it; nothing was kept)
        finally:
            self.chunks.close()
            self.cleanup()





# ===================================================================================
# 7. HTTP
# ===================================================================================

# Simple pages can change with every upload, so a cache in front (nginx, a CDN; see the
# README) may keep one only a moment: it still takes the read traffic (a page asked
# 10,000 times a second reaches the server once a second, as a cheap 304), and an upload
# shows up for installers behind it within a second. Installers that talk to the server
# directly revalidate with If-None-Match and get a 304.
PAGE_CACHE_CONTROL = "public, max-age=1"
# A page with absolute URLs (X-Devpi-Absolute-Urls) holds a host taken from the request (or
# --outside-url) and depends on a header that no cache key holds: no shared cache keeps it.
PRIVATE_PAGE_CACHE_CONTROL = "private, max-age=1"
# a mirror's whole project list only changes when it is fetched again from upstream
MIRROR_LIST_CACHE_CONTROL = "public, max-age=60"


PROVENANCE_TYPE = "application/vnd.pypi.integrity.v1+json"  # as PEP 740's upstream serves it
SMALL_FILE = 64 * 1024  # files up to this size go out with their headers in one write

# PEP 658 metadata is offered for wheels larger than this, not for smaller ones. Fetching a
# wheel this small costs an installer no more than fetching its metadata: one request either
# way, and the request, not the bytes, is the cost (pip spends about 2 ms of its own on each).
# With the metadata on offer pip fetches the metadata, resolves, and then fetches the wheel
# anyway: three requests per package where two do. Measured side by side on a 30-package
# chain of small wheels: pip 0.60 s without, 0.68 s with; uv 0.22 s either way. Large wheels
# are where the metadata saves whole downloads, and they keep it. Every wheel's .metadata URL
# still answers.
CORE_METADATA_MIN_SIZE = 64 * 1024


def offered_core_metadata(f):
    """The sha256 of ``f``'s core metadata if its simple page should offer it, else None.
    A size of 0 is unknown (an upstream page that does not say): offered."""
    if f.core_metadata and not 0 < (f.size or 0) <= CORE_METADATA_MIN_SIZE:
        return f.core_metadata
    return None


class Response:
    """What a route answers: status, headers, and a body of bytes or a file to send."""

    __slots__ = ("status", "headers", "body", "file_path", "file_size", "file_offset",
                 "reason", "stream")

    def __init__(self, status=200, body=b"", headers=None, reason=None):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        self.file_path = None
        self.file_size = 0  # the bytes of file_path sent, from file_offset on
        self.file_offset = 0
        self.reason = reason
        # an iterable of chunks with close(), of file_size bytes in all (None: a length not
        # known before the end, sent chunked)
        self.stream = None


def json_response(data, status=200, headers=None):
    body = json.dumps(data, indent=2, sort_keys=False).encode("utf-8") + b"\n"
    h = [("Content-Type", JSON_TYPE)]
    if headers:
        h.extend(headers)
    return Response(status, body, h)


def api_result(type_, result, status=200, message=None):
    data = {"type": type_, "result": result}
    if message:
        data["message"] = message
    return json_response(data, status)


def message_response(message, status=200):
    return json_response({"message": message}, status)


def redirect(location, status=302):
    return json_response({"message": "moved to %s" % location}, status,
                         [("Location", location)])


_BYTE_RANGE_RE = re.compile(r"bytes=(?:(\d{1,18})-(\d{0,18})|-(\d{1,18}))")


def parse_byte_range(header):
    """A Range header's one byte range (RFC 9110 14.2) as (first, last): last None for
    "to the end", first None for a suffix of ``last`` bytes; None for anything else
    (several ranges, another unit, bad syntax), which is answered with the whole file, as
    the RFC allows. A client reading a wheel's metadata out of it (uv, where a page
    offers no PEP 658 metadata) asks for one range at a time."""
    if not header or len(header) > 50:
        return None
    m = _BYTE_RANGE_RE.fullmatch(header.strip())
    if m is None:
        return None
    if m.group(3) is not None:
        return None, int(m.group(3))
    first, last = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if last is not None and last < first:
        return None  # invalid: ignored, the whole file
    return first, last


def byte_range_slice(spec, size):
    """(offset, length) of the bytes a ``parse_byte_range`` spec selects of ``size``, or
    None when it selects none (416)."""
    first, last = spec
    if first is None:  # the last ``last`` bytes
        if last == 0 or size == 0:
            return None
        return max(0, size - last), min(last, size)
    if first >= size:
        return None
    end = size - 1 if last is None else min(last, size - 1)
    return first, end - first + 1


def parse_accept(header):
    """[(media type, q)] from an Accept header, highest q first (stable)."""
    out = []
    for i, item in enumerate((header or "").split(",")):
        item = item.strip()
        if not item:
            continue
        mtype, _, params = item.partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    q = 0.0
        out.append((mtype.strip().lower(), q, i))
    out.sort(key=lambda t: (-t[1], t[2]))
    return [(m, q) for m, q, _ in out if q > 0]


def choose_simple_format(accept):
    """'json' or 'html' for a simple page by PEP 691 negotiation (HTML when in doubt)."""
    for mtype, _q in parse_accept(accept):
        if mtype in (SIMPLE_JSON, "application/vnd.pypi.simple.latest+json"):
            return "json"
        if mtype in (SIMPLE_HTML, "application/vnd.pypi.simple.latest+html", "text/html",
                     "*/*", "text/*"):
            return "html"
    return "html"


def wants_json(accept):
    return any(m == JSON_TYPE for m, _ in parse_accept(accept))


def wants_simple(accept):
    return any(m.startswith("application/vnd.pypi.simple.") for m, _ in parse_accept(accept))


def file_content_type(filename, metadata=False):
    """As devpi, by file name; none of them is rendered as a page by a browser."""
    if metadata:
        return "application/octet-stream"
    if filename.endswith(".zip"):
        return "application/zip"
    if filename.endswith((".tar.gz", ".tgz", ".tar")):
        return "application/x-tar"
    return "application/octet-stream"


def iso_upload_time(ts):
    """A POSIX timestamp as PEP 700's upload-time, UTC with microseconds."""
    whole = int(ts // 1)
    days, rest = divmod(whole, 86400)
    return "%sT%02d:%02d:%02d.%06dZ" % (_iso_day(days), rest // 3600, rest // 60 % 60,
                                        rest % 60, int((ts % 1) * 1000000))


@functools.lru_cache(maxsize=4096)  # (a page's files share their days: most are cached)
def _iso_day(days):
    return time.strftime("%Y-%m-%d", time.gmtime(days * 86400))


def http_date(ts):
    return email.utils.formatdate(ts, usegmt=True)


# Bytes of rendered pages kept in memory (PageCache); a page of more than a quarter of it
# (a project list of some 100k projects) is kept in a file instead (ListingFiles).
PAGE_CACHE_BYTES = 16 * 1024 * 1024

# Pages are gzipped once per change, at nginx's default level: a large mirrored page
# (5,600 files, 2 MB of JSON) takes 25 ms at level 1 against 55 ms at 6, for 11% more bytes;
# a cold page's first answer waits for it.
PAGE_GZIP_LEVEL = 1


class CachedPage:
    __slots__ = ("validator", "body", "gzipped", "etag", "content_type", "expires")

    def __init__(self, validator, body, content_type, expires=None):
        self.validator = validator
        self.expires = expires  # a page that changes by itself then (a file matures)
        self.body = body
        self.content_type = content_type
        self.etag = '"%s"' % hashlib.sha256(body).hexdigest()[:32]
        self.gzipped = gzip.compress(body, PAGE_GZIP_LEVEL) if len(body) > 2048 else None


class PageCache:
    """Rendered simple pages as bytes, valid while their generations are unchanged; the
    least recently used go first once they take more than ``max_bytes``.

    The generations count the model's commits (``changed``, a listener of
    ``Model.on_change``): any index config, the set of projects (of all indexes, and of
    each), each project's releases. A page is stored with the generations it was built
    from (its validator). A page larger than a quarter of ``max_bytes`` is not kept (it
    would push out all others): a listing that large streams (App.listing_response)."""

    def __init__(self, max_bytes=None):
        import collections
        self.pages = collections.OrderedDict()
        self.max_bytes = PAGE_CACHE_BYTES if max_bytes is None else max_bytes
        self.size = 0
        self.lock = threading.Lock()
        self.gen_config = 0
        self.gen_projects = 0
        self.gen_index_projects = {}  # index id -> generation of its set of projects
        self.gen_project = {}
        self.gen_kept = {}
        # (in the ETags of answers streamed, not kept: generations start again at 0)
        self.nonce = secrets.token_hex(8)

    @property
    def page_max(self):
        """The largest page kept."""
        return self.max_bytes // 4

    def changed(self, config, project_set, projects, kept=()):
        if config:
            self.gen_config += 1
        if project_set is True:
            self.gen_projects += 1
        elif project_set:
            for index_id in project_set:
                self.gen_index_projects[index_id] = self.gen_index_projects.get(
                    index_id, 0) + 1
        for name in projects:
            self.gen_project[name] = self.gen_project.get(name, 0) + 1
        for name in kept:
            self.gen_kept[name] = self.gen_kept.get(name, 0) + 1

    def root_validator(self, chain):
        """What a project list through the indexes ``chain`` depends on: a new project
        on one index leaves the lists of others as they are."""
        gens = self.gen_index_projects
        return (self.gen_config, self.gen_projects) + tuple(gens.get(b.id, 0) for b in chain)

    def stream_etag(self, key, validator):
        """The ETag of a page too large to keep, that is streamed as it is built: of what
        it is built from, the same while that is (so that conditional GETs still work)."""
        return '"s-%s"' % hashlib.sha256(repr((self.nonce, key, validator)).encode()
                                        ).hexdigest()[:32]

    def project_validator(self, norm):
        """What a project's simple page depends on."""
        return self.gen_config, self.gen_project.get(norm, 0)

    def web_project_validator(self, norm):
        """What a project's web pages depend on: also which files a mirror keeps (the
        version metadata it shows comes from them)."""
        return self.gen_config, self.gen_project.get(norm, 0), self.gen_kept.get(norm, 0)

    def get(self, key, validator):
        page = self.pages.get(key)
        if page is not None and page.validator == validator and (
                page.expires is None or page.expires > time.time()):
            try:
                self.pages.move_to_end(key)
            except KeyError:
                pass
            return page
        return None

    def put(self, key, validator, body, content_type, expires=None):
        page = CachedPage(validator, body, content_type, expires)
        cost = len(page.body) + len(page.gzipped or b"") + 200
        if cost > self.page_max:
            return page  # (served, not kept)
        with self.lock:
            old = self.pages.pop(key, None)
            if old is not None:
                self.size -= len(old.body) + len(old.gzipped or b"") + 200
            self.pages[key] = page
            self.size += cost
            while self.size > self.max_bytes and len(self.pages) > 1:
                _k, gone = self.pages.popitem(last=False)
                self.size -= len(gone.body) + len(gone.gzipped or b"") + 200
        return page


# Listings too large for the page cache kept as files (ListingFiles): a 1M-project index's
# /+simple/ is 39 MB of HTML; its HTML and JSON, and the index JSON, root's and others'
LISTINGS_KEPT = 8
LISTING_FILE_GRACE = 30  # seconds a replaced listing file stays for answers about to send it


class KeptListing:
    __slots__ = ("validator", "path", "size", "gz_path", "gz_size")

    def __init__(self, validator, path, size, gz_path=None, gz_size=0):
        self.validator = validator
        self.path = path
        self.size = size
        self.gz_path = gz_path  # its gzip twin (PAGE_GZIP_LEVEL), or None
        self.gz_size = gz_size


class ListingFiles:
    """Listings too large to keep in memory (PageCache.page_max), kept as files in the
    server's temporary directory (emptied at each start) while their validators hold: the
    first request after a change streams the listing as it is made and writes it on the
    way (``tee``); the next ones are sent from the file by the kernel. At most
    LISTINGS_KEPT, the least recently used go first; a file replaced or dropped is
    removed LISTING_FILE_GRACE seconds later (an answer may be about to open it)."""

    def __init__(self, tmp_dir):
        import collections
        self.tmp_dir = tmp_dir
        self.files = collections.OrderedDict()
        self.lock = threading.Lock()
        self.dropped = []  # (when, path)

    def get(self, key, validator):
        with self.lock:
            kept = self.files.get(key)
            if kept is None or kept.validator != validator:
                return None
            self.files.move_to_end(key)
            return kept

    def tee(self, key, validator, chunks):
        """``chunks`` as they come, written on the way to a file and its gzip twin that
        are kept for ``key`` once all came (not if the client left, or the disk failed,
        before)."""
        paths, outs = [], []
        try:
            for _ in range(2):
                fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix="listing-")
                paths.append(path)
                outs.append(os.fdopen(fd, "wb"))
            outs.append(gzip.GzipFile(fileobj=outs[1], mode="wb",
                                      compresslevel=PAGE_GZIP_LEVEL, mtime=0))
        except OSError:
            outs = self._closed(outs)
        try:
            for chunk in chunks:
                if outs:
                    try:
                        outs[0].write(chunk)
                        outs[2].write(chunk)
                    except OSError:
                        outs = self._closed(outs)
                yield chunk
            if outs:
                size = outs[0].tell()
                outs[2].close()
                gz_size = outs[1].tell()
                outs = self._closed(outs)
                self._keep(key, KeptListing(validator, paths[0], size, paths[1], gz_size))
                paths = []
        finally:
            self._closed(outs)
            for path in paths:
                _unlink_quiet(path)
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _closed(outs):
        for f in reversed(outs):
            try:
                f.close()
            except OSError:
                pass
        return []

    def _keep(self, key, kept):
        now = time.monotonic()
        with self.lock:
            old = self.files.pop(key, None)
            gone = [old] if old is not None else []
            self.files[key] = kept
            while len(self.files) > LISTINGS_KEPT:
                gone.append(self.files.popitem(last=False)[1])
            self.dropped.extend((now, p) for g in gone for p in (g.path, g.gz_path) if p)
            due = [p for t, p in self.dropped if now - t > LISTING_FILE_GRACE]
            self.dropped = [(t, p) for t, p in self.dropped if now - t <= LISTING_FILE_GRACE]
        for p in due:
            _unlink_quiet(p)


JSON_MAX_BODY = 1024 * 1024  # every JSON body of devpi's API is far smaller
# a login body is a few hundred bytes; before any credentials are checked, JSON bodies are
# held this small (a 10 MiB body of "[{},{},...]" takes some 260 MB as Python objects)
JSON_MAX_BODY_ANONYMOUS = 64 * 1024
# a tox JSON report holds the commands' output: larger than other JSON bodies, and anonymous
# by default (devpi's acl_toxresult_upload is :ANONYMOUS:)
TOXRESULT_MAX_BODY = 1024 * 1024
JSON_MAX_DIGITS = 100  # no number of devpi's has more digits (long ones cost CPU to convert)


def _json_int(text):
    if len(text) > JSON_MAX_DIGITS:
        raise ValueError("number too long")
    return int(text)


class RequestBody:
    """The body of one request: its framing, the one reader that consumes it, and whether
    it was read to its end (``complete``). The handler decides from ``complete`` alone
    whether the connection may carry another request (see RequestHandler._finish_body),
    so no byte of a body is ever taken for the next request."""

    __slots__ = ("handler", "length", "chunked", "reader")

    def __init__(self, handler, length, chunked):
        self.handler = handler
        self.length = length    # Content-Length (0 without one); unused when chunked
        self.chunked = chunked
        self.reader = None

    @property
    def complete(self):
        if self.reader is None:
            return not self.chunked and self.length == 0
        return self.reader.complete

    @property
    def remaining(self):
        """Bytes of a Content-Length body not read yet."""
        return self.length if self.reader is None else self.reader.remaining

    def open(self, limit, what="request body"):
        """The reader of the body, which may hold at most ``limit`` bytes (413 beyond:
        before reading when Content-Length says so, else while reading). From here on the
        body has to keep coming (BODY_MIN_RATE)."""
        if self.reader is not None:
            raise RuntimeError("the request body is read twice")
        if not self.chunked and self.length > limit:
            raise HTTPError(413, "%s of %d bytes is larger than the limit of %d bytes"
                            % (what, self.length, limit))
        h = self.handler
        h.raw_in.expect(h.timeout, BODY_MIN_RATE)
        if self.chunked:
            self.reader = ChunkedReader(h.rfile, limit)
        else:
            self.reader = _BoundedReader(h.rfile, self.length)
        return self.reader

    def read(self, limit):
        """The whole (small) body, bounded by ``limit`` bytes."""
        reader = self.open(limit)
        out = []
        while True:
            data = reader.read(65536)
            if not data:
                return b"".join(out)
            out.append(data)

    def drain(self):
        """Read and drop the rest of a Content-Length body."""
        if self.reader is None:
            self.reader = _BoundedReader(self.handler.rfile, self.length)
        self.reader.drain()


class Request:
    """One parsed request, with lazy authentication."""

    def __init__(self, handler, app, method, path, query, trailing):
        self.handler = handler
        self.app = app
        self.method = method
        self.path = path
        self.query = query
        self.trailing = trailing
        self.headers = handler.headers
        self.body = handler.body
        self.accept = handler.headers.get("Accept", "")
        self._actor = False
        self.is_upload = False
        self.restricted = False  # an index not everyone reads answers: no shared cache keeps it
        self.route = None  # the App method answering it, once dispatched
        self.session = None  # (user, logout token) where a session cookie authenticated it

    @property
    def actor(self):
        """The authenticated user name, or None. Bad credentials make a request anonymous,
        as devpi does; endpoints that need a user answer 401/403."""
        if self._actor is False:
            self._actor = self.app.authenticate_request(self)
        return self._actor

    @property
    def is_installer(self):
        return bool(INSTALLER_UA.match(self.headers.get("User-Agent", "")))

    def outside_url(self):
        """Scheme, host and path prefix for absolute URLs (no trailing slash)."""
        if self.app.outside_url:
            return self.app.outside_url
        xo = self.headers.get("X-Outside-Url")
        if xo and xo.startswith(("http://", "https://")):
            return xo.rstrip("/")
        host = self.headers.get("Host") or "%s:%s" % self.handler.server.server_address[:2]
        if not re.match(r"^[A-Za-z0-9._:\[\]-]+$", host):
            host = "%s:%s" % self.handler.server.server_address[:2]
        return "http://" + host

    def absolute(self, path):
        return self.outside_url() + "/" + path.lstrip("/")

    def is_https(self):
        """Whether the browser talks https: the outside URL says so, or the proxy in front
        does (``X-Forwarded-Proto``). A client that claims it falsely gets cookies its own
        browser won't keep over http, nothing more."""
        proto = (self.headers.get("X-Forwarded-Proto") or "").split(",")[0].strip().lower()
        return self.outside_url().startswith("https://") or proto == "https"

    def cookie_values(self, name):
        """The values of every cookie ``name`` the request carries."""
        out = []
        for header in self.headers.get_all("Cookie") or ():
            for pair in header.split(";"):
                k, sep, v = pair.strip().partition("=")
                if sep and k == name:
                    out.append(v.strip().strip('"'))
        return out

    def json_body(self, limit=None):
        """The body as JSON (None when empty). At most ``limit`` bytes; by default
        JSON_MAX_BODY, and JSON_MAX_BODY_ANONYMOUS without valid credentials. A lone
        surrogate ("\\ud800") can't be stored or sent as UTF-8, and no value of devpi's is
        infinite or not a number (1e309, NaN, Infinity): all 400, for every route."""
        if limit is None:
            limit = JSON_MAX_BODY if self.actor else JSON_MAX_BODY_ANONYMOUS
        data = self.body.read(limit)
        if not data.strip():
            return None
        try:
            value = json.loads(data.decode("utf-8"), parse_int=_json_int)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise bad_request("Bad request: could not decode json")
        try:
            json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
            raise bad_request("Bad request: JSON with a lone surrogate or a number that is "
                              "infinite or not a number")
        return value


# -- simple pages, rendered from data ---------------------------------------------------

def simple_root_type(fmt):
    """The Content-Type of an index's project list (simple_root_chunks) in ``fmt``."""
    return SIMPLE_JSON if fmt == "json" else HTML_TYPE


def repository_version(files, status):
    """The simple API version a project page needs: 1.4 with a PEP 792 status, 1.3 with
    a PEP 740 provenance, else 1.1 (PEP 700)."""
    if status is not None:
        return "1.4"
    if any(f.provenance for f in files):
        return "1.3"
    return "1.1"


def render_simple_project(norm, display, files, versions, fmt, href, status=None):
    """(body, content type) of a project's simple page: its ``files`` (File rows), linked
    to ``href(f)`` (a provenance at that + ".provenance", PEP 740); ``versions``, those
    without files too (PEP 700, in JSON); ``status``: (status, reason) of PEP 792 or None."""
    api_version = repository_version(files, status)
    if fmt == "json":
        # each file's object is written as json.dumps writes it (the same bytes), by
        # string formatting: a third faster than building dicts for the encoder, which
        # counts on a page of thousands of files
        enc = json.encoder.encode_basestring_ascii
        out = []
        versions = set(versions)
        for f in files:
            versions.add(f.version)
            url = href(f)
            d = '{"filename": %s, "url": %s, "hashes": %s' % (
                enc(f.filename), enc(url), '{"sha256": "%s"}' % f.sha256 if f.sha256 else "{}")
            if f.requires_python:
                d += ', "requires-python": ' + enc(f.requires_python)
            meta = offered_core_metadata(f)
            if meta:
                # PEP 714: only the new key in JSON (pip 22.3-23.1 crash on the old one)
                d += ', "core-metadata": {"sha256": "%s"}' % meta
            d += ', "yanked": %s, "size": %d, "upload-time": "%s"' % (
                "false" if f.yanked is None else enc(f.yanked) if f.yanked else "true",
                f.size, iso_upload_time(f.uploaded))
            if f.provenance:
                d += ', "provenance": ' + enc(url + ".provenance")
            out.append(d + "}")
        page = {"meta": {"api-version": api_version}, "name": norm}
        if status is not None:
            page["project-status"] = {"status": status[0]}
            if status[1]:
                page["project-status"]["reason"] = status[1]
        page["versions"] = sorted(versions, key=version_key)
        head = json.dumps(page)
        return ('%s, "files": [%s]}' % (head[:-1], ", ".join(out))).encode(), SIMPLE_JSON
    esc = html.escape
    meta_tags = []
    if status is not None:
        meta_tags.append(("pypi:project-status", status[0]))
        if status[1]:
            meta_tags.append(("pypi:project-status-reason", status[1]))
    lines = [simple_html_head("Links for %s" % display, heading=True, version=api_version,
                              meta=meta_tags)]
    for f in files:
        attrs = ""
        if f.requires_python:
            attrs += ' data-requires-python="%s"' % esc(f.requires_python)
        meta = offered_core_metadata(f)
        if meta:
            attrs += (' data-dist-info-metadata="sha256=%s" data-core-metadata="sha256=%s"'
                      % (meta, meta))
        if f.yanked is not None:
            attrs += ' data-yanked="%s"' % esc(f.yanked)
        attrs += ' data-upload-time="%s"' % iso_upload_time(f.uploaded)  # read by uv
        if f.provenance:
            attrs += ' data-provenance="%s"' % esc(href(f) + ".provenance")
        lines.append('<a href="%s%s"%s>%s</a><br>\n'
                     % (esc(href(f)), "#sha256=" + f.sha256 if f.sha256 else "", attrs,
                        esc(f.filename)))
    lines.append(SIMPLE_HTML_END)
    return "".join(lines).encode(), HTML_TYPE


# ===================================================================================
# 7b. web pages: HTML for people at the API's own URLs (devpi-web's job)
# ===================================================================================
# A browser (Accept: text/html first) gets a page at /, /USER, /USER/INDEX, .../PROJECT and
# .../VERSION; devpi-client and anything asking for JSON get the JSON API, installers the
# simple pages, as before. Pages are rendered from what the model gives the reader
# (list_users, chain, walk, releases: the read rules apply) by the pure functions below,
# kept in the page cache like the simple pages, and sent with a Content-Security-Policy
# that allows one script, the copy buttons' (by its hash), and nothing from elsewhere but
# https images.

WEB_BROWSER_TYPES = ("text/html", "application/xhtml+xml")
WEB_PAGE_SIZE = 100  # rows a web page lists at a time: projects, users, a user's indexes
WEB_SEARCH_LIMIT = 50
WEB_STATIC_CACHE_CONTROL = "public, max-age=3600"

WEB_STYLE = """\
:root{--bg:#fdfdfc;--fg:#1d2125;--muted:#5f6b76;--line:#dde2e6;--card:#f3f5f7;
--link:#1559b3;--ok:#17803d;--bad:#b42318;--warn:#8a5a00;--code:#eef1f4}
@media (prefers-color-scheme:dark){:root{--bg:#15181b;--fg:#e4e7ea;--muted:#9aa5b0;
--line:#2e353b;--card:#1d2226;--link:#7eb3ff;--ok:#4cc27a;--bad:#ff7b72;--warn:#e3b341;
--code:#222930}}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:var(--bg);color:var(--fg);line-height:1.5;
font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
a{color:var(--link);text-decoration:none}a:hover{text-decoration:underline}
header{border-bottom:1px solid var(--line);background:var(--card)}
.bar{max-width:72rem;margin:0 auto;padding:.6rem 1rem;display:flex;flex-wrap:wrap;
gap:.5rem 1rem;align-items:center;justify-content:space-between}
.crumbs{font-weight:600;overflow-wrap:anywhere}.crumbs .sep{color:var(--muted);margin:0 .3rem}
form.search{display:flex;gap:.4rem;flex:1 1 16rem;max-width:28rem}
input[type=search],select{flex:1;min-width:0;padding:.4rem .6rem;border:1px solid var(--line);
border-radius:6px;background:var(--bg);color:var(--fg);font:inherit}
button{padding:.35rem .8rem;border:1px solid var(--line);border-radius:6px;
background:var(--bg);color:var(--fg);font:inherit;cursor:pointer}
main{max-width:72rem;margin:0 auto;padding:1rem}
h1{font-size:1.7rem;margin:.6rem 0 .2rem;overflow-wrap:anywhere}
h2{font-size:1.25rem;margin:1.6rem 0 .5rem;border-bottom:1px solid var(--line)}
h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
.lead{color:var(--muted);margin:.2rem 0 1rem}.muted{color:var(--muted)}
.tag{display:inline-block;font-size:.78rem;padding:0 .45rem;border-radius:999px;
border:1px solid var(--line);color:var(--muted);vertical-align:middle;white-space:nowrap}
.tag.pre{color:var(--warn);border-color:var(--warn)}.tag.yanked,.tag.fail{color:var(--bad);
border-color:var(--bad)}.tag.ok{color:var(--ok);border-color:var(--ok)}
.note{border-left:4px solid var(--warn);background:var(--card);padding:.5rem .8rem;
margin:1rem 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.95rem}
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid var(--line);
vertical-align:top}
th{color:var(--muted);font-weight:600;white-space:nowrap}
td.num{text-align:right;white-space:nowrap}
code,pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
font-size:.88em}
code{background:var(--code);padding:.05rem .3rem;border-radius:4px;overflow-wrap:anywhere}
pre{background:var(--code);padding:.8rem;border-radius:6px;overflow-x:auto}
pre code{background:none;padding:0}
.usage{display:flex;gap:.5rem;align-items:center;margin:.3rem 0}
.usage code{flex:1;padding:.4rem .6rem;display:block}
dl.meta{display:grid;grid-template-columns:minmax(7rem,max-content) 1fr;gap:.2rem 1rem;
margin:0}
dl.meta dt{color:var(--muted)}dl.meta dd{margin:0;overflow-wrap:anywhere}
ul.plain{list-style:none;padding:0;margin:0}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(18rem,1fr));gap:1rem}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.8rem 1rem}
.card h2{border:0;margin:0 0 .3rem}
.description{overflow-wrap:anywhere}.description img{max-width:100%}
.description h3{font-size:1.2rem}.description h4{font-size:1.05rem}
/* a description's align= (table cells, paragraphs) loses to any rule, th,td's too: */
.description [align=center]{text-align:center}.description [align=right]{text-align:right}
.description [align=left]{text-align:left}.description [align=justify]{text-align:justify}
.pager{display:flex;gap:1rem;margin:1rem 0}
.account{display:flex;gap:.5rem;align-items:center;margin:0}
form.login{display:grid;gap:.7rem;max-width:22rem;margin:1rem 0}
form.login label{display:grid;gap:.2rem}
input[type=text],input[type=password]{padding:.4rem .6rem;border:1px solid var(--line);
border-radius:6px;background:var(--bg);color:var(--fg);font:inherit}
.sha{font-size:.75rem;color:var(--muted);word-break:break-all}
footer{max-width:72rem;margin:2rem auto;padding:1rem;color:var(--muted);font-size:.85rem;
border-top:1px solid var(--line)}
@media (max-width:40rem){main{padding:.6rem}h1{font-size:1.4rem}
table.files td:nth-child(4),table.files th:nth-child(4){display:none}}
"""

WEB_COPY_JS = """\
// minidevpi: copy buttons (the pages work without this script)
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (b) {
    if (!navigator.clipboard) { return; }
    b.hidden = false;
    b.addEventListener("click", function () {
      navigator.clipboard.writeText(b.getAttribute("data-copy")).then(function () {
        b.textContent = "Copied";
        setTimeout(function () { b.textContent = "Copy"; }, 1500);
      });
    });
  });
});
"""

WEB_ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" '
            'height="16" rx="3" fill="#1559b3"/><path d="M4 12V4l4 5 4-5v8" stroke="#fff" '
            'stroke-width="2" fill="none"/></svg>')
WEB_STATIC = {"style.css": ("text/css; charset=utf-8", WEB_STYLE.encode()),
              "copy.js": ("text/javascript; charset=utf-8", WEB_COPY_JS.encode()),
              "icon.svg": ("image/svg+xml", WEB_ICON.encode())}
# The one script a page may run is the copy buttons', inline, allowed by its hash: not
# 'self', since a doc zip's .js is served from this origin too (as text/javascript), and
# with 'self' any HTML injected into a page could load it. (A source with a path, such as
# /+static/, would not do: CSP ignores the path after a redirect.)
WEB_COPY_JS_HASH = "sha256-" + str(base64.b64encode(
    hashlib.sha256(WEB_COPY_JS.encode()).digest()), "ascii")
WEB_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' https: data:; "
           "script-src '%s'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
           % WEB_COPY_JS_HASH)
WEB_HEADERS = (("Content-Security-Policy", WEB_CSP), ("Referrer-Policy", "same-origin"))
# A web page is at most this many bytes. Every page bounds what it lists (projects a page,
# tox results and environments, description sizes), so a page over it is a bug: it is
# logged, and the page answers with a short notice in its place (pointing to the JSON API)
# rather than send or cache the whole.
WEB_PAGE_MAX_BYTES = 8 * 1024 * 1024


def wants_html(req):
    """Whether a request comes from a browser: its Accept puts an HTML type first, and it
    is neither devpi-client nor an installer (they keep their JSON and simple pages)."""
    if req.is_installer or req.headers.get("User-Agent", "").startswith("devpi-client"):
        return False
    for mtype, _q in parse_accept(req.accept):
        return mtype in WEB_BROWSER_TYPES
    return False


def _e(value):
    """Text for HTML, attributes included (every value a user wrote passes here)."""
    return html.escape("" if value is None else str(value), quote=True)


def _seg(value):
    return urllib.parse.quote(str(value), safe="")


def web_href(prefix, *segments):
    """The escaped path of a page: ``prefix`` (the outside URL's path) and segments."""
    return _e(prefix + "/" + "/".join(_seg(s) for s in segments))


def web_time(ts):
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + " UTC"


def web_size(n):
    n = n or 0
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return ("%d %s" % (n, unit)) if unit == "bytes" else ("%.1f %s" % (n, unit))
        n /= 1000.0
    return ""


def web_link(url, text=None):
    """A link to a URL a user wrote: http(s) only (else the text alone), nofollow."""
    text = url if text is None else text
    if isinstance(url, str) and re.match(r"^https?://[^\s]+$", url.strip(), re.I):
        return '<a href="%s" rel="nofollow noopener noreferrer">%s</a>' % (_e(url.strip()),
                                                                        _e(text))
    return _e(text)


def _quote_path(path):
    return urllib.parse.quote(path, safe="/+@:")


class PagePrefix(str):
    """The path prefix of a page's links (the outside URL's path), carrying whom the page
    is for: ``account``, (user, logout token) of a logged-in browser or None, and
    ``here``, the page's own path, quoted (where a log-in returns to)."""

    def __new__(cls, prefix, account=None, here="/"):
        self = str.__new__(cls, prefix)
        self.account = account
        self.here = here
        return self


def web_account_html(prefix):
    """Who is logged in, with a log-out button; or a log-in link."""
    account = getattr(prefix, "account", None)
    if account:
        return ('<form class="account" action="%s/+logout" method="post"><span>%s</span>'
                '<input type="hidden" name="csrf" value="%s"><button type="submit">Log out'
                '</button></form>' % (_e(prefix), _e(account[0]), _e(account[1])))
    here = getattr(prefix, "here", None)
    if here is None or here.endswith("/+login"):
        return ""
    return '<a class="account" href="%s/+login?next=%s">Log in</a>' % (_e(prefix), _e(here))


def web_document(title, body, prefix, crumbs=(), search=("", "")):
    """A whole page: ``crumbs`` [(text, href or None)] above, a search box, ``body``."""
    parts = ['<a href="%s/">minidevpi</a>' % _e(prefix)]
    for text, href in crumbs:
        parts.append('<a href="%s">%s</a>' % (href, _e(text)) if href else _e(text))
    q, index = search
    hidden = ('<input type="hidden" name="index" value="%s">' % _e(index)) if index else ""
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>%s</title><link rel=\"stylesheet\" href=\"%s/+static/style.css\">"
            "<link rel=\"icon\" href=\"%s/+static/icon.svg\" type=\"image/svg+xml\">"
            "<script>%s</script></head><body>"
            "<header><div class=\"bar\"><nav class=\"crumbs\">%s</nav>"
            "<form class=\"search\" action=\"%s/+search\" method=\"get\" role=\"search\">%s"
            "<input type=\"search\" name=\"q\" value=\"%s\" placeholder=\"Search projects\" "
            "aria-label=\"Search projects\"><button type=\"submit\">Search</button></form>%s"
            "</div></header><main>%s</main><footer>minidevpi %s &middot; "
            "<a href=\"%s/+status\">status</a></footer></body></html>\n" % (
                _e(title), _e(prefix), _e(prefix), WEB_COPY_JS,
                '<span class="sep">/</span>'.join(parts), _e(prefix), hidden, _e(q),
                web_account_html(prefix), body, _e(__version__), _e(prefix))).encode("utf-8")
    if len(page) > WEB_PAGE_MAX_BYTES:
        web_page_over_ceiling(title, len(page))
        return web_document(title[:200], '<h1>%s</h1><p class="note">This page is too large to '
                            'show (%s; a page is at most %s). What it lists is in the JSON '
                            'API at the same URL (ask for application/json).</p>'
                            % (_e(title[:200]), web_size(len(page)),
                               web_size(WEB_PAGE_MAX_BYTES)), prefix)
    return page


def web_page_over_ceiling(title, size):
    """A page over WEB_PAGE_MAX_BYTES: a bug in what it bounds, logged. (The tests watch
    this function: no page in the suite may reach it.)"""
    log("ERROR: the page %r would be %d bytes, over the ceiling of %d: a notice was served "
        "instead (please report this)" % (title[:200], size, WEB_PAGE_MAX_BYTES))


def _index_crumbs(prefix, path):
    user, _, name = path.partition("/")
    return [(user, web_href(prefix, user)), (name, web_href(prefix, user, name))]


def _web_index_cards(prefix, user, indexes):
    out = []
    for name, config in sorted(indexes.items()):
        kind = config.get("type", "stage")
        bases = config.get("bases") or []
        out.append(
            '<div class="card"><h2><a href="%s">%s/%s</a> <span class="tag">%s</span>%s</h2>'
            % (web_href(prefix, user, name), _e(user), _e(name), _e(kind),
               "" if config.get("volatile", True) else ' <span class="tag">non-volatile</span>'))
        if config.get("title"):
            out.append("<div><strong>%s</strong></div>" % _e(config["title"]))
        if config.get("description"):
            out.append('<div class="muted">%s</div>' % _e(config["description"]))
        if bases:
            out.append('<div class="muted">bases: %s</div>' % ", ".join(
                '<a href="%s">%s</a>' % (web_href(prefix, *b.split("/", 1)), _e(b))
                for b in bases))
        out.append("</div>")
    return "".join(out)


def web_pager(page, total):
    """The links to the previous and next page of a list of ``total`` shown WEB_PAGE_SIZE at a
    time, at ``page`` (none for a list of one page)."""
    npages = max(1, (total + WEB_PAGE_SIZE - 1) // WEB_PAGE_SIZE)
    if npages <= 1:
        return ""
    links = []
    if page > 1:
        links.append('<a href="?page=%d">&larr; previous</a>' % (page - 1))
    links.append('<span class="muted">page %d of %d</span>' % (page, npages))
    if page < npages:
        links.append('<a href="?page=%d">next &rarr;</a>' % (page + 1))
    return '<div class="pager">%s</div>' % "".join(links)


def render_web_root(prefix, users, page=1, total=None, more=()):
    """The root page: a page of the users (``Model.users_page``) and their indexes, with
    links to their own pages for users with ``more`` [(user, count)] indexes."""
    more = dict(more)
    body = ['<h1>Indexes</h1><p class="lead">Every user of this server and their indexes.'
            '</p>']  # (searching: the box in the header, as on every page)
    for name, info in sorted(users.items()):
        body.append('<h2><a href="%s">%s</a></h2>' % (web_href(prefix, name), _e(name)))
        if info.get("title") or info.get("description"):
            body.append('<p class="muted">%s %s</p>' % (_e(info.get("title", "")),
                                                       _e(info.get("description", ""))))
        indexes = info.get("indexes") or {}
        body.append('<div class="cards">%s</div>' % _web_index_cards(prefix, name, indexes)
                    if indexes else '<p class="muted">no indexes</p>')
        if name in more:
            body.append('<p><a href="%s">all %d indexes of %s</a></p>' % (
                web_href(prefix, name), more[name], _e(name)))
    body.append(web_pager(page, len(users) if total is None else total))
    return web_document("minidevpi", "".join(body), prefix)


def render_web_user(prefix, info, page=1, total=None):
    """A user's page: ``info`` (``Model.user_info``) with a page of the indexes of
    ``total``."""
    name = info["username"]
    body = ["<h1>%s</h1>" % _e(name)]
    if info.get("title"):
        body.append('<p class="lead"><strong>%s</strong></p>' % _e(info["title"]))
    if info.get("description"):
        body.append('<p class="lead">%s</p>' % _e(info["description"]))
    rules = [(k, info[k]) for k in SERVER_POLICY_KEYS if info.get(k)]
    if rules:
        body.append('<h2>Server-wide rules</h2><p class="muted">Every index inherits '
                    'these.</p><dl class="meta">%s</dl>' % "".join(
                        "<dt>%s</dt><dd>%s</dd>" % (k, ", ".join(
                            "<code>%s</code>" % _e(v) for v in values)) for k, values in rules))
    indexes = info.get("indexes") or {}
    body.append('<div class="cards">%s</div>' % _web_index_cards(prefix, name, indexes)
                if indexes else '<p class="muted">no indexes</p>')
    body.append(web_pager(page, len(indexes) if total is None else total))
    return web_document(name, "".join(body), prefix, [(name, None)])


def _usage(line):
    return ('<div class="usage"><code>%s</code><button type="button" data-copy="%s" hidden>'
            'Copy</button></div>' % (_e(line), _e(line)))


def _acl(values):
    return ", ".join("<code>%s</code>" % _e(v) for v in values) if values else \
        '<span class="muted">nobody</span>'


def render_web_index(prefix, server_url, ix, config, chain, projects, page, total):
    """An index page: ``config`` as the reader may see it, ``chain`` the paths of the
    resolution order, ``projects`` this page's rows [(name, display, version, summary,
    uploaded)] of ``total``."""
    path = ix.path
    kind = config.get("type", "stage")
    body = ['<h1>%s <span class="tag">%s</span></h1>' % (_e(path), _e(kind))]
    if config.get("title"):
        body.append('<p class="lead"><strong>%s</strong></p>' % _e(config["title"]))
    if config.get("description"):
        body.append('<p class="lead">%s</p>' % _e(config["description"]))
    simple = server_url + "/" + path + "/+simple/"
    body.append("<h2>Use it</h2>")
    body.append(_usage("pip install --index-url %s PROJECT" % simple))
    body.append(_usage("uv pip install --index-url %s PROJECT" % simple))
    body.append(_usage("devpi use %s/%s" % (server_url, path)))
    body.append('<h2>Configuration</h2><dl class="meta">')
    body.append("<dt>bases (resolution order)</dt><dd>%s</dd>" % (" &rarr; ".join(
        '<a href="%s">%s</a>' % (web_href(prefix, *p.split("/", 1)), _e(p))
        for p in chain[1:]) or '<span class="muted">none</span>'))
    body.append("<dt>acl_read</dt><dd>%s</dd>" % _acl(config.get("acl_read", [])))
    if kind == "mirror":
        body.append("<dt>mirror of</dt><dd>%s</dd>" % _e(config.get("mirror_url", "")))
        body.append("<dt>page cache</dt><dd>%s s</dd>" % _e(config.get(
            "mirror_cache_expiry", DEFAULT_MIRROR_CACHE_EXPIRY)))
        body.append('<dt>upstream projects</dt><dd><a href="%s/+simple/">the upstream\'s '
                    'project list</a> (not shown here)</dd>' % web_href(prefix, ix.user, ix.name))
    else:
        body.append("<dt>acl_upload</dt><dd>%s</dd>" % _acl(config.get("acl_upload", [])))
        body.append("<dt>acl_toxresult_upload</dt><dd>%s</dd>"
                    % _acl(config.get("acl_toxresult_upload", [])))
        body.append("<dt>mirror_whitelist</dt><dd>%s (%s)</dd>" % (
            _acl(config.get("mirror_whitelist", [])).replace(
                '<span class="muted">nobody</span>', '<span class="muted">none</span>'),
            _e(config.get("mirror_whitelist_inheritance", "union"))))
    for key in POLICY_KEYS:
        if config.get(key):
            body.append("<dt>%s</dt><dd>%s</dd>" % (key, ", ".join(
                "<code>%s</code>" % _e(v) for v in config[key])))
    body.append("<dt>volatile</dt><dd>%s</dd></dl>" % (
        "yes (releases can be overwritten and removed)" if config.get("volatile", True)
        else "no (releases stay as uploaded)"))
    body.append("<h2>Projects <span class=\"muted\">(%d%s)</span></h2>" % (
        total, ", kept locally" if kind == "mirror" else ""))
    if projects:
        body.append('<div class="scroll"><table><thead><tr><th>project</th><th>latest</th>'
                    '<th>summary</th><th>uploaded</th></tr></thead><tbody>')
        for name, display, version, summary, uploaded in projects:
            body.append('<tr><td><a href="%s">%s</a></td><td>%s</td><td>%s</td>'
                        '<td class="muted">%s</td></tr>' % (
                            web_href(prefix, ix.user, ix.name, name), _e(display),
                            '<a href="%s">%s</a>' % (web_href(prefix, ix.user, ix.name, name,
                                                              version), _e(version))
                            if version else "", _e(summary), _e(web_time(uploaded))))
        body.append("</tbody></table></div>")
    else:
        body.append('<p class="muted">no projects%s</p>' % (
            " kept locally yet" if kind == "mirror" else ""))
    body.append(web_pager(page, total))
    return web_document(path, "".join(body), prefix, _index_crumbs(prefix, path),
                        search=("", path))


WEB_STATUS_TEXT = {  # PEP 792's meanings, for people
    "archived": "archived: no further releases are expected.",
    "deprecated": "deprecated: it is no longer recommended for use, and may have been "
                  "superseded by another project.",
    "quarantined": "quarantined: it is considered unsafe to use (malware, for example), and "
                   "none of its files are offered."}


def web_status_note(status):
    """The banner of a project's PEP 792 status (status, reason), or "" (active)."""
    if status is None:
        return ""
    name, reason = status
    return ('<p class="note status"><span class="tag %s">%s</span> This project is %s%s</p>'
            % ("fail" if name == "quarantined" else "pre", _e(name),
               _e(WEB_STATUS_TEXT.get(name, name + ".")),
               (" Reason: %s" % _e(reason)) if reason else ""))


def web_held_back(until):
    """What a person sees for a release that mirror_min_age still holds back."""
    return '<span class="tag pre">held back until %s (mirror_min_age)</span>' % _e(
        utcnow_iso(until))


def web_blocked(why):
    """What a person sees for a release (or files of it) the block and allow lists or a
    reserved namespace refuse: a tag, and why."""
    return '<span class="tag fail">blocked</span> <span class="muted">%s</span>' % _e(why)


def web_upstream_changes(changes):
    """The notes of kept files a mirror's upstream removed or replaced: ``changes``
    [(filename, what, since, upstream's sha256, kept sha256, still offered)]
    (WebPages._upstream_changes), or ""."""
    if not changes:
        return ""
    items = []
    for filename, what, since, sha, kept, offered in sorted(changes):
        if what == "removed":
            items.append("<li><code>%s</code> removed upstream on %s%s</li>" % (
                _e(filename), _e(utcnow_iso(since)),
                " (still offered: mirror_keep_removed)" if offered else " (not offered)"))
        else:
            items.append("<li>%s</li>" % _e(replaced_upstream_text(filename, since, kept, sha)))
    return '<div class="note upstream-changes"><p>Upstream changes:</p><ul>%s</ul></div>' % (
        "".join(items))


def render_web_project(prefix, server_url, ix, norm, display, rows, held=None, status=None,
                       blocked=None, changes=()):
    """A project page: ``rows`` [(version, summary, yanked, source index path, has docs,
    shadowed paths)], newest first; ``held`` {version: when it matures} of the versions
    held back by a mirror's mirror_min_age and ``blocked`` {version: why} of those the
    block and allow lists refuse (both listed, never linked); ``status`` the PEP 792
    (status, reason) or None; ``changes`` what upstream removed or replaced of the kept
    files (web_upstream_changes)."""
    path = ix.path
    blocked = {v: why for v, why in (blocked or {}).items() if v not in (held or {})}
    held = held or {}
    body = ["<h1>%s</h1>" % _e(display), web_status_note(status),
            web_upstream_changes(changes)]
    if not rows:
        body.append('<p class="muted">No version is offered.</p>')
    if rows:
        latest = SearchIndex.latest([r[0] for r in rows])
        summary = next((r[1] for r in rows if r[0] == latest), "")
        if summary:
            body.append('<p class="lead">%s</p>' % _e(summary))
        body.append('<p>Latest: <a href="%s">%s</a></p>' % (
            web_href(prefix, ix.user, ix.name, norm, latest), _e(latest)))
    body.append(_usage("pip install --index-url %s/%s/+simple/ %s" % (server_url, path, norm)))
    docs = any(r[4] for r in rows)  # (a documentation column only when there are any)
    body.append('<h2>Versions</h2><div class="scroll"><table><thead><tr><th>version</th>'
                '<th>from index</th>%s<th>notes</th></tr></thead><tbody>'
                % ("<th>documentation</th>" if docs else ""))
    listed = [(version_key(r[0]), 1, r) for r in rows] + [
        (version_key(v), 0, v) for v in list(held) + list(blocked)]
    for _key, offered, row in sorted(listed, key=lambda t: t[:2], reverse=True):
        if not offered:
            body.append('<tr><td>%s</td><td></td>%s<td>%s</td></tr>' % (
                _e(row), "<td></td>" if docs else "", web_held_back(held[row])
                if row in held else web_blocked(blocked[row])))
            continue
        version, _summary, yanked, source, has_doc, shadowed = row
        tags = ""
        if is_prerelease(version):
            tags += ' <span class="tag pre">pre-release</span>'
        if yanked is not None:
            tags += ' <span class="tag yanked" title="%s">yanked</span>' % _e(yanked)
        src = '<a href="%s">%s</a>' % (web_href(prefix, *source.split("/", 1)), _e(source))
        if shadowed:
            src += ' <span class="muted">(shadows %s)</span>' % _e(", ".join(shadowed))
        doc = ('<a href="%s/+doc/">docs</a>' % web_href(prefix, ix.user, ix.name, norm,
                                                          version)) if has_doc else ""
        body.append('<tr><td><a href="%s">%s</a></td><td>%s</td>%s<td>%s</td></tr>'
                    % (web_href(prefix, ix.user, ix.name, norm, version), _e(version), src,
                       ("<td>%s</td>" % doc) if docs else "", tags))
    body.append("</tbody></table></div>")
    return web_document("%s - %s" % (display, path), "".join(body), prefix,
                        _index_crumbs(prefix, path) + [(display, None)], search=("", path))


def _wheel_tag(filename):
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        if len(parts) >= 5:
            return "wheel", parts[-3]
        return "wheel", ""
    if filename.endswith(".egg"):
        return "egg", ""
    if filename.endswith((".tar.gz", ".zip", ".tar.bz2", ".tgz", ".tar")):
        return "sdist", "source"
    return "file", ""


def _uploader(log_text):
    try:
        entries = json.loads(log_text or "[]")
    except ValueError:
        return ""
    for e in reversed(entries if isinstance(entries, list) else []):
        if isinstance(e, dict) and e.get("what") in ("upload", "push"):
            who = e.get("who") or "anonymous"
            if e.get("what") == "push":
                return "%s (pushed from %s)" % (who, e.get("src", "?"))
            return who
    return ""


# What a version page shows of the tox results of a release file: the newest
# WEB_TOXRESULTS_SHOWN reports (no more are kept: TOXRESULTS_KEPT), of each at most
# WEB_TOX_ENVS_SHOWN environments as a tag (env, python, passed or failed) linking to the
# whole report, names cut to WEB_TOX_NAME_CHARS. A report is anyone's JSON: whatever its
# shape, the page shows a summary or "unreadable report", never a 500.
WEB_TOX_ENVS_SHOWN = 12
WEB_TOX_NAME_CHARS = 40


def tox_envs(report):
    """[(environment, passed, python)] of a tox JSON report (as ``devpi test`` posts it),
    or None for a report of another shape (every field of it is untrusted). A report
    without ``testenvs`` has no environments: []."""
    if not isinstance(report, dict):
        return None
    envs = report.get("testenvs")
    if envs is None:
        return []
    if not isinstance(envs, dict):
        return None
    out = []
    for name, env in sorted(envs.items()):
        if not isinstance(env, dict):
            return None
        codes = []
        for step in ("setup", "test"):
            cmds = env.get(step)
            if cmds is None:
                continue
            if not isinstance(cmds, list):
                return None
            for cmd in cmds:
                if not isinstance(cmd, dict):
                    return None
                code = cmd.get("retcode", "")
                if isinstance(code, bool) or not isinstance(code, (int, str)):
                    return None
                codes.append(str(code).strip()[:20])
        python = env.get("python")
        if python is None:
            python = ""
        elif isinstance(python, dict):
            python = python.get("version", "")
            if not isinstance(python, str):
                python = ""
        else:
            return None
        out.append((name[:WEB_TOX_NAME_CHARS], bool(codes) and all(c == "0" for c in codes),
                    python.split()[0][:WEB_TOX_NAME_CHARS] if python.split() else ""))
    return out


def _web_tox_tags(thref, envs):
    """The tags of one tox report (``envs`` its tox_envs) on a version page: a bounded
    summary, linking to the whole report."""
    if envs is None:
        return ['<a href="%s" class="tag fail">unreadable report</a>' % _e(thref)]
    if not envs:
        return ['<a href="%s" class="tag">report</a>' % _e(thref)]
    tags = []
    for env, passed, python in envs[:WEB_TOX_ENVS_SHOWN]:
        tags.append('<a href="%s" class="tag %s"%s>%s %s</a>' % (
            _e(thref), "ok" if passed else "fail",
            (' title="python %s"' % _e(python)) if python else "", _e(env),
            "passed" if passed else "failed"))
    if len(envs) > WEB_TOX_ENVS_SHOWN:
        tags.append('<a href="%s" class="tag">%d more</a>'
                    % (_e(thref), len(envs) - WEB_TOX_ENVS_SHOWN))
    return tags


# Author / Author-email (and Maintainer's) as the core metadata has them: a name, and a list
# of addresses with or without names ("Jane Roe <jane@example.org>, bob@example.org"). A page
# shows each person once, the name linked to the address (mailto:), at most
# WEB_PEOPLE_SHOWN of them; what does not read as such a list (or is longer than
# WEB_PEOPLE_MAX_CHARS) is shown as written. (Not email.utils.getaddresses: it recurses
# into nested comments and is slow on long hostile values; this reads linearly.)
WEB_PEOPLE_SHOWN = 50
WEB_PEOPLE_MAX_CHARS = 20000
_WEB_PERSON = re.compile(r'\s*(?:"([^"]*)"\s*|([^,"<>]*))(?:<([^<>]*)>\s*)?(,|\Z)')
_WEB_MAIL_ADDRESS = re.compile(r"[^\s@<>\"(),;:\\\[\]]+@[^\s@<>\"(),;:\\\[\]]+")


def _web_mail_list(text):
    """[(name or "", address)] of an Author-email value, or None if it is not such a list."""
    if len(text) > WEB_PEOPLE_MAX_CHARS:
        return None
    out, pos = [], 0
    while pos < len(text):
        m = _WEB_PERSON.match(text, pos)
        if m is None:
            return None
        name = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        address = m.group(3)
        if address is None:
            name, address = "", name  # a bare address
        if not _WEB_MAIL_ADDRESS.fullmatch(address.strip()):
            return None
        out.append((name, address.strip()))
        pos = m.end()
    return out


def web_people(names, emails):
    """The HTML of a version's people from its Author and Author-email (or Maintainer and
    Maintainer-email) fields: "" when both are empty."""
    names = str(names or "").strip()
    emails = str(emails or "").strip()
    if not emails:
        return _e(names)
    people = _web_mail_list(emails)
    if not people:
        return _e((names + " " if names else "") + emails)

    def mailto(text, address):
        return '<a href="mailto:%s">%s</a>' % (_e(urllib.parse.quote(address, safe="@+")),
                                               _e(text))
    if names and len(people) == 1 and not people[0][0]:
        return mailto(names, people[0][1])  # Author: Jane Roe, Author-email: jane@...
    out = [_e(names)] if names and names not in [n for n, _a in people] else []
    out.extend(mailto(n or a, a) for n, a in people[:WEB_PEOPLE_SHOWN])
    if len(people) > WEB_PEOPLE_SHOWN:
        out.append("and %d more" % (len(people) - WEB_PEOPLE_SHOWN))
    return ", ".join(out)


def _requirement(text):
    req, sep, marker = str(text).partition(";")
    out = "<code>%s</code>" % _e(req.strip())
    if sep:
        out += ' <span class="muted mono">; %s</span>' % _e(marker.strip())
    return out


_WEB_HEADING_TAG = re.compile(r"<(/?)h([1-6])(?=[\s>])")


def _demote_headings(fragment):
    """A sanitized description's headings two levels down (h1 to h3, at most h6): below
    the page's <h1> and its "Description" <h2>. (In sanitized HTML every "<" opens a tag.)"""
    return _WEB_HEADING_TAG.sub(lambda m: "<%sh%d" % (m.group(1), min(6, int(m.group(2)) + 2)),
                                fragment)


# A mirror knows of a version only its files, but it may keep a file's core metadata (the
# PEP 658 .metadata an installer fetched through it): its version page then shows the
# summary (one line of at most WEB_KEPT_SUMMARY_CHARS) and the description (rendered as an
# upload's, bounded: render_description) from it. Upstream's text, so as hostile as any user's.
# A page reads only what is kept: it never fetches, and works offline. Of a file it reads the
# first WEB_KEPT_METADATA_BYTES (parsing 16 MiB of headers takes seconds): the description
# of a longer one shows its start as plain text, as a description too long to render does.
WEB_KEPT_SUMMARY_CHARS = 500
WEB_KEPT_METADATA_BYTES = 2 * 1024 * 1024


def kept_core_metadata(path):
    """{"summary", "description", "description_content_type"} of the kept core metadata
    file at ``path`` ({} for one that is not readable core metadata)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(WEB_KEPT_METADATA_BYTES + 1)
        meta = metadata_from_pkginfo(data[:WEB_KEPT_METADATA_BYTES])
    except Exception:  # (whatever bytes upstream sent: no page fails for them)
        return {}
    out = {k: meta[k] for k in ("description", "description_content_type")
           if isinstance(meta.get(k), str)}
    if len(data) > WEB_KEPT_METADATA_BYTES:
        out["description_content_type"] = "text/plain"
    out["summary"] = " ".join(str(meta.get("summary") or "").split()
                              )[:WEB_KEPT_SUMMARY_CHARS].rstrip()
    return out


def render_web_version(prefix, server_url, ix, norm, version, meta, yanked, source, files,
                       tox, newer, doc, status=None, cooling=None, refused=None, sboms=None,
                       changes=()):
    """A version page. ``files`` [(File, href)] of the release files offered (a file with
    a PEP 740 provenance gets a link to it at href + ".provenance"), ``tox`` {release
    filename: [(href, tox_envs of the report, File)], newest first}, ``newer`` [(label,
    version)], ``doc`` the documentation's URL or None, ``status`` the project's PEP 792 (status, reason) or
    None, ``cooling`` when the first file of this version still held back by
    mirror_min_age matures (those are not listed), or None; ``refused`` why the first
    file the block and allow lists refuse is refused (those are not listed), or None;
    ``sboms`` {release filename: [(name, size, href)]} of the PEP 770 SBOMs a wheel
    carries; ``changes`` what upstream removed or replaced of this version's kept files
    (web_upstream_changes)."""
    display = meta.get("name") or norm
    sboms = sboms or {}
    path = ix.path
    body = ['<h1>%s <span class="muted">%s</span></h1>' % (_e(display), _e(version)),
            web_status_note(status), web_upstream_changes(changes)]
    if cooling is not None:
        body.append('<p class="note">%s Some files of this release are not offered yet.</p>'
                    % web_held_back(cooling))
    if refused is not None:
        body.append('<p class="note">%s Some files of this release are not offered.</p>'
                    % web_blocked(refused))
    if meta.get("summary"):
        body.append('<p class="lead">%s</p>' % _e(meta["summary"]))
    for label, v in newer:
        body.append('<p class="note">A newer %s version is available: <a href="%s">%s</a>'
                    '</p>' % (_e(label), web_href(prefix, ix.user, ix.name, norm, v), _e(v)))
    if yanked is not None:
        body.append('<p class="note"><span class="tag yanked">yanked</span> %s</p>'
                    % _e(yanked or "(no reason given)"))
    if is_prerelease(version):
        body.append('<p><span class="tag pre">pre-release</span></p>')
    body.append(_usage("pip install --index-url %s/%s/+simple/ %s==%s" % (
        server_url, path, norm, version)))
    body.append('<dl class="meta">')

    def row(label, value_html):
        if value_html:
            body.append("<dt>%s</dt><dd>%s</dd>" % (label, value_html))
    row("from index", '<a href="%s">%s</a>' % (web_href(prefix, *source.split("/", 1)),
                                               _e(source)))
    if doc:
        row("documentation", '<a href="%s">read the documentation</a>' % _e(doc))
    row("author", web_people(meta.get("author"), meta.get("author_email")))
    row("maintainer", web_people(meta.get("maintainer"), meta.get("maintainer_email")))
    lic = meta.get("license_expression") or meta.get("license") or ""
    row("license", _e(lic if len(lic) < 300 else lic[:300] + "..."))
    row("requires-python", "<code>%s</code>" % _e(meta["requires_python"])
        if meta.get("requires_python") else "")
    row("keywords", _e(meta.get("keywords", "")))
    urls = []
    if meta.get("home_page"):
        urls.append(("Homepage", meta["home_page"]))
    if meta.get("download_url"):
        urls.append(("Download", meta["download_url"]))
    for entry in meta.get("project_urls") or []:
        label, sep, url = str(entry).partition(",")
        urls.append((label.strip(), url.strip()) if sep else ("link", label.strip()))
    row("project URLs", "<br>".join("%s: %s" % (_e(label), web_link(url))
                                      for label, url in urls))
    row("dependencies", "<br>".join(_requirement(r) for r in meta.get("requires_dist") or []))
    row("extras", ", ".join("<code>%s</code>" % _e(x) for x in meta.get("provides_extras")
                            or []))
    row("classifiers", "<br>".join(_e(c) for c in meta.get("classifiers") or []))
    body.append("</dl>")
    body.append('<h2>Files</h2>')
    if files:
        body.append('<div class="scroll"><table class="files"><thead><tr><th>file</th>'
                    '<th>type</th><th>python</th><th>size</th><th>uploaded</th>'
                    '<th>tests</th></tr></thead><tbody>')
        for f, href in files:
            kind, pytag = _wheel_tag(f.filename)
            tests = []
            for thref, envs, tf in tox.get(f.filename, [])[:TOXRESULTS_KEPT]:
                tests.extend(_web_tox_tags(thref, envs))
            up = _uploader(f.log)
            sbom = ('<div class="sbom">SBOM: %s</div>' % ", ".join(
                '<a href="%s">%s</a> <span class="muted">%s</span>' % (
                    _e(shref), _e(name), _e(web_size(size)))
                for name, size, shref in sboms.get(f.filename, ()))
                if sboms.get(f.filename) else "")
            body.append(
                '<tr><td><a href="%s">%s</a>%s%s<div class="sha">sha256 %s</div>%s</td>'
                '<td>%s</td><td>%s</td><td class="num">%s</td><td>%s%s</td><td>%s</td></tr>'
                % (_e(href), _e(f.filename),
                   ' <span class="tag yanked">yanked</span>' if f.yanked is not None else "",
                   (' <a href="%s.provenance" class="tag" title="PEP 740 provenance (not '
                    'verified here)">provenance</a>' % _e(href)) if f.provenance else "",
                   _e(f.sha256 or "(not known until first download)"), sbom, kind, _e(pytag),
                   _e(web_size(f.size)), _e(web_time(f.uploaded)),
                   ('<div class="muted">by %s</div>' % _e(up)) if up else "",
                   " ".join(tests)))
        body.append("</tbody></table></div>")
    else:
        body.append('<p class="muted">no files</p>')
    description = meta.get("description") or ""
    if description.strip():
        body.append('<h2>Description</h2><div class="description">%s</div>' % _demote_headings(
            render_description(description, meta.get("description_content_type") or "")))
    return web_document("%s %s - %s" % (display, version, path), "".join(body), prefix,
                        _index_crumbs(prefix, path) + [
                            (display, web_href(prefix, ix.user, ix.name, norm)),
                            (version, None)], search=("", path))


def render_web_search(prefix, q, index, results, backend, ms):
    """Search results [(index path, name, display, version, summary, uploaded)]."""
    where = " in %s" % index if index else ""
    body = ["<h1>Search%s</h1>" % _e(where)]
    body.append('<form class="search" action="%s/+search" method="get">%s<input '
                'type="search" name="q" value="%s" aria-label="Search projects"><button '
                'type="submit">Search</button></form>' % (
                    _e(prefix), ('<input type="hidden" name="index" value="%s">' % _e(index))
                    if index else "", _e(q)))
    if q.strip():
        body.append('<p class="muted">%s for <strong>%s</strong>%s%s '
                    '(%.1f ms)</p>' % (plural(len(results), "result"), _e(q),
                                       _e(where), " (the first %d)" % WEB_SEARCH_LIMIT
                                       if len(results) >= WEB_SEARCH_LIMIT else "", ms))
        if results:
            body.append('<div class="scroll"><table><thead><tr><th>project</th><th>version'
                        '</th><th>index</th><th>summary</th></tr></thead><tbody>')
            for path, name, display, version, summary, _up in results:
                user, _, ixname = path.partition("/")
                body.append('<tr><td><a href="%s">%s</a></td><td>%s</td><td><a href="%s">%s'
                            '</a></td><td>%s</td></tr>' % (
                                web_href(prefix, user, ixname, name), _e(display),
                                '<a href="%s">%s</a>' % (web_href(prefix, user, ixname, name,
                                                                  version), _e(version))
                                if version else "",
                                web_href(prefix, user, ixname), _e(path), _e(summary)))
            body.append("</tbody></table></div>")
    body.append('<p class="muted">Matches project names (normalised, by prefix), summaries, '
                'keywords and description words. Search backend: %s.</p>' % _e(backend))
    return web_document("Search: %s" % q if q else "Search", "".join(body), prefix,
                        [("search", None)], search=(q, index))


def render_web_status(prefix, facts, mirrors, rules=None):
    """The status page: ``facts`` [(label, text)], ``mirrors`` [(path, url, last
    success, last failure, error)], ``rules`` the server-wide rules {list: [entry]}
    (None: not shown to this reader)."""
    body = ['<h1>Status</h1><dl class="meta">']
    for label, value in facts:
        body.append("<dt>%s</dt><dd>%s</dd>" % (_e(label), _e(value)))
    body.append("</dl>")
    if rules is not None:
        body.append('<h2>Server-wide rules</h2><dl class="meta" id="server-rules">')
        for key, entries in rules.items():
            body.append("<dt>%s (%d)</dt><dd>%s</dd>" % (
                _e(key), len(entries), "<br>".join(_e(x) for x in entries)
                or '<span class="muted">none</span>'))
        body.append("</dl>")
    body.append("<h2>Mirrors</h2>")
    if mirrors:
        body.append('<div class="scroll"><table><thead><tr><th>index</th><th>upstream</th>'
                    '<th>last success</th><th>last failure</th></tr></thead><tbody>')
        for path, url, ok, failed, error in mirrors:
            user, _, name = path.partition("/")
            body.append('<tr><td><a href="%s">%s</a></td><td>%s</td><td>%s</td><td>%s%s</td>'
                        '</tr>' % (web_href(prefix, user, name), _e(path), _e(url),
                                   _e(web_time(ok) or "never"), _e(web_time(failed) or "none"),
                                   ('<div class="muted">%s</div>' % _e(error)) if error else ""))
        body.append("</tbody></table></div>")
    else:
        body.append('<p class="muted">no mirror indexes</p>')
    return web_document("Status", "".join(body), prefix, [("status", None)])


def render_web_error(prefix, status, message):
    title = {401: "Log-in needed", 403: "Not allowed", 404: "Not found",
             410: "Gone"}.get(status, "Error")
    body = ('<h1>%d %s</h1><p class="lead">%s</p><p><a href="%s/">Back to the list of '
            'indexes</a></p>' % (status, _e(title), _e(message), _e(prefix)))
    return web_document("%d %s" % (status, title), body, prefix)


def render_web_login(prefix, next_path, form_token, message="", user="", notice=""):
    """The log-in page: a form posting user name and password to ``/+login``, with its
    CSRF token and the local path to return to."""
    account = getattr(prefix, "account", None)
    prefix = PagePrefix(prefix, account, prefix + "/+login")  # (no log-in link above)
    body = ['<h1>Log in</h1><p class="lead">%s</p>' % _e(
        message or "Log in to see the indexes that are not for everyone.")]
    if account:
        body.append('<p class="note">You are logged in as %s.</p>' % _e(account[0]))
    if notice:
        body.append('<p class="note">%s</p>' % notice)
    body.append(
        '<form class="login" action="%s/+login" method="post">'
        '<input type="hidden" name="csrf" value="%s"><input type="hidden" name="next" '
        'value="%s"><label>User name <input type="text" name="username" value="%s" '
        'autocomplete="username" autocapitalize="none" required autofocus></label>'
        '<label>Password <input type="password" name="password" '
        'autocomplete="current-password" required></label><button type="submit">Log in'
        '</button></form>' % (_e(prefix), _e(form_token), _e(next_path), _e(user)))
    return web_document("Log in", "".join(body), prefix, [("log in", None)])


FORM_TYPE = "application/x-www-form-urlencoded"
WEB_FORM_MAX_BODY = 16 * 1024  # a log-in form is a few hundred bytes
_LOCAL_PATH_RE = re.compile(r"^/(?![/\\])[^\\\x00-\x20\x7f]{0,2000}\Z")


def local_path(value):
    """``value`` if it is a path of this server (no scheme, no host, no ``//`` or ``/\\``
    start that a browser takes for another host), else None: no open redirect."""
    if not isinstance(value, str) or not _LOCAL_PATH_RE.match(value):
        return None
    try:
        u = urllib.parse.urlsplit(value)
    except ValueError:
        return None
    return value if not (u.scheme or u.netloc) else None


class WebPages:
    """The App's web pages (mixed into App): each reads through the model as the request's
    reader, renders with the functions above, and keeps the bytes in the page cache."""

    def web_prefix(self, req):
        prefix = urllib.parse.urlsplit(req.outside_url()).path.rstrip("/")
        return PagePrefix(prefix, self.web_account(req), prefix + _quote_path(req.path))

    @staticmethod
    def web_account(req):
        """(user, logout token) of a browser logged in with its session cookie, or None."""
        try:
            req.actor
        except HTTPError:  # (throttled credentials: anonymous)
            return None
        return req.session

    def web_response(self, req, page):
        resp = self.page_response(req, page, shared=False)
        # (a page shows who is logged in: it varies by the session cookie too)
        resp.headers = [(k, v + ", Cookie" if k == "Vary" else v) for k, v in resp.headers]
        resp.headers.extend(WEB_HEADERS)
        return resp

    def web_cached(self, req, key, validator, render):
        """The page ``key`` from the cache while ``validator`` holds (and, for a page that
        shows a release held back by age, until it matures), else ``render()``d (and
        kept). Pages hold this server's URL and depend on who reads them (and, for the
        header's log-in link and log-out button, on the page's path and the session)."""
        key = ("web",) + key + (req.outside_url(), req.actor, self.web_account(req), req.path)
        page = self.pages.get(key, validator)
        if page is None:
            body = render()  # the page's bytes, or (bytes, when it changes by itself)
            body, expires = body if isinstance(body, tuple) else (body, None)
            page = self.pages.put(key, validator, body, HTML_TYPE, expires=expires)
        return self.web_response(req, page)

    def web_readable(self, ix, req):
        """Whether the asker may read the index itself: the model's read rule, and the
        index limit of a scoped token (a search or a status page lists no other)."""
        scope = getattr(req.actor, "scope", None)
        if scope is not None and scope.refusal("pkg_read", ix.path) is not None:
            return False
        return self.model.may_read(req.actor, ix)

    @staticmethod
    def web_page_number(req):
        """The page of a list a request asks for (?page=N, from 1)."""
        try:
            return max(1, min(int((req.query.get("page") or ["1"])[0]), 10 ** 6))
        except ValueError:
            raise bad_request("page must be a number")

    def web_root(self, req):
        page = self.web_page_number(req)

        def render():
            total, users, more = self.model.users_page(req.actor, (page - 1) * WEB_PAGE_SIZE,
                                                       WEB_PAGE_SIZE)
            return render_web_root(self.web_prefix(req), users, page, total, more)
        return self.web_cached(req, ("root", page), self.store.serial, render)

    def web_user(self, req, user):
        page = self.web_page_number(req)
        m = self.model

        def render():
            info = m.user_info(user, actor=req.actor, offset=(page - 1) * WEB_PAGE_SIZE,
                               limit=WEB_PAGE_SIZE)
            return render_web_user(self.web_prefix(req), info, page,
                                   len(m.readable_indexes(user, req.actor)))
        return self.web_cached(req, ("user", user, page), self.store.serial, render)

    def web_index(self, req, ix):
        page = self.web_page_number(req)
        m = self.model

        def render():
            total, projects = m.project_rows(ix, (page - 1) * WEB_PAGE_SIZE, WEB_PAGE_SIZE)
            chain = [b.path for b in m.chain(ix, req.actor)]
            return render_web_index(self.web_prefix(req), req.outside_url(), ix,
                                    dict(m.shown_config(ix.config, req.actor),
                                         acl_read=list(m.read_acl(ix))), chain, projects,
                                    page, total)
        if not self.web_readable(ix, req):
            raise self.model.read_refusal(req.actor, ix.path)
        return self.web_cached(req, ("index", ix.path, page), self.store.serial, render)

    def _web_releases(self, walk):
        """{version: [(meta, yanked, files, index path)]} as the walk offers them
        (Model.releases: the supply-chain guards are decided there), the one that counts
        first; None when no index has the project."""
        return self.model.releases(walk, lambda b: self.mirror_version_data(b, walk),
                                   sources=True)

    @staticmethod
    def _upstream_changes(walk, version=None):
        """[(filename, what, since, upstream's sha256, kept sha256, still offered)] of the
        files the walk's mirrors kept and their upstream removed or replaced
        (BaseWalk.upstream_changes); only ``version``'s if given."""
        out = []
        for b in walk.mirrors:
            for filename, (what, since, sha, kept) in walk.upstream_changes(b).items():
                if version is None or filename_version(filename) == version:
                    out.append((filename, what, since, sha, kept,
                                what != "removed" or bool(b.config.get("mirror_keep_removed"))))
        return out

    def _web_project_validator(self, req, ix, norm):
        """The page-cache validator of a project's pages, read after the mirrors' pages
        were revalidated upstream if they expired (as the simple page does)."""
        for b in self.model.walk(ix, norm, req.actor).mirrors:
            self.mirror.ensure_fresh(b, norm)
        return self.pages.web_project_validator(norm)

    def web_project(self, req, ix, norm):
        m = self.model

        def render():
            walk = m.walk(ix, norm, req.actor)
            releases = self._web_releases(walk)
            held = walk.held_back(releases or ())
            blocked = walk.blocked(releases or ())
            status = walk.status
            if releases is None or not (releases or held or blocked or status):
                raise not_found("The project %s does not exist on %s." % (norm, ix.path))
            rows = []
            for ver in sorted(releases, key=version_key, reverse=True):
                first = releases[ver][0]
                meta, yanked, files, source = first
                has_doc = any(f.rel == "doczip" for r in releases[ver] for f in r[2])
                rows.append((ver, meta.get("summary", ""), yanked, source, has_doc,
                             [r[3] for r in releases[ver][1:]]))
            display = walk.display or (rows and releases[rows[0][0]][0][0].get("name")) \
                or norm
            # (a page with a release held back by age is built again when it matures)
            return render_web_project(self.web_prefix(req), req.outside_url(), ix, norm,
                                      display, rows, held, status, blocked,
                                      self._upstream_changes(walk)), walk.next_change
        return self.web_cached(req, ("project", ix.path, norm),
                               self._web_project_validator(req, ix, norm), render)

    def web_version(self, req, ix, norm, version):
        """A version page; VERSION ``latest`` is the newest version offered, ``stable`` the
        newest that is not a pre-release (as devpi-web has them)."""
        m = self.model

        def render():
            walk = m.walk(ix, norm, req.actor)
            releases = self._web_releases(walk) or {}
            ver = version
            if ver in ("latest", "stable") and ver not in releases:
                offered = [v for v in releases if ver == "latest" or not is_prerelease(v)]
                ver = max(offered, key=version_key) if offered else ver
            found = releases.get(ver)
            status = walk.status
            changes = self._upstream_changes(walk, ver)
            if not found:
                removed = [c for c in changes if c[1] == "removed"]
                if removed:
                    raise not_found("The version %s of project %s: %s" % (
                        ver, norm, removed_upstream_message(removed[0][0], removed[0][2])))
                held = walk.held_back(releases)
                if ver in held:
                    raise not_found(held_back_message("version %s of project %s"
                                                      % (ver, norm), held[ver]))
                if ver in walk.refused:
                    raise forbidden(walk.refused[ver])
                if status is not None and status[0] == "quarantined":
                    raise not_found("The project %s is quarantined%s: none of its files "
                                    "are offered." % (norm, ": " + status[1] if status[1]
                                                      else ""))
                raise not_found("The version %s of project %s does not exist."
                                % (ver, norm))
            meta, yanked, files, source = found[0]
            if any(b.is_mirror and b.path == source for b in walk.visible):
                kept = next((p for p in (self.store.blob_path(f.core_metadata) for f in files
                                         if f.rel == "releasefile" and f.core_metadata)
                             if os.path.exists(p)), None)
                if kept is not None:
                    meta = dict(meta, **kept_core_metadata(kept))
            prefix = self.web_prefix(req)
            doc = None
            if any(f.rel == "doczip" for r in found for f in r[2]):
                doc = prefix + "/%s/%s/%s/+doc/" % (ix.path, _seg(norm), _seg(ver))
            release = [f for f in files if f.rel == "releasefile"]
            shas = {f.filename: f.sha256 for f in release}
            tox = {}
            for f in sorted((f for f in files if f.rel == "toxresult"
                             and f.for_filename in shas),
                            key=lambda f: f.uploaded or 0, reverse=True):
                shown = tox.setdefault(f.for_filename, [])
                if len(shown) >= TOXRESULTS_KEPT:  # (only an import brings more)
                    continue
                try:  # one report at a time: only its summary is kept
                    with open(self.store.blob_path(f.sha256), "rb") as fh:
                        envs = tox_envs(json.loads(fh.read(TOXRESULT_MAX_BODY + 1).decode(
                            "utf-8"), parse_int=_json_int))
                except (OSError, ValueError, RecursionError):
                    envs = None
                href = prefix + "/" + file_relpath(f.index, shas[f.for_filename], f.filename)
                shown.append((href, envs, f))
            versions = list(releases)
            newer = []
            key = version_key(ver)
            stable = SearchIndex.latest([v for v in versions if not is_prerelease(v)])
            newest = max(versions, key=version_key)
            if stable and version_key(stable) > key:
                newer.append(("stable", stable))
            if newest != stable and version_key(newest) > key:
                newer.append(("pre-release", newest))
            return render_web_version(prefix, req.outside_url(), ix, norm, ver, meta,
                                      yanked, source,
                                      [(f, prefix + "/" + f.relpath) for f in release], tox,
                                      newer, doc, status, walk.cooling.get(ver),
                                      walk.refused.get(ver),
                                      {f.filename: [(n, e[5], prefix + "/" + f.sbom_relpath(n))
                                                    for n, e in sorted(m.sboms(f).items())]
                                       for f in release}, changes), \
                walk.next_change
        return self.web_cached(req, ("version", ix.path, norm, version),
                               self._web_project_validator(req, ix, norm), render)

    def route_search(self, req):
        t0 = time.perf_counter()
        m = self.model
        q = (req.query.get("q") or [""])[0][:200]
        index = (req.query.get("index") or [""])[0].strip("/")
        if index:
            ix = m.require_index(index)
            if not self.web_readable(ix, req):
                raise m.read_refusal(req.actor, ix.path)
            indexes = m.chain(ix, req.actor)
        else:
            indexes = [ix for ix in m.all_indexes() if self.web_readable(ix, req)]
        paths = {b.id: b.path for b in indexes}
        results = [(paths[r[0]],) + tuple(r[1:])
                   for r in m.search.query(q, list(paths), WEB_SEARCH_LIMIT)]
        if wants_json(req.accept) and not wants_html(req):
            return api_result("search", [
                {"index": r[0], "name": r[1], "display": r[2], "version": r[3],
                 "summary": r[4]} for r in results])
        ms = (time.perf_counter() - t0) * 1000
        page = CachedPage(None, render_web_search(self.web_prefix(req), q, index, results,
                                                  m.search.backend, ms), HTML_TYPE)
        return self.web_response(req, page)

    def route_static(self, req, name):
        found = WEB_STATIC.get(name)
        if found is None:
            raise not_found("no such file: /+static/%s" % name[:100])
        ctype, body = found
        page = self.pages.get(("static", name), 0) or self.pages.put(("static", name), 0,
                                                                    body, ctype)
        resp = self.page_response(req, page)
        resp.headers = [(k, WEB_STATIC_CACHE_CONTROL if k == "Cache-Control" else v)
                        for k, v in resp.headers]
        return resp

    def web_status(self, req):
        m = self.model
        c = self.store.conn()
        count = lambda sql: c.execute(sql).fetchone()[0]  # noqa: E731
        # (from the rows, not a walk of the directory: a big server has many blobs)
        blobs = c.execute("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM (SELECT MAX(size) "
                          "AS size FROM "
                          "files GROUP BY sha256) AS f").fetchone()[0]
        db = self.store.database_size()
        up = int(time.time() - getattr(self, "started", time.time()))
        reader = lambda: req.actor  # noqa: E731
        facts = [("version", "minidevpi %s (speaks devpi-server %s)" % (
                     __version__, DEVPI_SERVER_VERSION)),
                 ("uptime", "%dd %02d:%02d:%02d" % (up // 86400, up // 3600 % 24,
                                                    up // 60 % 60, up % 60))]
        if m.may_see_state(reader):
            facts += [
                 ("serial", str(self.store.serial)),
                 ("storage", "%s of files, %s of database%s" % (
                     web_size(blobs), web_size(db), ", in %s" % self.store.where()
                     if m.may_see_serverdir(reader) else "")),
                 ("users", str(count("SELECT COUNT(*) FROM users"))),
                 ("indexes", str(count("SELECT COUNT(*) FROM indexes"))),
                 ("projects", str(count("SELECT COUNT(*) FROM projects"))),
                 ("versions", str(count("SELECT COUNT(*) FROM versions"))),
                 ("files", str(count("SELECT COUNT(*) FROM files")))]
        facts += [("offline mode", "on: no upstream traffic" if self.mirror.offline
                   else "off"),
                  ("search backend", m.search.backend)]
        fetched = dict(c.execute("SELECT index_id, MAX(fetched) FROM mirror_pages WHERE "
                                 "status IN (200, 404) GROUP BY index_id").fetchall())
        failed = {}
        for key, value in list((getattr(self.mirror, "_failed", None) or {}).items()):
            try:
                ts, err = value[0], value[1]
                if key[0] not in failed or ts > failed[key[0]][0]:
                    failed[key[0]] = (ts, getattr(err, "message", str(err)))
            except (TypeError, IndexError):
                pass
        mirrors = []
        for ix in m.all_indexes():
            if ix.is_mirror and self.web_readable(ix, req):
                fail = failed.get(ix.id, (None, ""))
                mirrors.append((ix.path, shown_mirror_url(ix.config.get("mirror_url", "")),
                                fetched.get(ix.id), fail[0], fail[1]))
        rules = m.server_policy().given if m.may_see_state(reader) else None
        page = CachedPage(None, render_web_status(self.web_prefix(req), facts, mirrors,
                                                  rules), HTML_TYPE)
        return self.web_response(req, page)

    def error_page(self, req, e):
        """An error as a page, for a browser (the handler adds the error's headers). A
        read that needs a log-in gets the log-in page, returning to where it was."""
        try:
            prefix = self.web_prefix(req)
        except Exception:
            prefix = ""
        if isinstance(prefix, PagePrefix):
            # a refusal names nothing below the index (one answer for every path there,
            # whatever exists): a log-in from it returns to the index
            prefix = PagePrefix(prefix, prefix.account, prefix + _quote_path(
                "/" + "/".join([s for s in req.path.split("/") if s][:2])))
            if e.status == 401:
                return self.web_login_page(req, prefix.here, 401, e.message)
        return Response(e.status, render_web_error(prefix, e.status, e.message),
                        [("Content-Type", HTML_TYPE), ("Vary", "Cookie")] + list(WEB_HEADERS))

    # -- logging in and out (a browser's session) --------------------------------------
    #
    # The log-in form posts user name and password to /+login; a right password (never a
    # token: a session is a full login of the user) sets the session cookie
    # (Accounts.make_session): HttpOnly, SameSite=Strict, Path=/, and over https Secure
    # with the __Host- prefix. It authenticates only the reads of SESSION_READS; every
    # write still needs a password or token in a header, so cross-site requests have
    # nothing to forge. The two forms, log in and log out, still carry a CSRF token (log
    # in: bound to a nonce cookie of the browser; log out: to the session) and are refused
    # when the browser says they came from elsewhere (Origin, Sec-Fetch-Site).

    def web_cookie(self, req, base, value, max_age):
        secure = req.is_https()
        return "%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Strict%s" % (
            self.session_cookie_name(req, base), value, max_age, "; Secure" if secure else "")

    def web_next(self, req, value):
        """Where a log-in returns to: ``value`` if it is a local path, else the root."""
        return local_path(value) or (self.web_prefix(req) + "/")

    def web_login_page(self, req, next_path, status=200, message="", user="",
                       headers=()):
        nonce = next((n for n in req.cookie_values(self.session_cookie_name(
            req, LOGIN_COOKIE)) if re.match(r"^[0-9a-f]{32}$", n)), None) or \
            secrets.token_hex(16)
        notice = ""
        if req.headers.get("Sec-Fetch-Site", "").strip().lower() == "cross-site" \
                and status == 401:
            # SameSite=Strict: a link from another site arrives without the session
            notice = ('Logged in already? A link from another site comes without your '
                      'log-in: <a href="%s">open the page from here</a>.'
                      % _e(self.web_next(req, next_path)))
        body = render_web_login(self.web_prefix(req), self.web_next(req, next_path),
                                self.model.accounts.login_form_token(nonce), message, user,
                                notice)
        return Response(status, body, [
            ("Content-Type", HTML_TYPE), ("Cache-Control", "no-store"), ("Vary", "Cookie"),
            ("Set-Cookie", self.web_cookie(req, LOGIN_COOKIE, nonce, LOGIN_FORM_LIFETIME))]
            + list(headers) + list(WEB_HEADERS))

    def route_login_page(self, req):
        return self.web_login_page(req, (req.query.get("next") or [""])[0])

    def check_same_origin(self, req):
        """Refuse a form that the browser says another site sent."""
        site = req.headers.get("Sec-Fetch-Site")
        if site is not None and site.strip().lower() != "same-origin":
            raise forbidden("This form came from another site (Sec-Fetch-Site: %s)."
                            % site.strip()[:40])
        origin = req.headers.get("Origin")
        if origin is None:
            return
        host = (req.headers.get("Host") or "").strip()
        own = {_origin(req.outside_url())}
        if host:
            own.update((_origin("http://" + host), _origin("https://" + host)))
        if origin.strip() in ("", "null") or _origin(origin.strip()) not in own:
            raise forbidden("This form came from another site (Origin: %s)."
                            % origin.strip()[:100])

    @staticmethod
    def web_form(req):
        """The fields of a url-encoded form (the first value of each)."""
        if req.headers.get("Content-Type", "").split(";")[0].strip().lower() != FORM_TYPE:
            raise bad_request("expected a form (%s)" % FORM_TYPE)
        data = req.body.read(WEB_FORM_MAX_BODY)
        try:
            fields = urllib.parse.parse_qs(data.decode("ascii"), keep_blank_values=True,
                                           errors="strict", max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise bad_request("the form is not valid")
        return {k: v[0] for k, v in fields.items()}

    def web_form_refusal(self, req, e):
        resp = self.error_page(req, e)
        resp.headers.extend(e.headers.items())
        resp.headers.append(("Cache-Control", "no-store"))
        return resp

    def web_login(self, req):
        accounts = self.model.accounts
        try:
            self.check_same_origin(req)
            form = self.web_form(req)
            token = form.get("csrf", "")
            if not any(hmac.compare_digest(token, accounts.login_form_token(n)) for n in
                       req.cookie_values(self.session_cookie_name(req, LOGIN_COOKIE))[:4]):
                raise forbidden("This log-in form has expired or is not this server's: "
                                "load the log-in page again.")
        except HTTPError as e:
            return self.web_form_refusal(req, e)
        next_path = self.web_next(req, form.get("next", ""))
        user, password = form.get("username", ""), form.get("password", "")
        name = None
        if user and password and len(user) <= 100 and len(password) <= 4096:
            try:  # the API's throttle: a guess here counts as one there
                name = accounts.authenticate(user, password, req.handler.client_address[0],
                                             tokens=False)
            except HTTPError as e:
                if e.status != 429:
                    raise
                return self.web_login_page(req, next_path, 429, e.message, user,
                                           [("Retry-After", str(e.retry_after or 1))])
        if name is None:
            return self.web_login_page(req, next_path, 401, "Wrong user name or password.",
                                       user)
        self.model.logged_in(name, "browser session")
        return Response(303, b"", [
            ("Location", next_path), ("Cache-Control", "no-store"),
            ("Set-Cookie", self.web_cookie(req, SESSION_COOKIE, accounts.make_session(name),
                                           SESSION_LIFETIME)),
            ("Set-Cookie", self.web_cookie(req, LOGIN_COOKIE, "", 0))])

    def route_logout(self, req):
        """End the browser's session: every session of its user (a new generation), and
        the cookie. Without a valid session only the cookie is cleared."""
        try:
            self.check_same_origin(req)
            form = self.web_form(req)
            session = self.request_session(req)
            if session is not None:
                if not hmac.compare_digest(form.get("csrf", ""), session[1]):
                    raise forbidden("This log-out form is not this server's page: log out "
                                    "from a page of this server.")
                self.model.end_sessions(session[0], session[0])
        except HTTPError as e:
            return self.web_form_refusal(req, e)
        return Response(303, b"", [
            ("Location", self.web_prefix(req) + "/"), ("Cache-Control", "no-store"),
            ("Set-Cookie", self.web_cookie(req, SESSION_COOKIE, "", 0))])

    def session_headers(self, resp):
        """What a session cookie authenticated is for that browser alone: never kept by a
        shared cache, nor by the browser's (a logout or another user must not see it)."""
        names = [n.strip() for k, v in resp.headers if k.lower() == "vary"
                 for n in v.split(",") if n.strip()] + ["Cookie"]
        resp.headers = [(k, v) for k, v in resp.headers
                        if k.lower() not in ("cache-control", "vary")]
        resp.headers += [("Cache-Control", "private, no-store"),
                         ("Vary", ", ".join(sorted(set(names), key=names.index)))]


# -- routes ---------------------------------------------------------------------------


# Path variables: {name} is one segment that does not start with "+" (those are the
# server's own words), {name:rest} one or more segments (a path inside a release's docs).
ROUTE_VARIABLES = {"": r"[^/+][^/]*", "rest": r".+"}
ROUTE_SPECS = [
    # method   path pattern                                        handler (App.route_...)
    ("GET",    "/+api",                                            "api"),
    ("GET",    "/+status",                                         "status"),
    ("GET",    "/+audit",                                          "audit"),
    ("GET",    "/+search",                                         "search"),
    ("GET",    "/+static/{name}",                                  "static"),
    ("GET",    "/+login",                                          "login_page"),
    ("POST",   "/+login",                                          "login"),
    ("POST",   "/+logout",                                         "logout"),
    ("GET",    "/",                                                "list_users"),
    ("GET",    "/{user}/+api",                                     "api"),
    ("POST",   "/{user}/+token-create",                            "token_create"),
    ("GET",    "/{user}/+tokens",                                  "tokens"),
    ("DELETE", "/{user}/+tokens/{token_id}",                       "delete_token"),
    ("GET",    "/{user}",                                          "get_user"),
    ("PUT",    "/{user}",                                          "create_user"),
    ("PATCH",  "/{user}",                                          "modify_user"),
    ("DELETE", "/{user}",                                          "delete_user"),
    ("GET",    "/{user}/{index}/+api",                             "api"),
    ("GET",    "/{user}/{index}/+simple",                          "simple_root"),
    ("GET",    "/{user}/{index}/+simple/{project}",                "simple_project"),
    ("POST",   "/{user}/{index}/+simple/{project}/refresh",        "refresh"),
    ("GET",    "/{user}/{index}/+at/{moment}/+simple",               "at_simple_root"),
    ("GET",    "/{user}/{index}/+at/{moment}/+simple/{project}",     "at_simple_project"),
    ("GET",    "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "get_file"),
    ("HEAD",   "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "get_file"),
    ("DELETE", "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "delete_file"),
    ("POST",   "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "post_toxresult"),
    ("GET",    "/{user}/{index}/+f/{h3}/{h13}/{filename}/+sbom/{name:rest}", "get_sbom"),
    ("GET",    "/{user}/{index}/+e/{key}/{filename}",              "get_ext_file"),
    ("GET",    "/{user}/{index}",                                  "get_index"),
    ("PUT",    "/{user}/{index}",                                  "create_index"),
    ("PATCH",  "/{user}/{index}",                                  "modify_index"),
    ("DELETE", "/{user}/{index}",                                  "delete_index"),
    ("POST",   "/{user}/{index}",                                  "upload_or_push"),
    ("PUSH",   "/{user}/{index}",                                  "push"),
    ("GET",    "/{user}/{index}/{project}",                        "get_project"),
    ("DELETE", "/{user}/{index}/{project}",                        "delete_project"),
    ("PATCH",  "/{user}/{index}/{project}",                        "project_status"),
    ("GET",    "/{user}/{index}/{project}/{version}",              "get_version"),
    ("PATCH",  "/{user}/{index}/{project}/{version}",              "yank_version"),
    ("DELETE", "/{user}/{index}/{project}/{version}",              "delete_version"),
    ("GET",    "/{user}/{index}/{project}/{version}/+doc",         "doc_root"),
    ("GET",    "/{user}/{index}/{project}/{version}/+doc/{path:rest}", "doc"),
]


def parse_time_or_date(text, day_end=True):
    """RFC 3339 with a zone (``2026-06-01T12:00:00Z``) or a date (``2026-06-01``: the end
    of that day, UTC, or its start unless ``day_end``) as epoch seconds; None for anything
    else."""
    if re.match(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$", text):
        start = parse_upload_time(text + "T00:00:00Z")
        if start is None or not day_end:
            return start
        return start + 86400 - 1e-6
    if re.match(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
                r"([Zz]|[+-][0-9]{2}:[0-9]{2})$", text):
        return parse_upload_time(text.upper().replace(" ", "T"))
    return None


def parse_at_time(text):
    """The time machine's TIME: RFC 3339 with a zone or a date (the end of that day, UTC;
    parse_time_or_date); 400 for anything else or a time still in the future (a page of it
    could change)."""
    at = parse_time_or_date(text)
    if at is None:
        raise bad_request("invalid time %r for +at: give RFC 3339 with a zone, like "
                          "2026-06-01T12:00:00Z, or a date like 2026-06-01" % text)
    if at > time.time():
        raise bad_request("+at/%s is in the future: its pages could still change" % text)
    return at


AUDIT_QUERY_KEYS = ("after", "limit", "user", "index", "project", "action", "since", "until")


def audit_time(key, text):
    """``since``/``until`` of an audit log read as epoch seconds: given as such, as RFC 3339
    with a zone (2026-06-01T12:00:00Z) or as a date (since: its start, until: its end, UTC);
    400 for anything else."""
    if re.match(r"^[0-9]{1,12}(\.[0-9]{1,6})?$", text):
        return float(text)
    at = parse_time_or_date(text, day_end=key == "until")
    if at is None:
        raise bad_request("%s=%s is not a time: give epoch seconds, RFC 3339 with a zone like "
                          "2026-06-01T12:00:00Z, or a date like 2026-06-01" % (key, text[:50]))
    return at


def audit_query(get):
    """The filters of a read of the audit log (GET /+audit's query, the audit command's
    options), checked, as Model.audit_ids takes them; 400 for a bad one. ``get(key)``: the
    text given for one of AUDIT_QUERY_KEYS, or None."""
    q = {}
    for key in ("after", "limit"):
        text = get(key)
        if text is not None:
            if not re.match(r"^[0-9]{1,18}$", text):
                raise bad_request("%s must be a whole number, not %r" % (key, text[:50]))
            q[key] = int(text)
    if not 1 <= q.get("limit", AUDIT_PAGE) <= AUDIT_PAGE_MAX:
        raise bad_request("limit must be 1 to %d" % AUDIT_PAGE_MAX)
    user = get("user")
    if user is not None:
        if user not in (AUDIT_ANONYMOUS, AUDIT_COMMAND_LINE):
            check_user_name(user)
        q["user"] = user
    index = get("index")
    if index is not None:
        owner, sep, name = index.strip("/").partition("/")
        if not sep:
            raise bad_request("index must be USER/NAME, not %r" % index[:100])
        check_user_name(owner)
        check_index_name(name)
        q["index"] = owner + "/" + name
    project = get("project")
    if project is not None:
        check_project_name(project)
        q["project"] = normalize_name(project)
    action = get("action")
    if action is not None:
        if action not in AUDIT_ACTIONS:
            raise bad_request("unknown action %r; the actions: %s"
                              % (action[:50], ", ".join(AUDIT_ACTIONS)))
        q["action"] = action
    for key in ("since", "until"):
        text = get(key)
        if text is not None:
            q[key] = audit_time(key, text)
    return q


def compile_routes(specs):
    """[(regex, {method: App method name})]: one regex per pattern, in the order the
    patterns first appear, so a request costs one match per pattern whatever its method.
    A method without a row is answered 405; HEAD goes to GET's handler if it has none."""
    routes = []
    by_pattern = {}
    for method, pattern, name in specs:
        if pattern not in by_pattern:
            parts = re.split(r"\{(\w+)(?::(\w+))?\}", pattern)
            rx = re.escape(parts[0])
            for k in range(1, len(parts), 3):
                kind = parts[k + 1] or ""
                if kind not in ROUTE_VARIABLES:
                    raise ValueError("unknown path variable kind %r in %s" % (kind, pattern))
                rx += "(?P<%s>%s)" % (parts[k], ROUTE_VARIABLES[kind]) + re.escape(parts[k + 2])
            by_pattern[pattern] = {}
            routes.append((re.compile("^" + rx + "$"), by_pattern[pattern]))
        by_pattern[pattern][method] = "route_" + name
    return routes


ROUTES = compile_routes(ROUTE_SPECS)
HEX_RE = re.compile(r"^[0-9a-f]+$")
CONTENT_LENGTH_RE = re.compile(r"^[ \t]*[0-9]{1,18}[ \t]*$")


class App(WebPages):
    """The HTTP surface over a Model: each route handler turns a Request into a Response."""

    def __init__(self, model, outside_url=None, max_body=DEFAULT_MAX_BODY, offline=False,
                 mirror_timeouts=(MIRROR_CONNECT_TIMEOUT, MIRROR_READ_TIMEOUT),
                 mirror_allow_hosts=(), mirror_min_rate=MIRROR_MIN_RATE):
        self.model = model
        self.store = model.store
        self.mirror = Mirror(model, offline=offline, connect_timeout=mirror_timeouts[0],
                             read_timeout=mirror_timeouts[1], max_file=max_body,
                             allow_hosts=mirror_allow_hosts, min_rate=mirror_min_rate)
        self.outside_url = outside_url.rstrip("/") if outside_url else None
        self.max_body = max_body
        self.pages = PageCache()
        self.listing_files = ListingFiles(self.store.tmp_dir)
        model.on_change(self.pages.changed)
        model.store.listen(model.remote_changed)  # (the commits of other processes, if any)
        self._doc_cache = {}  # sha256 of a doc zip: its members (App._doc_members)
        self._doc_cache_lock = threading.Lock()
        self._doc_slots = threading.BoundedSemaphore(DOC_INFLATE_SLOTS)
        self.started = time.time()

    # -- dispatch ---------------------------------------------------------------------

    def dispatch(self, req):
        # who acts from where, for the audit records of what this request changes
        self.model.context.begin(req.handler.client_address[0],
                                 req.headers.get("X-Forwarded-For"))
        if req.headers.get(VIA_HEADER) == self.store.uuid:
            raise HTTPError(400, "request loop: a mirror of this server fetches from itself",
                            {VIA_HEADER: self.store.uuid})
        path = req.path
        trailing = len(path) > 1 and path.endswith("/")
        match_path = path[:-1] if trailing else path
        allowed = set()
        for rx, handlers in ROUTES:
            m = rx.match(match_path)
            if m is None:
                continue
            name = handlers.get(req.method)
            if name is None and req.method == "HEAD":
                name = handlers.get("GET")
            if name is None:
                allowed.update(handlers)
                continue
            req.trailing = trailing
            req.route = name
            args = m.groupdict()
            if "index" in args and name != "route_api":
                self.check_index_read(req, args["user"], args["index"])
            self.check_token_scope(req, name, args)
            resp = getattr(self, name)(req, **args)
            if req.restricted:
                self._mark_private(resp)
            return resp
        if allowed:
            raise HTTPError(405, "method %s not allowed here" % req.method,
                            {"Allow": ", ".join(sorted(allowed))})
        raise not_found("The resource could not be found: %s" % path)

    def check_index_read(self, req, user, index):
        """Before any route below /USER/INDEX: a reader who may not read the index gets the
        same refusal for every path and method below it, whatever exists there (on a
        --restrict-reads server an anonymous one also for an index that does not exist)."""
        m = self.model
        path = user + "/" + index
        ix = m.get_index(path)
        reader = lambda: req.actor  # noqa: E731 (authenticates only when the rule asks)
        try:
            if ix is None:
                if m.restrict_reads and reader() is None:
                    raise m.read_refusal(None, path)
                return
            m.check_read(reader, ix)
        except HTTPError as e:
            if e.status == 401 and wants_json(req.accept):
                # devpi-client's JSON requests: its "you might have to login first" is for 403
                raise forbidden(e.message)
            raise
        req.restricted = not m.is_public(ix)

    # What each route does, in devpi's permission names, for the caveats of scoped tokens:
    # every route is named here, and one that is not is refused to a scoped token (a new
    # route is closed to tokens until it is given its action). None: the route changes
    # nothing a caveat limits (login, the API's description, the stylesheet), or the Model
    # checks the request's object itself (upload and push, whose body names the project).
    # Where a change's object is known only to the Model (the project of a file URL, the
    # name an upload is filed under, the bases of an index), the Model checks it again
    # on that object (check_scope).
    TOKEN_ACTIONS = {
        "route_api": None, "route_status": None, "route_static": None, "route_login": None,
        "route_audit": "audit_read",
        # (a browser's log-in page; logging out changes the user's sessions: no token does)
        "route_login_page": None, "route_logout": "user_modify",
        "route_search": "pkg_read", "route_list_users": "pkg_read",
        "route_get_user": "pkg_read",
        "route_create_user": "user_create", "route_modify_user": "user_modify",
        "route_delete_user": "user_delete", "route_token_create": "user_modify",
        "route_tokens": "user_modify", "route_delete_token": "user_modify",
        "route_get_index": "pkg_read", "route_create_index": "index_create",
        "route_modify_index": "index_modify", "route_delete_index": "index_delete",
        "route_simple_root": "pkg_read", "route_simple_project": "pkg_read",
        "route_at_simple_root": "pkg_read", "route_at_simple_project": "pkg_read",
        # (refresh only makes a mirror ask upstream again: a reader's right, as in devpi)
        "route_refresh": "pkg_read",
        "route_get_file": "pkg_read", "route_get_ext_file": "pkg_read",
        "route_get_sbom": "pkg_read",
        "route_delete_file": "del_entry", "route_post_toxresult": "toxresult_upload",
        "route_upload_or_push": None, "route_push": None,
        "route_get_project": "pkg_read", "route_delete_project": "del_project",
        "route_project_status": "index_modify",
        "route_get_version": "pkg_read", "route_yank_version": "del_verdata",
        "route_delete_version": "del_verdata",
        "route_doc_root": "pkg_read", "route_doc": "pkg_read",
    }

    def check_token_scope(self, req, name, args):
        """A request made with a scoped token does only what its caveats allow: the
        action, on the index of its URL (and the project, where the URL names one); no
        user changes, and no lists of users when it is limited to some indexes. A route
        TOKEN_ACTIONS does not name is refused."""
        if not (req.headers.get("Authorization") or req.headers.get("X-Devpi-Auth")):
            return
        scope = getattr(req.actor, "scope", None)
        if scope is None:
            return
        if name not in self.TOKEN_ACTIONS:
            raise forbidden("a scoped token can't be used for %s %s" % (req.method, req.path))
        action = self.TOKEN_ACTIONS[name]
        if action is None:
            return
        index = args["user"] + "/" + args["index"] if "index" in args else None
        why = scope.refusal(action, index, args.get("project"))
        if why is None and index is None and scope.indexes is not None and name in (
                "route_list_users", "route_get_user"):
            why = "the token is limited to indexes %s" % ", ".join(sorted(scope.indexes))
        if why:
            raise forbidden(why)

    @staticmethod
    def token_allows(req, action, index, project=None):
        check_scope(req.actor, action, index, project)

    @staticmethod
    def _mark_private(resp):
        """What an index not everyone reads answers is for the asker alone: no shared cache
        (nginx in front) may keep it, and a browser's own cache keeps it per credentials."""
        cc = " ".join(v for k, v in resp.headers if k.lower() == "cache-control")
        vary = [v for k, v in resp.headers if k.lower() == "vary"]
        headers = [(k, v) for k, v in resp.headers if k.lower() not in ("cache-control", "vary")]
        headers.append(("Cache-Control", "private, max-age=31536000, immutable" if "immutable"
                        in cc else "private, max-age=1" if cc else "private, no-cache"))
        names = [n.strip() for v in vary + ["Authorization, X-Devpi-Auth, Cookie"]
                 for n in v.split(",") if n.strip()]
        headers.append(("Vary", ", ".join(sorted(set(names), key=names.index))))
        resp.headers = headers

    # What a browser's session cookie authenticates (App.web_login): reads, GET and HEAD,
    # of these routes alone, pages only where the browser asks for HTML; never a write,
    # the JSON API or a token route, so a forged cross-site request has nothing to use it
    # for (and SameSite=Strict keeps it from being sent along anyway).
    SESSION_READS = {
        "route_list_users": "page", "route_get_user": "page", "route_get_index": "page",
        "route_get_project": "page", "route_get_version": "page", "route_search": "page",
        "route_status": "page", "route_login_page": "page", "route_simple_root": "page",
        "route_simple_project": "page", "route_at_simple_root": "page",
        "route_at_simple_project": "page",
        # what the pages link to: files, and documentation with its images and stylesheets
        "route_get_file": "any", "route_get_ext_file": "any", "route_doc_root": "any",
        "route_doc": "any",
    }

    def session_cookie_name(self, req, base=SESSION_COOKIE):
        # over https the name has the __Host- prefix: the browser then keeps it only if it
        # is Secure, for Path=/ and this host alone (no other site can set it)
        return ("__Host-" + base) if req.is_https() else base

    def request_session(self, req):
        """(user, logout token) of the request's valid session cookie, or None."""
        for value in req.cookie_values(self.session_cookie_name(req))[:4]:
            found = self.model.accounts.check_session(value)
            if found is not None:
                return found
        return None

    def authenticate_request(self, req):
        h = req.headers
        if not (h.get("X-Devpi-Auth") or h.get("Authorization")):
            kind = self.SESSION_READS.get(req.route)
            if kind is None or req.method not in ("GET", "HEAD") or (
                    kind == "page" and not wants_html(req)):
                return None
            req.session = self.request_session(req)
            if req.session:
                self.model.context.auth = "session"
            return req.session[0] if req.session else None
        creds = []
        xauth = h.get("X-Devpi-Auth")
        if xauth:
            creds.append(xauth)
        auth = h.get("Authorization") or ""
        if auth[:6].lower() == "basic ":
            creds.append(auth[6:].strip())
        elif auth[:7].lower() == "bearer ":
            actor = self.model.accounts.check_scoped_token(None, auth[7:].strip())
            if actor is not None:
                return actor  # (a bad one counts for nothing: X-Devpi-Auth may still do)
        for cred in creds:
            try:
                user, sep, secret = base64.b64decode(cred, validate=True).decode(
                    "utf-8").partition(":")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                continue
            if sep and user and len(user) <= 100 and len(secret) <= 8192 and not \
                    secret.startswith("mdp1.") and (user == "__token__" or len(secret) > 60):
                actor = self.model.accounts.check_scoped_token(user, secret)
                if actor is not None:
                    return actor
                if user == "__token__":
                    continue
            if sep and user and len(user) <= 100 and len(secret) <= 4096:
                try:
                    name = self.model.accounts.authenticate(user, secret,
                                                            req.handler.client_address[0])
                except HTTPError as e:
                    if e.status != 429 or req.method not in ("GET", "HEAD"):
                        raise
                    continue  # a read goes on anonymously, as with a wrong password
                if name:  # (how, for the audit log: a login token is "mdp1.", see make_token)
                    self.model.context.auth = "login-token" if secret.startswith("mdp1.") \
                        else "password"
                    return name
        return None

    # -- server-wide ------------------------------------------------------------------

    def route_api(self, req, user=None, index=None):
        actor = req.actor
        result = {
            "login": req.absolute("+login"),
            "authstatus": ["ok", actor, []] if actor else ["noauth", "", []],
            "features": ["push-no-docs", "push-only-docs", "push-register-project",
                         "server-keyvalue-parsing"],
        }
        m = self.model
        hidden = m.restrict_reads and actor is None  # (devpi use needs an answer)
        if user is not None and index is None and not hidden and not m.user_exists(user):
            raise not_found("no user %r" % user)
        if index is not None:
            path = user + "/" + index
            ix = m.get_index(path)
            if ix is None and not hidden:
                raise not_found("The stage %s could not be found." % path)
            if ix is not None and not m.may_read(actor, ix):
                ix = None  # its URLs only, the answer for an index that does not exist
            result["index"] = req.absolute(path)
            result["simpleindex"] = req.absolute(path + "/+simple/")
            if ix is None or not ix.is_mirror:
                result["pypisubmit"] = req.absolute(path + "/")
        return api_result("apiconfig", result)

    def route_audit(self, req):
        """The audit log as JSON lines, newest last, a page at a time (a Link header with
        rel="next" while more follow): root's alone, and a token of root's only if its
        "allowed" names audit_read."""
        actor = req.actor
        if actor != "root":
            raise forbidden("only root reads the audit log")
        scope = getattr(actor, "scope", None)
        if scope is not None and (scope.allowed is None or "audit_read" not in scope.allowed):
            raise forbidden("a token reads the audit log only if it allows audit_read")
        unknown = sorted(k for k in req.query if k not in AUDIT_QUERY_KEYS)
        if unknown:
            raise bad_request("unknown parameter %s; the known: %s"
                              % (unknown[0][:50], ", ".join(AUDIT_QUERY_KEYS)))
        for key, values in req.query.items():
            if len(values) > 1:
                raise bad_request("give %s once" % key)
        query = audit_query(lambda key: req.query[key][0] if key in req.query else None)
        ids, more = self.model.audit_ids(**query)
        headers = [("Content-Type", AUDIT_TYPE), ("Cache-Control", "no-store")]
        if more:
            follow = [(k, v[0]) for k, v in req.query.items() if k != "after"]
            headers.append(("Link", '<%s>; rel="next"' % req.absolute(
                "+audit?" + urllib.parse.urlencode(follow + [("after", ids[-1])]))))
        resp = Response(200, b"", headers)
        resp.stream = self.model.audit_lines(ids)
        resp.file_size = None  # (sent chunked: its length is known once sent)
        return resp

    def route_status(self, req):
        if wants_html(req):
            return self.web_status(req)
        # (devpi --version asks anonymously: the versions are for anyone)
        result = {"versioninfo": {"devpi-server": DEVPI_SERVER_VERSION,
                                  "minidevpi": __version__}}
        reader = lambda: req.actor  # noqa: E731
        if self.model.may_see_state(reader):
            result.update({
                "serial": self.store.serial, "uuid": self.store.uuid,
                "outside-url": self.outside_url,
                "host": req.handler.server.server_address[0],
                "port": req.handler.server.server_address[1],
                "server-rules": self.model.server_policy().given})
        if self.model.may_see_serverdir(reader):
            result["serverdir"] = self.store.serverdir
        return api_result("status", result)

    def route_login(self, req):
        # never authenticated first (a stale token would count as a wrong password)
        if req.headers.get("Content-Type", "").split(";")[0].strip().lower() == FORM_TYPE:
            return self.web_login(req)  # a browser's log-in form
        body = req.json_body(JSON_MAX_BODY_ANONYMOUS)
        if not isinstance(body, dict) or not isinstance(body.get("user"), str) \
                or not isinstance(body.get("password"), str):
            raise bad_request("Bad request: no user/password specified")
        result = self.model.accounts.login(body["user"], body["password"],
                                  req.handler.client_address[0])
        self.model.logged_in(body["user"], "login token")
        return api_result("proxyauth", result, message="login successful")

    def route_list_users(self, req):
        if wants_html(req):
            return self.web_root(req)
        return api_result("list:userconfig", self.model.list_users(actor=req.actor))

    # -- users --------------------------------------------------------------------------

    def route_get_user(self, req, user):
        if wants_html(req):
            return self.web_user(req, user)
        return api_result("userconfig", self.model.user_info(user, actor=req.actor))

    def route_create_user(self, req, user):
        self.model.check_user_create(req.actor)  # (before its body is read)
        body = req.json_body()
        info = self.model.create_user(req.actor, user, body if body is not None else {})
        return api_result("userconfig", info, status=201)

    def route_modify_user(self, req, user):
        body = req.json_body()
        token = self.model.modify_user(req.actor, user, body if body is not None else {})
        if token:
            return api_result("userpassword", {"password": token,
                                               "expiration": TOKEN_LIFETIME},
                              message="user updated, new proxy auth")
        return message_response("user updated")

    def route_delete_user(self, req, user):
        self.model.delete_user(req.actor, user)
        return message_response("user %r deleted" % user)

    # -- scoped tokens (devpi-tokens' routes) -------------------------------------------

    def _token_owner(self, req, user):
        """The user whose tokens these are: asked by that user or root, with a password or
        login token (a scoped token was refused before: check_token_scope)."""
        m = self.model
        if req.actor is None:
            raise unauthorized()
        if not m.user_exists(user):
            raise not_found("no user %r" % user)
        if not m.can_modify_user(req.actor, user):
            raise forbidden("no permission to manage the tokens of user %r" % user)
        return user

    def route_token_create(self, req, user):
        self._token_owner(req, user)
        restrictions = token_restrictions(req.json_body(), unlimited=req.actor == "root")
        token = self.model.create_scoped_token(req.actor, user, restrictions)
        return api_result("token-info", {"token": token})

    def route_tokens(self, req, user):
        self._token_owner(req, user)
        return api_result("tokens-info", {"tokens": self.model.accounts.list_scoped_tokens(user)})

    def route_delete_token(self, req, user, token_id):
        self._token_owner(req, user)
        self.model.delete_scoped_token(req.actor, user, token_id)
        return message_response("token %s of user %s deleted (and every token derived from it)"
                                % (token_id, user))

    # -- indexes ------------------------------------------------------------------------

    def route_get_index(self, req, user, index):
        path = user + "/" + index
        m = self.model
        if wants_html(req):
            return self.web_index(req, m.require_index(path))
        if not wants_json(req.accept) and (req.is_installer or wants_simple(req.accept)):
            return self.simple_root(req, m.require_index(path))
        ix = m.require_index(path)
        result = m.shown_config(ix.config, req.actor)
        if "no_projects" in req.query:
            return api_result("indexconfig", result)
        # devpi-client's "devpi list": kept (or streamed) as a project list is, laid out as
        # json_response lays out the rest, the names (plain text) as json.dumps(indent=2)
        # would write them, a hundred times faster; the config before them is small
        mark = "projects-%s" % secrets.token_hex(8)  # (no config value can hold it)
        result["projects"] = mark
        head, _, tail = json_response({"type": "indexconfig", "result": result}).body.decode(
        ).partition('"%s"' % mark)
        key = ("indexconfig", ix.path, req.actor == "root")  # (shown_config: root's or not)
        validator = self.pages.root_validator([ix])

        def chunks():
            yield head.encode()
            sep, batch = "[\n      ", []
            for norm in m.project_listing(ix, req.actor, ignore_bases=True):
                batch.append(json.encoder.encode_basestring_ascii(norm))  # (as dumps)
                if len(batch) >= LISTING_BATCH:
                    yield (sep + ",\n      ".join(batch)).encode()
                    sep, batch = ",\n      ", []
            if batch:
                yield (sep + ",\n      ".join(batch)).encode()
                sep = ","
            yield (("[]" if sep.startswith("[") else "\n    ]") + tail).encode()
        # (private: root's answer shows a mirror_url's credentials)
        return self.listing_response(req, key, validator, JSON_TYPE, chunks, shared=False)

    def route_create_index(self, req, user, index):
        path = user + "/" + index
        m = self.model
        body = req.json_body()
        if isinstance(body, dict):
            self._refuse_own_url(req, body.get("mirror_url"))
        config = m.create_index(req.actor, path, body if body is not None else {})
        return api_result("indexconfig", m.shown_config(config, req.actor))

    def route_modify_index(self, req, user, index):
        path = user + "/" + index
        m = self.model
        body = req.json_body()
        ix = m.require_index(path)
        self._refuse_own_url(req, apply_index_patch(ix.config, body if body is not None
                                                    else []).get("mirror_url"))
        config = m.modify_index(req.actor, path, body if body is not None else [])
        return api_result("indexconfig", m.shown_config(config, req.actor))

    def route_delete_index(self, req, user, index):
        path = user + "/" + index
        self.model.delete_index(req.actor, path)
        return message_response("index %s deleted" % path, status=201)

    def route_upload_or_push(self, req, user, index):
        # an upload form (twine, setup.py upload), or a push as JSON (devpi-client)
        ix = self.model.require_index(user + "/" + index)
        ctype = (req.headers.get("Content-Type") or "").lower()
        if ctype.startswith("application/json"):
            return self.push(req, ix)
        return self.upload(req, ix)

    def route_push(self, req, user, index):
        return self.push(req, self.model.require_index(user + "/" + index))

    def _refuse_own_url(self, req, url):
        """A mirror_url naming this very server (as the request reached it, its
        --outside-url, or its own address) is refused when it is set: it could only ever
        answer 'request loop'. (Through a proxy it may look like another host: then each
        request finds out, see Upstream.open.)"""
        if not isinstance(url, str):
            return
        try:
            u = urllib.parse.urlsplit(url)
            port = u.port or {"http": 80, "https": 443}.get(u.scheme)
            target = ((u.hostname or "").lower(), port)
        except ValueError:
            return  # (the model says what is wrong with it)
        own = set()
        host, our_port = req.handler.server.server_address[:2]
        for name in ("localhost", "127.0.0.1", "::1", host.lower()):
            own.add((name, our_port))
        for origin in (req.outside_url(), "http://" + (req.headers.get("Host") or "")):
            try:
                o = urllib.parse.urlsplit(origin)
                own.add(((o.hostname or "").lower(),
                         o.port or {"http": 80, "https": 443}.get(o.scheme)))
            except ValueError:
                pass
        if target in own:
            raise bad_request("mirror_url %s points at this server itself; a mirror must "
                              "fetch from another index" % _safe_url(url))

    def push(self, req, ix):
        body = req.json_body()
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
                or not isinstance(body.get("version"), str):
            raise bad_request("push needs 'name' and 'version'")
        target_path = body.get("targetindex")
        if not isinstance(target_path, str):
            if "posturl" in body:
                raise bad_request("pushing to an external repository is not supported; "
                                  "upload there with twine")
            raise bad_request("push needs 'targetindex'")
        target = self.model.require_index(target_path.strip("/"))
        log_rows = self.model.push(req.actor, ix, body["name"], body["version"], target,
                                   no_docs=bool(body.get("no_docs")),
                                   only_docs=bool(body.get("only_docs")))
        return api_result("actionlog", log_rows)

    # -- projects and versions (JSON API, and the installer shortcut) -------------------

    def _norm_or_redirect(self, req, project):
        """The normalised name, or (for a name that is not) a redirect to it. Only reads
        call this: a change is made under the name it was asked for."""
        norm = normalize_name(project)
        if norm != project:
            path = req.path.rsplit("/" + project, 1)
            raise HTTPError(302, "moved to the normalised project name", {
                "Location": req.absolute(path[0] + "/" + norm + path[1]
                                         if len(path) == 2 else norm)})
        return norm

    def route_delete_project(self, req, user, index, project):
        m = self.model
        ix = m.require_index(user + "/" + index)
        m.delete_project(req.actor, ix, project, force="force" in req.query)
        return message_response("project %s deleted from stage %s"
                                % (normalize_name(project), ix.path))

    def route_get_project(self, req, user, index, project):
        m = self.model
        ix = m.require_index(user + "/" + index)
        norm = self._norm_or_redirect(req, project)
        if wants_html(req):
            return self.web_project(req, ix, norm)
        if not wants_json(req.accept) and (req.is_installer or wants_simple(req.accept)):
            return self.simple_project_page(req, ix, norm)
        notes = []
        result = self.project_config(req, ix, norm, ignore_bases="ignore_bases" in req.query,
                                     notes=notes)
        return api_result("projectconfig", result, message=" ".join(notes) or None)

    def route_project_status(self, req, user, index, project):
        """PEP 792: root sets a private project's status ({"status": ..., "reason": ...};
        "active" clears it)."""
        ix = self.model.require_index(user + "/" + index)
        body = req.json_body()
        if not isinstance(body, dict) or set(body) - {"status", "reason"} or \
                "status" not in body:
            raise bad_request('PATCH of a project takes {"status": "active"|"archived"|'
                              '"quarantined"|"deprecated", "reason": "..."}')
        status = self.model.set_project_status(req.actor, ix, project, body["status"],
                                               body.get("reason"))
        return api_result("projectstatus", status)

    def _links(self, req, files):
        links = []
        release_sha = None
        for f in files:
            if f.for_filename:  # a toxresult: below its release file's hash, as in devpi
                if release_sha is None:
                    release_sha = {g.filename: g.sha256 for g in files if not g.for_filename}
                rsha = release_sha.get(f.for_filename, f.sha256)
                href = req.absolute(file_relpath(f.index, rsha, f.filename))
            else:
                href = req.absolute(f.relpath)
            link = {"rel": f.rel, "href": href,
                    "hash_spec": "sha256=" + f.sha256 if f.sha256 else "",
                    "hashes": {"sha256": f.sha256} if f.sha256 else {},
                    "log": json.loads(f.log)}
            if f.for_filename:
                link["for_href"] = req.absolute(file_relpath(f.index, rsha, f.for_filename))
            sboms = self.model.sboms(f)
            if sboms:  # PEP 770
                link["sboms"] = [{"name": name, "size": entry[5],
                                  "href": req.absolute(f.sbom_relpath(name))}
                                 for name, entry in sorted(sboms.items())]
            links.append(link)
        return links

    def _version_json(self, req, meta, yanked, files):
        data = dict(meta)
        if yanked is not None:
            data["yanked"] = yanked or True
        data["+links"] = self._links(req, files)
        return data

    def mirror_version_data(self, ix, walk):
        """{version: (metadata, yanked, [File])} of the walk's project on the mirror ``ix``,
        as devpi lists it. When another index asks, a failing upstream counts as no
        project."""
        norm = walk.project
        try:
            files = self.mirror.files(ix, norm)
        except UpstreamError as e:
            if walk.index is ix:
                raise
            log("WARNING: %s: %s" % (walk.index.path, e.message))
            return None
        if files is None:
            return None
        display = self.mirror.page(ix, norm)
        display = display[0] if display else (walk.display_at(ix) or norm)
        out = {}
        for f in files:
            if f.version not in out:
                meta = full_metadata(display, f.version, {"requires_python": f.requires_python})
                out[f.version] = (meta, f.yanked, [])
            out[f.version][2].append(f)
        return out

    def _shadowing_json(self, req, releases):
        """The first of a version's releases (Model.releases) as JSON, with the ones it
        shadows under devpi's ``+shadowing``."""
        data = self._version_json(req, *releases[0])
        if len(releases) > 1:
            data["+shadowing"] = [self._version_json(req, *r) for r in releases[1:]]
        return data

    def project_config(self, req, ix, norm, ignore_bases=False, notes=None):
        """``notes``, a list, gets what the reader should be told: the versions held back
        by a mirror's mirror_min_age and until when, the project's PEP 792 status."""
        walk = self.model.walk(ix, norm, lambda: req.actor, ignore_bases)
        releases = self.model.releases(walk, lambda b: self.mirror_version_data(b, walk))
        if releases is None:
            raise not_found("no project %r" % norm)
        if notes is not None:
            held = walk.held_back(releases)
            if held:
                notes.append("held back by mirror_min_age (a cooling-off period for new "
                             "upstream releases): %s." % ", ".join(
                                 "%s until %s" % (v, utcnow_iso(held[v]))
                                 for v in sorted(held, key=version_key)))
            blocked = walk.blocked(releases)
            if blocked:
                notes.append("not offered: %s." % "; ".join(
                    blocked[v] for v in sorted(blocked, key=version_key)))
            status = walk.status
            if status is not None:
                notes.append("project status: %s%s." % (status[0], ": " + status[1]
                                                        if status[1] else ""))
        return {ver: self._shadowing_json(req, found) for ver, found in releases.items()}

    def route_delete_version(self, req, user, index, project, version):
        m = self.model
        ix = m.require_index(user + "/" + index)
        m.delete_version(req.actor, ix, project, version, force="force" in req.query)
        return message_response("project %s version %r deleted"
                                % (normalize_name(project), version))

    def route_yank_version(self, req, user, index, project, version):
        m = self.model
        ix = m.require_index(user + "/" + index)
        body = req.json_body()
        if not isinstance(body, dict) or "yanked" not in body or len(body) != 1:
            raise bad_request("PATCH of a version takes {\"yanked\": true|false|\"reason\"}")
        m.set_yanked(req.actor, ix, project, version, body["yanked"])
        meta, yanked, files = m.version_data(ix, normalize_name(project), version)[version]
        return api_result("versiondata", self._version_json(req, meta, yanked, files))

    def route_get_version(self, req, user, index, project, version):
        m = self.model
        ix = m.require_index(user + "/" + index)
        norm = self._norm_or_redirect(req, project)
        if wants_html(req):
            return self.web_version(req, ix, norm, version)
        walk = m.walk(ix, norm, lambda: req.actor)
        found = (m.releases(walk, lambda b: self.mirror_version_data(b, walk), version)
                 or {}).get(version)
        if not found:
            held = walk.held_back(())
            if version in held:
                raise not_found(held_back_message("version %s of project %s"
                                                  % (version, norm), held[version]))
            if version in walk.refused:
                raise forbidden(walk.refused[version])
            raise not_found("The version %s of project %s does not exist." % (version, norm))
        return api_result("versiondata", self._shadowing_json(req, found))

    # -- upload -------------------------------------------------------------------------

    def upload(self, req, ix):
        req.is_upload = True  # errors go into the reason phrase, where upload clients look
        m = self.model
        self.token_allows(req, "upload", ix.path)
        m.check_upload(req.actor, ix)
        ctype = req.headers.get("Content-Type") or ""
        main, params = parse_header_params(ctype)
        if main != "multipart/form-data":
            raise bad_request("upload needs a multipart/form-data body")
        reader = req.body.open(self.max_body, "upload")
        try:
            parts = parse_multipart(reader, params.get("boundary"), None, self.store.tmp_dir)
        except OSError as e:
            raise self._disk_error(e)
        try:
            return self._handle_upload_form(req, ix, parts)
        finally:
            for p in parts:
                if p.path and os.path.exists(p.path):
                    _unlink_quiet(p.path)

    @staticmethod
    def _disk_error(e):
        import errno
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return HTTPError(507, "not enough disk space to store the upload")
        raise e

    def _handle_upload_form(self, req, ix, parts):
        m = self.model
        fields = [(p.name, p.value) for p in parts if p.filename is None]
        first = {}
        for k, v in fields:
            first.setdefault(k, v)
        action = first.get(":action")
        if action is None:
            raise bad_request(":action field not found")
        if action not in ("file_upload", "doc_upload", "submit"):
            raise bad_request("action %r not supported" % action)
        name = (first.get("name") or "").strip()
        version = (first.get("version") or "").strip()
        meta = metadata_from_form(fields)
        if action == "submit":
            if not name or not version:
                raise bad_request("name and version need to be set")
            m.register(req.actor, ix, name, version, meta)
            return Response(200, b"", [("Content-Type", HTML_TYPE)])
        content = [p for p in parts if p.name == "content" and p.filename is not None]
        if not content:
            raise bad_request("content file field not found")
        part = content[0]
        filename = part.filename
        check_filename(filename)
        self._check_digests(first, part)
        if action == "doc_upload":
            return self._doc_upload(req, ix, name, version, part)
        try:
            reason, _relpath = m.upload_file(req.actor, ix, filename, part.path, part.sha256,
                                             part.size, fields)
        except OSError as e:
            raise self._disk_error(e)
        return Response(200, b"", [("Content-Type", HTML_TYPE)], reason=reason)

    def _check_digests(self, fields, part):
        want = (fields.get("sha256_digest") or "").strip().lower()
        if want and want != part.sha256:
            raise bad_request("sha256_digest %s does not match the uploaded file (%s)"
                              % (want[:80], part.sha256))
        others = [(k, fields.get(k, "").strip().lower()) for k in ("blake2_256_digest",
                                                                      "md5_digest")]
        others = [(k, v) for k, v in others if v]
        if not others:
            return
        hashers = {}
        for k, _ in others:
            if k == "md5_digest":
                try:
                    hashers[k] = hashlib.new("md5", usedforsecurity=False)
                except (TypeError, ValueError):
                    continue
            else:
                hashers[k] = hashlib.blake2b(digest_size=32)
        with open(part.path, "rb") as f:
            copy_hashed(f, None, *hashers.values())
        for k, v in others:
            if k in hashers and hashers[k].hexdigest() != v:
                raise bad_request("%s does not match the uploaded file" % k)

    def _doc_upload(self, req, ix, name, version, part):
        reason = self.model.upload_doczip(req.actor, ix, name, version, part.path, part.sha256,
                                          part.size)
        return Response(200, b"", [("Content-Type", HTML_TYPE)], reason=reason)

    # -- documentation ----------------------------------------------------------------

    # A doc page is HTML anyone with upload rights wrote, served from the index's origin:
    # it runs sandboxed (an opaque origin, no scripts, no forms, no plugins), so it can't
    # read what the origin keeps, post to the API as the reader, or be sniffed into HTML.
    DOC_HEADERS = (("Content-Security-Policy",
                    "sandbox; script-src 'none'; object-src 'none'; form-action 'none'"),
                   ("X-Content-Type-Options", "nosniff"))

    def _doc_file(self, req, user, index, project, version):
        """The doc zip (a File) of a release, seen from the index through its bases;
        ``latest`` and ``stable`` (latest not pre-release) pick the newest version with
        docs, as devpi-web does."""
        m = self.model
        ix = m.require_index(user + "/" + index)
        norm = normalize_name(project)
        walk = m.walk(ix, norm, lambda: req.actor)
        named = version not in ("latest", "stable")
        docs = {}
        for ver, found in (m.releases(walk, lambda b: None, version if named else None)
                           or {}).items():
            for _meta, _yanked, files in found:
                doc = next((f for f in files if f.rel == "doczip"), None)
                if doc is not None:
                    docs[ver] = doc
                    break
        if not named:
            if version == "stable":
                docs = {v: f for v, f in docs.items() if not is_prerelease(v)}
            version = max(docs, key=version_key) if docs else version
        if version not in docs:
            raise not_found("no documentation for %s %s" % (norm, version))
        return docs[version]

    def _doc_members(self, sha256, blob):
        """{name: zip entry} of a stored doc zip; the last few are kept (by content), at
        most DOC_CACHE_MEMBERS entries in all."""
        cache = self._doc_cache
        members = cache.get(sha256)
        if members is None:
            with open(blob, "rb") as f:
                members = doc_zip_members(f)
            with self._doc_cache_lock:
                while cache and (len(cache) >= 16 or sum(map(len, cache.values()))
                                 + len(members) > DOC_CACHE_MEMBERS):
                    cache.pop(next(iter(cache)), None)
                cache[sha256] = members
        return members

    def _doc_pieces(self, blob, entry):
        """A doc member's bytes as they are inflated, DOC_PIECE bytes at a time, each piece
        inflated holding one of DOC_INFLATE_SLOTS (none is held while a piece is sent):
        503 when no slot frees within DOC_SLOT_WAIT seconds. A member found broken on
        the way raises HTTPError (the connection is then cut: the client sees a short
        answer, never a complete bad one)."""
        with open(blob, "rb") as fh:
            pieces = zip_member_chunks(fh, entry, MAX_DOC_MEMBER_BYTES, DOC_PIECE)
            while True:
                if not self._doc_slots.acquire(timeout=DOC_SLOT_WAIT):
                    raise HTTPError(503, "too many documentation pages are being unpacked; "
                                    "try again shortly", retry_after=2)
                try:
                    piece = next(pieces, None)
                except (OSError, ValueError, zipfile.BadZipFile) as e:
                    raise HTTPError(404, "the documentation can't be read: %s" % e)
                finally:
                    self._doc_slots.release()
                if piece is None:
                    return
                yield piece

    def _doc_slash_redirect(self, req):
        """To the path with a slash: a directory's index.html, whose relative links work."""
        location = req.absolute(urllib.parse.quote(req.path, safe="/+:@!$&'()*,;=~") + "/")
        return Response(302, b"", [("Location", location)] + list(self.DOC_HEADERS))

    def route_doc_root(self, req, user, index, project, version):
        if not req.trailing:
            self._doc_file(req, user, index, project, version)  # (a 404 before a redirect)
            return self._doc_slash_redirect(req)
        return self.route_doc(req, user, index, project, version, "")

    def route_doc(self, req, user, index, project, version, path):
        f = self._doc_file(req, user, index, project, version)
        blob = self.store.blob_path(f.sha256)
        try:
            members = self._doc_members(f.sha256, blob)
            name = path + "/index.html" if req.trailing and path else path or "index.html"
            entry = members.get(name)
            if entry is None and not req.trailing and path + "/index.html" in members:
                return self._doc_slash_redirect(req)
            if entry is None:
                raise not_found("no such page in the documentation: %s" % name[:200])
            ctype, encoding = mimetypes.guess_type(name)
            if encoding or not ctype:
                ctype = "application/octet-stream"
            return self._member_response(blob, entry, ctype)
        except HTTPError as e:
            if e.status != 404:
                raise
            raise not_found("the documentation of %s %s can't be read" % (f.project, f.version))
        except (OSError, ValueError, zipfile.BadZipFile):
            raise not_found("the documentation of %s %s can't be read" % (f.project, f.version))

    def _member_response(self, blob, entry, ctype):
        """A member of the stored zip ``blob`` (an entry of zip_entries) as an answer with
        DOC_HEADERS (sandboxed, never sniffed): a small one checked to its end and sent as
        bytes, a large one sent as it is inflated (_doc_pieces). A broken member raises
        OSError, ValueError or zipfile.BadZipFile here, or cuts the answer short later."""
        size = entry[5]
        pieces = self._doc_pieces(blob, entry)
        first = next(pieces, b"")  # (a busy server's 503, a broken member's error here)
        if len(first) >= size:  # the whole member: checked to its end, sent as bytes
            if next(pieces, None) is not None:
                raise zipfile.BadZipFile("larger than its stated size")
            pieces = None
        resp = Response(200, first, [("Content-Type", ctype)] + list(self.DOC_HEADERS))
        if pieces is not None:  # a large member: sent as it is inflated
            def stream():
                try:
                    yield first
                    for piece in pieces:
                        yield piece
                finally:
                    pieces.close()
            resp.stream, resp.file_size = stream(), size
        return resp

    def route_get_sbom(self, req, user, index, h3, h13, filename, name):
        """PEP 770: one SBOM file of a kept wheel (Model.sboms), under the file's URL, with
        the same guards as the file itself."""
        ix = self._file_index(user, index, h3, h13)
        if ix.is_mirror:
            self._token_reads_mirror_file(req, ix, filename)
        f = self.model.find_file(ix, filename, h3 + h13)
        self.token_allows(req, "pkg_read", ix.path, f.project)
        self._refuse_unoffered(ix, f)
        entry = self.model.sboms(f).get(name)
        if entry is None:
            raise not_found("%s has no SBOM %s" % (filename, name[:SBOM_NAME_MAX]))
        if entry[5] > SBOM_MAX_BYTES:
            raise not_found("the SBOM %s of %s is larger than %d bytes: not served"
                            % (name, filename, SBOM_MAX_BYTES))
        ctype = {"json": JSON_TYPE, "xml": "application/xml"}.get(
            name.rpartition(".")[2].lower(), "text/plain; charset=utf-8")
        try:
            return self._member_response(self.store.blob_path(f.sha256), entry, ctype)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise not_found("the SBOM %s of %s can't be read: %s" % (name, filename, e))

    # -- files --------------------------------------------------------------------------

    def _file_index(self, user, index, h3, h13):
        """The index of a file URL, whose two hash segments must be hex of 3 and 13 digits."""
        if len(h3) != 3 or len(h13) != 13 or not HEX_RE.match(h3 + h13):
            raise not_found("no such file")
        return self.model.require_index(user + "/" + index)

    def route_delete_file(self, req, user, index, h3, h13, filename):
        ix = self._file_index(user, index, h3, h13)
        self.model.delete_file(req.actor, ix, filename, h3 + h13, force="force" in req.query)
        return message_response("package %r deleted"
                                % file_relpath(ix.path, h3 + h13, filename))

    def route_post_toxresult(self, req, user, index, h3, h13, filename):
        ix = self._file_index(user, index, h3, h13)
        report = req.json_body(TOXRESULT_MAX_BODY)
        return api_result("toxresultpath", self.model.add_toxresult(
            req.actor, ix, filename, h3 + h13, report))

    def route_get_file(self, req, user, index, h3, h13, filename):
        # (also HEAD: a first download of a mirrored file is then fetched, not streamed)
        ix = self._file_index(user, index, h3, h13)
        m = self.model
        metadata = False
        if ix.is_mirror:  # (also a first download, its metadata, its provenance)
            self._token_reads_mirror_file(req, ix, filename)
        if filename.endswith(".provenance"):  # PEP 740 (no distribution's name ends so)
            if not ix.is_mirror:
                raise not_found("no provenance for %s" % filename)
            path, sha = self.mirror.provenance(ix, filename[:-len(".provenance")], h3 + h13)
            r = self._blob_response(req, path, sha, filename, time.time(), True)
            r.headers[0] = ("Content-Type", PROVENANCE_TYPE)
            return r
        try:
            if filename.endswith(".metadata"):  # (no distribution's name ends so)
                raise not_found("no such file")
            f = m.find_file(ix, filename, h3 + h13)
        except HTTPError as e:
            if e.status != 404:
                raise
            if filename.endswith(".metadata"):
                try:
                    f = m.find_file(ix, filename[:-len(".metadata")], h3 + h13)
                except HTTPError:
                    if not ix.is_mirror:
                        raise
                    f = None
                if f is not None and f.core_metadata and os.path.exists(
                        self.store.blob_path(f.core_metadata)):
                    metadata = True
                elif ix.is_mirror:
                    path, sha = self.mirror.core_metadata(ix, filename[:-len(".metadata")],
                                                          h3 + h13)
                    return self._blob_response(req, path, sha, filename, time.time(), True)
                else:
                    raise
            elif ix.is_mirror:
                return self._mirror_download(req, ix, filename, h3 + h13)
            else:
                raise
        self.token_allows(req, "pkg_read", ix.path, f.project)
        self._refuse_unoffered(ix, f)
        if wants_json(req.accept) and not metadata:
            return api_result("releasefilemeta", {
                "hash_spec": "sha256=" + f.sha256, "hashes": {"sha256": f.sha256},
                "last_modified": http_date(f.uploaded), "project": f.project,
                "version": f.version})
        sha = f.core_metadata if metadata else f.sha256
        return self._blob_response(req, self.store.blob_path(sha), sha, f.filename, f.uploaded,
                                   metadata)

    def _token_reads_mirror_file(self, req, ix, filename):
        """A token limited to some projects reads only their files from a mirror, also
        those not kept yet: judged on the project the mirror files it under."""
        for suffix in (".metadata", ".provenance"):
            if filename.endswith(suffix):
                filename = filename[:-len(suffix)]
        self.token_allows(req, "pkg_read", ix.path, mirror_file_project(filename))

    def route_get_ext_file(self, req, user, index, key, filename):
        """A mirrored file upstream gave no hash for: served from disk once kept (also
        offline), else fetched, hashed and kept on this first download."""
        ix = self.model.require_index(user + "/" + index)
        if not ix.is_mirror or len(key) > EXT_KEY_MAX or not EXT_KEY_RE.match(key):
            raise not_found("no such file")
        self._token_reads_mirror_file(req, ix, filename)
        try:
            f = self.model.find_file(ix, filename, "")
        except HTTPError as e:
            if e.status != 404:
                raise
            return self._mirror_download(req, ix, filename, "", ext=key)
        self._refuse_unoffered(ix, f)
        return self._blob_response(req, self.store.blob_path(f.sha256), f.sha256, f.filename,
                                   f.uploaded, False)

    def _refuse_unoffered(self, ix, f):
        """Raise what a file URL answers for a kept file (or its ``.metadata``) that ``ix``
        does not offer (Model.file_refusal): the guards hold at the file URLs too."""
        refusal = (self.mirror.kept_refusal(ix, f) if ix.is_mirror else
                   self.model.file_refusal(ix, f.project, f.filename, f.version, f.uploaded))
        if refusal is not None:
            raise refusal

    def _file_headers(self, sha, filename, uploaded, metadata):
        # a file URL holds its sha256: its bytes can never change, any cache may keep them
        return [("Content-Type", file_content_type(filename, metadata)),
                ("ETag", '"%s"' % sha),
                ("Last-Modified", http_date(uploaded)),
                ("Cache-Control", "public, max-age=31536000, immutable"),
                ("Accept-Ranges", "bytes")]

    @staticmethod
    def _wants_range(req):
        """The byte range a GET asks for (``parse_byte_range``), or None. Range is defined
        for GET only: HEAD answers the whole file's headers."""
        if req.method != "GET":
            return None
        return parse_byte_range(req.headers.get("Range"))

    def _blob_response(self, req, path, sha, filename, uploaded, metadata):
        try:
            size = os.stat(path).st_size
        except OSError:
            raise HTTPError(410, "the bytes of %s are missing on the server" % filename)
        headers = self._file_headers(sha, filename, uploaded, metadata)
        if req.headers.get("If-None-Match") == '"%s"' % sha:
            return Response(304, b"", headers)
        r = Response(200, b"", headers)
        r.file_path = path
        r.file_size = size
        spec = self._wants_range(req)
        if_range = req.headers.get("If-Range")
        if spec is not None and (if_range is None or if_range.strip() in (
                '"%s"' % sha, http_date(uploaded))):
            got = byte_range_slice(spec, size)
            if got is None:
                return Response(416, b"", [h for h in headers if h[0] != "Cache-Control"]
                                + [("Content-Range", "bytes */%d" % size)])
            r.status = 206
            r.file_offset, r.file_size = got
            headers.append(("Content-Range", "bytes %d-%d/%d" % (got[0], sum(got) - 1, size)))
        return r

    def _mirror_download(self, req, ix, filename, sha_prefix, ext=None):
        """First download of a mirrored file: streamed from upstream while it is kept."""
        got = self.mirror.download(ix, filename, sha_prefix, ext)
        if got is None or req.method == "HEAD" or self._wants_range(req) is not None:
            if got is not None:  # HEAD, a range: fetch it whole, then answer from disk
                size, chunks = got
                try:
                    for _ in chunks:
                        pass
                finally:
                    chunks.close()
            f = self.model.find_file(ix, filename, sha_prefix)
            return self._blob_response(req, self.store.blob_path(f.sha256), f.sha256,
                                       f.filename, f.uploaded, False)
        size, chunks = got
        if ext is not None:  # its hash is known only at the end: nothing to promise yet
            r = Response(200, b"", [("Content-Type", file_content_type(filename))])
            r.stream = chunks
            r.file_size = size
            return r
        try:
            found = self.mirror.find_entry(ix, filename, sha_prefix)
        except BaseException:
            chunks.close()  # (the fetch, its connection and its flight are not left open)
            raise
        sha = found[1]["sha256"] if found else sha_prefix
        r = Response(200, b"", self._file_headers(sha, filename, time.time(), False))
        r.stream = chunks
        r.file_size = size
        return r

    # -- simple pages -------------------------------------------------------------------

    def route_simple_root(self, req, user, index):
        ix = self.model.require_index(user + "/" + index)
        if not req.trailing and not (req.is_installer or wants_simple(req.accept)):
            return redirect(req.absolute(ix.path + "/+simple/"))
        return self.simple_root(req, ix)

    def route_simple_project(self, req, user, index, project):
        ix = self.model.require_index(user + "/" + index)
        norm = normalize_name(project)
        if norm != project:
            return redirect(req.absolute("%s/+simple/%s/" % (ix.path, norm)))
        if not req.trailing and not (req.is_installer or wants_simple(req.accept)):
            return redirect(req.absolute("%s/+simple/%s/" % (ix.path, norm)))
        return self.simple_project_page(req, ix, norm)

    def route_at_simple_root(self, req, user, index, moment):
        ix = self.model.require_index(user + "/" + index)
        at = parse_at_time(moment)
        if not req.trailing:
            return redirect(req.absolute("%s/+at/%s/+simple/" % (ix.path, moment)))
        return self.simple_root(req, ix, at=at)

    def route_at_simple_project(self, req, user, index, moment, project):
        ix = self.model.require_index(user + "/" + index)
        at = parse_at_time(moment)
        norm = normalize_name(project)
        if norm != project or not req.trailing:
            return redirect(req.absolute("%s/+at/%s/+simple/%s/" % (ix.path, moment, norm)))
        return self.simple_project_page(req, ix, norm, at=at)

    def route_refresh(self, req, user, index, project):
        ix = self.model.require_index(user + "/" + index)
        for b in self.model.chain(ix, req.actor):
            if b.is_mirror:
                self.mirror.forget_project(b, normalize_name(project))
        return redirect(req.absolute("%s/+simple/%s/" % (ix.path, normalize_name(project))))

    def _page_base(self, req):
        """The directory of the request path, that relative links resolve against."""
        return req.path if req.path.endswith("/") else req.path.rsplit("/", 1)[0] + "/"

    def mirror_root(self, req, ix, fmt):
        try:
            paths = self.mirror.root_listing(ix, fmt)
        except HTTPError as e:
            log("WARNING: project list of %s unavailable: %s" % (ix.path, e.message))
            paths = None
        if paths is None or not os.path.exists(paths[0]):
            return None  # offline and never fetched: the projects kept locally
        path, gz = paths
        headers = [("Content-Type", SIMPLE_JSON if fmt == "json" else HTML_TYPE),
                   ("Vary", "Accept, User-Agent, Accept-Encoding"),
                   ("Cache-Control", MIRROR_LIST_CACHE_CONTROL)]
        if "gzip" in (req.headers.get("Accept-Encoding") or "") and os.path.exists(gz):
            path = gz
            headers.append(("Content-Encoding", "gzip"))
        try:
            st = os.stat(path)
        except OSError:
            return None
        etag = '"%x-%x%s"' % (int(st.st_mtime * 1000), st.st_size, "-gz" if path == gz else "")
        headers.append(("ETag", etag))
        if req.headers.get("If-None-Match") == etag:
            return Response(304, b"", headers)
        r = Response(200, b"", headers)
        r.file_path = path
        r.file_size = st.st_size
        return r

    def simple_root(self, req, ix, at=None):
        fmt = choose_simple_format(req.accept)
        m = self.model
        if ix.is_mirror and req.path.endswith("/+simple/") and at is None:
            resp = self.mirror_root(req, ix, fmt)
            if resp is not None:
                return resp
        base = self._page_base(req)
        # the page of what this reader may see: readers who see other indexes get another
        chain = m.chain(ix, lambda: req.actor)
        validator = self.pages.root_validator(chain)
        key = ("root", ix.path, fmt, base, tuple(b.id for b in chain))
        prefix = posixpath.relpath("/%s/+simple/" % ix.path, base)
        prefix = "" if prefix == "." else prefix + "/"
        return self.listing_response(req, key, validator, simple_root_type(fmt), lambda: (
            simple_root_chunks(m.project_listing(ix, lambda: req.actor, at=at), fmt, prefix)))

    def listing_response(self, req, key, validator, content_type, chunks, shared=True):
        """The answer of a listing that may be of any size (``chunks()``: its bytes, made as
        they are sent): kept in the page cache while ``validator`` holds, as a project
        page is, when it is small enough to keep (PageCache.page_max); else kept in a file
        (ListingFiles), streamed in chunked transfer coding as it is made and written, in
        bounded memory, the first time. Its ETag is then of what it is made from, so that
        a client holding it gets its 304 without a byte made."""
        page = self.pages.get(key, validator)
        if page is not None:
            return self.page_response(req, page, shared)
        etag = self.pages.stream_etag(key, validator)
        headers = [("Content-Type", content_type), ("ETag", etag),
                   ("Vary", "Accept, User-Agent, Accept-Encoding"),
                   ("Cache-Control", PAGE_CACHE_CONTROL if shared
                    else PRIVATE_PAGE_CACHE_CONTROL)]
        inm = req.headers.get("If-None-Match")
        # (the gzip twin of a kept file: the same listing, its own ETag, as page_response)
        etag_gz = etag[:-1] + '-gz"'
        for tag in (etag, etag_gz):
            if inm and tag in [t.strip() for t in inm.split(",")]:
                headers[1] = ("ETag", tag)
                return Response(304, b"", headers)
        resp = Response(200, b"", headers)
        kept = self.listing_files.get(key, validator)
        if kept is not None:
            resp.file_path, resp.file_size = kept.path, kept.size
            if kept.gz_path and "gzip" in (req.headers.get("Accept-Encoding") or ""):
                resp.file_path, resp.file_size = kept.gz_path, kept.gz_size
                headers[1] = ("ETag", etag_gz)
                headers.append(("Content-Encoding", "gzip"))
            return resp
        made = iter(chunks())
        held, size = [], 0
        for chunk in made:
            held.append(chunk)
            size += len(chunk)
            if size > self.pages.page_max // 2:  # (what the cache keeps: it and its gzip)
                break
        else:
            return self.page_response(req, self.pages.put(key, validator, b"".join(held),
                                                           content_type), shared)

        def stream():
            try:
                yield b"".join(held)
                del held[:]
                for chunk in made:
                    yield chunk
            finally:
                made.close()
        resp.stream = self.listing_files.tee(key, validator, stream())
        resp.file_size = None  # (not known before the end: chunked)
        return resp

    def simple_project_page(self, req, ix, norm, at=None):
        fmt = choose_simple_format(req.accept)
        m = self.model
        validator = self.pages.project_validator(norm)
        base = self._page_base(req)
        absolute = bool(req.headers.get("X-Devpi-Absolute-Urls"))
        seen = m.walk(ix, norm, lambda: req.actor)
        key = ("project", ix.path, norm, fmt, base,
               req.outside_url() if absolute else None, tuple(b.id for b in seen.chain))
        mirrors = seen.mirrors
        if mirrors:
            for b in mirrors:
                self.mirror.ensure_fresh(b, norm)
            validator = self.pages.project_validator(norm)
        page = self.pages.get(key, validator)
        if page is None:
            walk = m.walk(ix, norm, lambda: req.actor, at=at)  # (read after the validator)
            errors = []

            def mirror_files(b, name):
                if b is ix:
                    return self.mirror.files(b, name)
                try:
                    return self.mirror.files(b, name)
                except UpstreamError as e:
                    errors.append(e)
                    return None
            files = m.project_files(walk, mirror_files=mirror_files)
            if errors:
                if files is None:
                    raise errors[0]
                log("WARNING: %s: %s" % (ix.path, errors[0].message))
            if files is None:
                if walk.withheld_message():
                    raise not_found(walk.withheld_message())
                if self.mirror.offline and any(b.is_mirror for b in walk.chain):
                    raise not_found("The project %s is not kept locally (offline mode: no "
                                    "upstream traffic)" % norm)
                raise not_found("The project %s does not exist." % norm)
            display = walk.display or norm
            if absolute:
                def href(f):
                    return req.absolute(f.relpath)
            else:
                up = {}  # index -> the relative way from the page to it (once per index)

                def href(f):
                    to = up.get(f.index)
                    if to is None:
                        to = up[f.index] = posixpath.relpath("/" + f.index, base) + "/"
                    # (a file's path below its index is plain segments: relpath's result)
                    return f.relpath[len(f.index) + 1:] if to == "./" else \
                        to + f.relpath[len(f.index) + 1:]
            versions = m.project_versions(ix, norm, lambda: req.actor, walk) if fmt == "json" else ()  # (HTML has none)
            rendered = render_simple_project(norm, display, files, versions, fmt, href,
                                             walk.status)
            if errors:  # partial (a mirror failed): serve, but do not keep
                page = CachedPage(None, *rendered)
            else:  # (a page with files held back by age is built again when one matures)
                page = self.pages.put(key, validator, *rendered, expires=walk.next_change)
        return self.page_response(req, page, shared=not absolute)

    def page_response(self, req, page, shared=True):
        headers = [("Content-Type", page.content_type), ("ETag", page.etag),
                   ("Vary", "Accept, User-Agent, Accept-Encoding"),
                   ("Cache-Control", PAGE_CACHE_CONTROL if shared
                    else PRIVATE_PAGE_CACHE_CONTROL)]
        body = page.body
        etag = page.etag
        if page.gzipped is not None and "gzip" in (req.headers.get("Accept-Encoding") or ""):
            body = page.gzipped
            etag = etag[:-1] + '-gz"'
            headers.append(("Content-Encoding", "gzip"))
        headers[1] = ("ETag", etag)
        inm = req.headers.get("If-None-Match")
        if inm and etag in [t.strip() for t in inm.split(",")]:
            return Response(304, b"", headers)
        return Response(200, body, headers)


# -- the handler and the server -------------------------------------------------------

COMMON_HEADERS = [("X-Devpi-Api-Version", DEVPI_API_VERSION),
                  ("X-Devpi-Server-Version", "%s (minidevpi %s)" % (DEVPI_SERVER_VERSION,
                                                                     __version__)),
                  ("X-Content-Type-Options", "nosniff")]
# Time bounds. The request line and headers must be in within the connection timeout of
# the connection's previous answer (or its opening); a body, from when the server starts
# reading it, must come at BODY_MIN_RATE on average after a grace of one connection
# timeout; no single read or write waits longer than the connection timeout. A client
# sending a byte a second holds a thread for one timeout, not forever.
BODY_MIN_RATE = 1024  # bytes a second: a link slower than this can't upload a wheel anyway
# An unread rest of a Content-Length body up to this size is read and dropped (within
# DRAIN_SECONDS) so that the connection stays usable; anything else closes it.
SMALL_BODY_DRAIN = 256 * 1024
DRAIN_SECONDS = 2
# Closing with unread bytes in the socket resets the connection, and the client may lose
# the answer: first up to LINGER_BYTES (LINGER_SECONDS) of what it still sends are dropped.
LINGER_BYTES = 1024 * 1024
LINGER_SECONDS = 1


class _SocketInput(io.RawIOBase):
    """The socket as its handler reads it, with a deadline for the reads of a request
    (``expect``): the socket's own timeout bounds each read, the deadline all of them. The
    socket's timeout is only changed when the deadline is nearer than it, so a request
    that arrives at once costs no system call."""

    def __init__(self, sock, timeout):
        self.sock = sock
        self.timeout = timeout  # the socket's timeout, for every single read and write
        self.current = timeout  # what it is set to now
        self.slop = min(1.0, timeout / 10) if timeout else 0
        self.deadline = None
        self.per_byte = 0.0
        self.received = 0
        self.failed = False     # a read timed out or failed: the stream is unusable

    def readable(self):
        return True

    def expect(self, seconds, rate=None):
        """Reads from now on must be done within ``seconds``; with ``rate`` (bytes a
        second) each byte read earns 1/rate second more."""
        if not self.timeout:
            return
        self.per_byte = 1.0 / rate if rate else 0.0
        self.deadline = time.monotonic() + seconds - self.received * self.per_byte
        self._set(self.timeout)

    def pause(self):
        """No deadline (while a route works, and for writes)."""
        self.deadline = None
        self._set(self.timeout)

    def _set(self, t):
        if t != self.current:
            self.sock.settimeout(t)
            self.current = t

    def readinto(self, b):
        if self.deadline is not None:
            left = self.deadline + self.received * self.per_byte - time.monotonic()
            if left <= 0:
                self.failed = True
                raise socket.timeout("request not received in time")
            want = left if left < self.timeout else self.timeout
            if want > self.current or want < self.current - self.slop:
                self.sock.settimeout(want)
                self.current = want
        try:
            n = self.sock.recv_into(b)
        except OSError:
            self.failed = True
            raise
        self.received += n
        return n


def _reason_phrase(text):
    """A status-line-safe rendering of a message: upload clients (twine, devpi upload)
    print the reason phrase of a refused upload, not its body."""
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", str(text)).strip()
    return text.encode("latin-1", "replace").decode("latin-1")[:300] or "Error"


class RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body must not wait for delayed ACKs
    server_version = "minidevpi/" + __version__
    def setup(self):
        # seconds a connection may sit idle or stall mid-request, then it is closed
        self.timeout = self.server.connection_timeout
        super().setup()
        self.rfile.close()  # read through the deadline instead (see _SocketInput)
        self.raw_in = _SocketInput(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.raw_in)
        self.body = None

    def handle_one_request(self):
        self.raw_in.expect(self.timeout)  # request line and headers within the timeout
        super().handle_one_request()

    def do_GET(self):
        self.dispatch()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_PUSH = do_OPTIONS = do_GET

    def dispatch(self):
        server = self.server
        with server.connections_lock:  # (in flight: a stopping server lets it finish)
            server.busy.add(self.connection)
        try:
            # (the mirror asks whether this request's client still waits: Client)
            with Client.serving(Client(self._client_here)):
                self._dispatch()
        finally:
            if server.app.store.pooled:  # (a bounded pool: back after each request)
                server.app.store.release_conn()
            with server.connections_lock:
                server.busy.discard(self.connection)

    def _client_here(self):
        """False once the client closed or broke its connection: a look, no wait (bytes
        it sent meanwhile, a next request, stay where they are)."""
        import select
        sock = self.connection
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            events = poller.poll(0)
            if not events:
                return True
            if events[0][1] & (select.POLLERR | select.POLLNVAL):
                return False
        elif not select.select([sock], [], [], 0)[0]:
            return True
        try:
            return bool(sock.recv(1, socket.MSG_PEEK))
        except (BlockingIOError, InterruptedError, socket.timeout):
            return True
        except OSError:
            return False

    def _dispatch(self):
        t0 = time.monotonic()
        self.raw_in.pause()  # the headers are in; a body is bounded when a route reads it
        app = self.server.app
        req = None
        why = None  # the reason of a failure on the server's side, for its log
        self.body = None
        try:
            self.body = self._request_body()
            path, query = self._parse_target()
            req = Request(self, app, self.command, path, query, False)
            resp = app.dispatch(req)
        except HTTPError as e:
            resp = self._error_response(e, req)
            if e.status >= 500:
                why = e.message
        except Exception:
            if self.raw_in.failed:  # the client stalled or went away while sending its body
                resp = message_response("request body not received in time", 408)
            else:  # a bug: log it, answer 500, keep serving
                import traceback
                log("ERROR handling %s %s:\n%s" % (self.command, self.path[:200],
                                                    traceback.format_exc()))
                resp = message_response("internal server error", 500)
        unread = self._finish_body()
        if self.server.stopping:  # the last answer on this connection
            self.close_connection = True
        self._send(resp, req)
        if unread:
            self._linger()
        self.server.log_access(self, resp, time.monotonic() - t0, why)

    def _request_body(self):
        """The request's body as its headers frame it. Bodies whose length can't be known
        for sure are refused (request smuggling, garbage)."""
        h = self.headers
        lengths = h.get_all("Content-Length") or []
        tes = h.get_all("Transfer-Encoding") or []
        te = tes[0].strip().lower() if tes else ""
        bad = None
        if len(lengths) > 1 or any(not CONTENT_LENGTH_RE.match(v) for v in lengths):
            bad = "invalid Content-Length"
        elif len(tes) > 1 or (tes and te != "chunked"):
            bad = "unsupported Transfer-Encoding %r" % ", ".join(tes)[:50]
        elif tes and lengths:
            bad = "both Content-Length and Transfer-Encoding given"
        if bad:
            self.close_connection = True
            raise bad_request(bad)
        return RequestBody(self, int(lengths[0].strip(" \t")) if lengths else 0, bool(tes))

    def _parse_target(self):
        raw = self.path
        if raw.startswith(("http://", "https://")):
            raw = "/" + raw.split("/", 3)[-1] if raw.count("/") >= 3 else "/"
        if not raw.startswith("/"):
            raise bad_request("invalid request target")
        path_part, _, qs = raw.partition("?")
        try:
            path = urllib.parse.unquote(path_part, errors="strict")
        except UnicodeDecodeError:
            raise bad_request("request path is not valid UTF-8")
        if any(ord(c) < 32 or ord(c) == 127 for c in path):
            raise bad_request("request path contains control characters")
        segs = path.split("/")
        if any(s in (".", "..") for s in segs):
            raise bad_request("request path contains '.' or '..' segments")
        try:
            query = urllib.parse.parse_qs(qs, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise bad_request("query string is not valid")
        return path, query

    def _error_response(self, e, req):
        web = req is not None and e.status >= 400 and req.method in ("GET", "HEAD") \
            and wants_html(req)
        if web:
            resp = self.server.app.error_page(req, e)  # a browser's: a page
        else:
            resp = message_response(e.message, e.status)
        resp.headers.extend(e.headers.items())
        if e.challenge and not (web and e.status == 401):
            # (a browser gets the log-in page: a challenge would open its own dialog)
            resp.headers.append(("WWW-Authenticate", 'Basic realm="pypi"'))
        if e.retry_after is not None:
            resp.headers.append(("Retry-After", str(e.retry_after)))
        if req is not None and (req.is_upload or req.is_installer):
            # upload clients (devpi upload, twine) print the reason phrase, not the body,
            # and so does pip refused a file (why it may not install a URL of a lock file)
            resp.reason = _reason_phrase(e.message)
        return resp

    def _finish_body(self):
        """Make sure that no byte of this request's body is read as the next request; True
        when the connection is to be closed with bytes of the body unread.

        Decided from the body itself: read to its end, the connection stays. A small unread
        rest of a Content-Length body is read and dropped (briefly). Anything else, a
        chunked body not read to its last chunk, a large rest, a failed read, a framing that
        was refused, closes the connection after the answer (``Connection: close``)."""
        body = self.body
        raw = self.raw_in
        if body is not None and not body.complete and not body.chunked \
                and not self.close_connection and not raw.failed \
                and body.remaining <= SMALL_BODY_DRAIN:
            raw.expect(min(DRAIN_SECONDS, self.timeout or DRAIN_SECONDS))
            try:
                body.drain()
            except (HTTPError, OSError):
                pass
        raw.pause()
        if body is not None and body.complete:
            return False
        self.close_connection = True
        return not raw.failed

    def _linger(self):
        """Close a connection whose request body was not read: stop sending, then drop what
        the client still sends (a little, briefly), so that it reads the answer rather than
        a reset. The connection serves nothing more."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:
            return
        self.raw_in.expect(min(LINGER_SECONDS, self.timeout or LINGER_SECONDS))
        got = 0
        try:
            while got < LINGER_BYTES:
                data = self.rfile.read1(65536)
                if not data:
                    break
                got += len(data)
        except (OSError, ValueError):
            pass

    def _shows_state(self, req):
        """Whether this answer carries the server's serial and uuid (Model.may_see_state;
        an answer to a request that was never parsed counts as anonymous)."""
        def reader():
            if req is None:
                return None
            try:
                return req.actor
            except HTTPError:  # (throttled: counts as anonymous)
                return None
        return self.server.app.model.may_see_state(reader)

    def _send(self, resp, req):
        status = resp.status
        reason = resp.reason or self.responses.get(status, ("Error",))[0]
        head = ["HTTP/1.1 %d %s\r\n" % (status, reason)]
        for k, v in COMMON_HEADERS:
            head.append("%s: %s\r\n" % (k, v))
        store = self.server.app.store
        if self._shows_state(req):
            head.append("X-Devpi-Serial: %d\r\nX-Devpi-Uuid: %s\r\nX-Devpi-Master-Uuid: %s\r\n"
                        "X-Devpi-Primary-Uuid: %s\r\n" % (store.serial, store.uuid,
                                                          store.uuid, store.uuid))
        if req is not None and req.session is not None:
            self.server.app.session_headers(resp)
        for k, v in resp.headers:
            head.append("%s: %s\r\n" % (k, v))
        length = resp.file_size if (resp.file_path or resp.stream) else len(resp.body)
        chunked = length is None  # (a stream whose length is known at its end only)
        if chunked and self.request_version == "HTTP/1.0":
            self.close_connection = True  # (no chunked coding: the body ends with it)
        elif chunked and status != 304:
            head.append("Transfer-Encoding: chunked\r\n")
        elif status != 304:
            head.append("Content-Length: %d\r\n" % length)
        if self.close_connection or (self.headers.get("Connection", "").lower() == "close"):
            self.close_connection = True
            head.append("Connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1", "replace")
        send_body = self.command != "HEAD" and status != 304
        try:
            if resp.stream is not None and send_body:
                self._send_stream(data, resp, chunked and not self.close_connection)
            elif resp.stream is not None:  # HEAD: its length, not its bytes
                try:
                    self.wfile.write(data)
                finally:
                    resp.stream.close()
            elif resp.file_path and send_body:
                with open(resp.file_path, "rb") as f:
                    if length <= SMALL_FILE:  # metadata, small wheels, ranges: one write
                        if resp.file_offset:
                            f.seek(resp.file_offset)
                        self.wfile.write(data + f.read(length))
                    else:
                        self._sendfile(data, f, resp.file_offset, length)
            else:
                self.wfile.write(data + resp.body if send_body else data)
        except OSError:
            self.close_connection = True

    def _sendfile(self, head, f, offset, count):
        """Headers, then the file by the kernel (``socket.sendfile``: it gives up on a
        client that stops reading for the connection timeout). On Linux TCP_CORK holds
        the headers back to go out with the file in full-sized segments."""
        sock = self.connection
        cork = getattr(socket, "TCP_CORK", None)
        if cork is None:
            self.wfile.write(head)
            sock.sendfile(f, offset, count)
            return
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        try:
            self.wfile.write(head)
            sock.sendfile(f, offset, count)
        finally:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def _send_stream(self, head, resp, chunked=False):
        """Send chunks as they come (``chunked``: in HTTP/1.1's chunked coding); if they
        fail, cut the connection so the client sees a short body, never a complete bad
        one."""
        try:
            self.wfile.write(head)
            for chunk in resp.stream:
                if chunked and chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                elif not chunked:
                    self.wfile.write(chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
        except (HTTPError, sqlite3.Error) as e:
            log("ERROR: %s; connection cut" % getattr(e, "message", e))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            resp.stream.close()

    def send_error(self, code, message=None, explain=None):
        # malformed request lines and headers (http.server's own checks): JSON, then close.
        # They are the client's mistakes: 4xx (an unknown method 405, a bad version 400).
        self.close_connection = True
        code = {501: 405, 505: 400}.get(code, code)
        try:
            body = json.dumps({"message": message or self.responses.get(code, ("",))[0]})
            body = body.encode() + b"\n"
            self.wfile.write(("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                              "X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
                              % (code, self.responses.get(code, ("Error",))[0], JSON_TYPE,
                                 len(body))).encode() + body)
        except OSError:
            pass

    def log_message(self, format, *args):
        pass  # access lines come from log_access


DEFAULT_THREADS = 256
DEFAULT_CONNECTION_TIMEOUT = 60
STOP_GRACE = 5  # seconds requests in flight (an upload) get to finish when serve is stopped


class IndexHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_threads`` at once: beyond that a new
    connection is answered 503 at once, so idle or slow clients can't pile up threads."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, app, access_log=True, max_threads=DEFAULT_THREADS,
                 connection_timeout=DEFAULT_CONNECTION_TIMEOUT):
        self.app = app
        self.access_log = access_log
        self.connection_timeout = connection_timeout
        self.slots = threading.BoundedSemaphore(max_threads)
        self.connections = set()
        self.busy = set()  # the connections with a request in flight
        self.connections_lock = threading.Lock()
        self.stopping = False
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, RequestHandler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1)
                body = b'{"message": "server busy: too many connections, try again"}\n'
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                b"application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
                                b"Content-Length: %d\r\n\r\n" % len(body) + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.store.release_conn()
            with self.connections_lock:
                self.connections.discard(request)
            self.slots.release()

    def _shut_and_wait(self, conns, watched, wait, hurry=None):
        """Shut the connections ``conns``, then wait up to ``wait`` seconds (less once
        ``hurry`` is set) for the set ``watched`` to empty; True when it did."""
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while True:
            with self.connections_lock:
                if not watched:
                    return True
            if time.monotonic() >= deadline or hurry is not None and hurry.is_set():
                return False
            time.sleep(0.01)

    def drain(self, grace, hurry=None):
        """Stop gently, once no new connection is accepted: close the idle connections,
        give the requests in flight up to ``grace`` seconds to finish (each connection is
        closed after its answer), less if the event ``hurry`` is set. True when none was
        left in flight."""
        with self.connections_lock:
            self.stopping = True
            idle = [c for c in self.connections if c not in self.busy]
        return self._shut_and_wait(idle, self.busy, grace, hurry)

    def close_connections(self, wait=5.0):
        """Shut every open connection and wait (a while) for their threads to finish, so
        that nothing still uses the database when it is closed."""
        with self.connections_lock:
            conns = list(self.connections)
        return self._shut_and_wait(conns, self.connections, wait)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def log_access(self, handler, resp, elapsed, why=None):
        """One line per request; ``why``: the reason of a failure on the server's side
        (an upstream refused or broken), which the client may never show."""
        if self.access_log:
            log('%s - "%s %s" %d %.1fms%s' % (
                handler.client_address[0], handler.command, handler.path[:300], resp.status,
                elapsed * 1000, ": " + _reason_phrase(why) if why else ""))


# -- setting up a server directory ----------------------------------------------------


def pip_index_url(ignore_system_files=False):
    """The index pip on this host is configured to use: PIP_INDEX_URL, then pip's
    configuration files, then pip's built-in default where pip is importable.
    (``ignore_system_files``: only the user's files, for tests.)"""
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        return env.split()[0]
    import configparser
    files = []
    if os.environ.get("PIP_CONFIG_FILE") and os.environ["PIP_CONFIG_FILE"] != os.devnull:
        files.append(os.environ["PIP_CONFIG_FILE"])
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(os.pathsep)
    system = [os.path.join(d, "pip", "pip.conf") for d in xdg_dirs] + ["/etc/pip.conf"]
    files = ([] if ignore_system_files else system) + (
               [os.path.expanduser("~/.pip/pip.conf"),
                os.path.join(os.environ.get("XDG_CONFIG_HOME", os.path.expanduser("~/.config")),
                             "pip", "pip.conf")]
             + [os.path.join(sys.prefix, "pip.conf")] + files)
    found = None
    for path in files:  # later files override earlier ones, as in pip
        cp = configparser.RawConfigParser()
        try:
            cp.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        for section in ("global", "install"):
            if cp.has_option(section, "index-url"):
                found = cp.get(section, "index-url").split()[0]
    if found:
        return found
    try:
        from pip._internal.models.index import PyPI
        return PyPI.simple_url
    except Exception:
        return None


def mirror_web_url_fmt(mirror_url):
    """The upstream's project page for ``{name}``, as devpi gives its root/pypi, derived from
    a simple index URL whose shape says where the pages are: ``.../simple/`` (the public
    index's layout: ``.../project/{name}/``) or a devpi index ``/U/I/+simple/`` (``/U/I/{name}``);
    None for any other URL. Credentials in the URL are left out."""
    u = urllib.parse.urlsplit(mirror_url)
    if u.query or u.fragment or not u.hostname:
        return None
    host = u.hostname if ":" not in u.hostname else "[%s]" % u.hostname
    if u.port:
        host += ":%d" % u.port
    m = re.match(r"^(/(?:[^/]+/)*?)(simple|\+simple)/?$", u.path)
    if not m:
        return None
    prefix, last = m.groups()
    page = prefix + ("project/{name}/" if last == "simple" else "{name}")
    return urllib.parse.urlunsplit((u.scheme, host, page, "", ""))


def check_root_pwhash(root_pwhash):
    """Refuse a --root-passwd-hash that minidevpi can't check (None: none given)."""
    if root_pwhash is not None and not is_known_hash(root_pwhash):
        raise MinidevpiError("--root-passwd-hash is not a hash minidevpi can check "
                             "(scrypt$... or pbkdf2_sha256$..., as 'minidevpi.py "
                             "hash-password' writes it)")


def init_serverdir(serverdir, root_password=None, root_pwhash=None, root_pypi=True,
                   mirror_url=None, hash_soon=False, root_unusable=False, audit=True,
                   storage=None):
    """Create a server directory with root and (unless told not to) root/pypi.

    Returns the Store, opened. Refuses a directory that is already initialised. Its audit
    log begins with one server.init record (``audit``; an import gives it the dump's).
    """
    check_root_pwhash(root_pwhash)
    store = open_store(serverdir, storage)
    if store.is_initialised():
        raise AlreadyInitialised("%s is already initialised; nothing was changed" % (
            store if storage else store.serverdir))
    if os.path.isdir(serverdir) and os.listdir(serverdir):
        raise MinidevpiError("%s is not empty; initialise a new or empty directory"
                        % store.serverdir)
    store.create()
    store.open()
    model = Model(store)
    model.context.begin(command_line=True, quiet=True)  # (one record for it all, below)
    if root_unusable:  # (an import, which gives root its password next)
        model.create_user(None, "root", {}, pwhash="!none")
    elif root_pwhash is not None:
        model.create_user(None, "root", {}, pwhash=root_pwhash)
    else:
        model.create_user(None, "root", {"password": root_password or ""},
                          hash_soon=hash_soon)
    if root_pypi:
        config = {"type": "mirror", "volatile": False, "title": "PyPI"}
        url = mirror_url or pip_index_url()
        if url:
            config["mirror_url"] = url
            web = mirror_web_url_fmt(url)
            if web:
                config["mirror_web_url_fmt"] = web
            with store.write() as c:
                store.insert_index(c, "root", "pypi",
                                   model.validate_index_config("root/pypi", config))
        else:
            log("warning: no upstream index found for root/pypi (no PIP_INDEX_URL, no pip "
                "configuration, pip not importable); set one with "
                "'devpi index root/pypi mirror_url=URL'")
            config["mirror_url"] = "http://127.0.0.1:9/simple/"
            with store.write() as c:
                store.insert_index(c, "root", "pypi", config)
    model.context.begin(command_line=True)
    if audit:
        with store.write() as c:
            model.audit(c, None, "server.init", users=["root"],
                        indexes=["root/pypi"] if root_pypi else [])
    model.context.begin()
    return store, model


# ===================================================================================
# 8. export / import (devpi-server's dump format)
# ===================================================================================

DUMP_VERSION = "2"


def unusable_argon2():
    """A well-formed Argon2id hash that no password matches (random salt and tag): what
    devpi gets for an account whose real hash it can't check. Never empty: devpi-import
    turns a missing hash into the empty password."""
    b64 = lambda n: base64.b64encode(secrets.token_bytes(n)).decode().rstrip("=")
    return "$argon2id$v=19$m=65536,t=3,p=4$%s$%s" % (b64(16), b64(32))


def legacy_devpi_hash(salt, hexhash):
    """devpi < 4.2 stored sha256(salt + password) with a per-user salt; checkable here."""
    return "devpi_sha256$%s$%s" % (salt, hexhash)


def pwhash_fingerprint(pwhash):
    """What an export writes as ``minidevpi_pwhash_for`` beside ``minidevpi_pwhash``: which
    devpi-side ``pwhash`` it wrote. devpi keeps both keys; when the password is changed on
    the devpi side its ``pwhash`` no longer has this fingerprint, and the newer hash wins."""
    return hashlib.sha256(pwhash.encode("utf-8", "surrogatepass")).hexdigest()


def refusal(check, value):
    """The message with which ``check`` (one of the API's check_* functions of section 3)
    refuses ``value``, or None: export and import judge names by the API's own rules."""
    if not isinstance(value, str):
        return "%r is not a string" % (value,)
    try:
        check(value)
    except HTTPError as e:
        return e.message
    return None


def check_sha256(value):
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise bad_request("invalid sha256 %r" % (value,))


def dump_path_refusal(rel):
    """Why the dump-relative path ``rel`` (``/``-separated) is refused, or None: absolute,
    ``..``, ``.``, empty parts, backslashes or control characters."""
    if not isinstance(rel, str) or not rel:
        return "file path %r is not a path" % (rel,)
    if rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")) \
            or "\\" in rel or any(ord(c) < 32 or c == "\x7f" for c in rel):
        return "file path %r leaves the dump or is not a plain path" % (rel,)
    return None


def is_inside(root, path):
    """Whether ``path`` resolves (symbolic links followed) to somewhere inside the real
    directory ``root``."""
    return os.path.realpath(path).startswith(os.path.join(root, ""))


class DumpFileRefused(Exception):
    """A dump's file that is not read: a symbolic link, outside the dump, not a file."""


def open_in_dump(dump, rel):
    """The regular file ``rel`` of the dump at the real path ``dump``, open for reading.

    A dump is read as given, never through a symbolic link: any part of the path that is
    one is refused (checked part by part, then opened part by part relative to the
    directory above with O_NOFOLLOW where the OS has it, so that nothing swapped in
    meanwhile is followed either), and the file's real path must be inside the dump. FIFOs
    and devices are refused too (opened non-blocking, then checked). Raises
    FileNotFoundError for a missing file and DumpFileRefused for the rest."""
    parts = rel.split("/")
    path = dump
    for i, part in enumerate(parts):
        path = os.path.join(path, part)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise DumpFileRefused("%s is a symbolic link: refused (files are read only from "
                                  "inside the dump)" % "/".join(parts[:i + 1]))
        if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
            raise FileNotFoundError(path)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) | nofollow
    try:
        if nofollow and os.open in os.supports_dir_fd:
            dfd = os.open(dump, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                for part in parts[:-1]:
                    nfd = os.open(part, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | nofollow,
                                  dir_fd=dfd)
                    os.close(dfd)
                    dfd = nfd
                fd = os.open(parts[-1], flags, dir_fd=dfd)
            finally:
                os.close(dfd)
        else:
            fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP, ENOTDIR: a link or a file swapped in since the check
        raise DumpFileRefused("%s can't be read safely (%s)" % (rel, e.strerror))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DumpFileRefused("%s is not a file" % rel)
        if not is_inside(dump, path):
            raise DumpFileRefused("%s is not inside the dump" % rel)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _http_date_ts(value):
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class Progress:
    """'<what>: N of M files, X MB' on stderr, a few times a second and at the end."""

    def __init__(self, what, total, quiet=False):
        self.what = what
        self.total = total
        self.quiet = quiet
        self.done = 0
        self.bytes = 0
        self.shown = 0.0

    def add(self, nbytes):
        self.done += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self.shown > 0.5 or self.done == self.total:
            self.shown = now
            self.show()

    def show(self):
        if not self.quiet and self.total:
            sys.stderr.write("%s: %d of %s, %.1f MB\n"
                             % (self.what, self.done, plural(self.total, "file"),
                                self.bytes / 1e6))
            sys.stderr.flush()


def _place_file(src, dest, hard_links, notes):
    """Link (if asked and possible) or copy ``src`` to ``dest``."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if hard_links and not notes.get("no_links"):
        try:
            os.link(src, dest)
            return
        except OSError as e:
            notes["no_links"] = "hard links are not possible here (%s): files were copied" % e
    shutil.copyfile(src, dest)


class JsonOut:
    """Writes, one member at a time, the very bytes ``json.dump(value, f, indent=2)``
    writes for the whole value: a dump of any size leaves without being built in memory.
    ``open``/``close`` a container, ``member``/``item`` a (small) value in it."""

    def __init__(self, f):
        self.f = f
        self.counts = []  # members written so far in each open container

    def _next(self, key):
        if self.counts:
            self.f.write(("," if self.counts[-1] else "") + "\n" + "  " * len(self.counts))
            self.counts[-1] += 1
            if key is not None:
                self.f.write(json.dumps(key) + ": ")

    def open(self, key=None, bracket="{"):
        self._next(key)
        self.f.write(bracket)
        self.counts.append(0)

    def close(self, bracket="}"):
        if self.counts.pop():
            self.f.write("\n" + "  " * len(self.counts))
        self.f.write(bracket)

    def member(self, key, value):
        self._next(key)
        self.f.write(json.dumps(value, indent=2).replace("\n", "\n" + "  " * len(self.counts)))

    def item(self, value):
        self.member(None, value)


EXPORT_SKIPPED_SHOWN = 20  # rows left out of an export that its warning names


def export_server(serverdir, target, include_mirrored=False, hard_links=False, quiet=False,
                  storage=None):
    """Write a devpi-compatible dump of the server at ``serverdir`` into ``target`` (new or
    empty). Reads one consistent snapshot, so a running server may go on meanwhile.
    Streams: rows are read with cursors and dataindex.json is written as they come, so
    memory stays flat whatever the number of projects and files.
    Returns a list of lines to tell the user."""
    store = open_store(serverdir, storage)
    if not store.is_initialised():
        raise MinidevpiError("%s contains no minidevpi server" % (
            store if storage else store.serverdir))
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise MinidevpiError("export directory %s must not exist or be empty" % target)
    store.open(readonly=True)
    os.makedirs(target, exist_ok=True)
    root = os.path.realpath(target)
    notes = {}
    told = []
    # rows that no dump may carry (a name or version the API refuses, e.g. from a doctored
    # database): left out with a warning, so the dump imports again and nothing is ever
    # written outside the target (the first few named, the rest counted)
    skipped = []
    nskipped = [0]

    def skip(what):
        nskipped[0] += 1
        if len(skipped) < EXPORT_SKIPPED_SHOWN:
            skipped.append(what)

    users = set()
    devpi_cant_check = []
    root_pwhash = False
    nindexes = nfiles = 0
    tmp = os.path.join(target, ".dataindex.json.tmp")
    f = None
    c = store._connect()
    try:
        c.execute("BEGIN")  # one snapshot for everything below (WAL)
        total = 0
        for ix_id, config in c.execute("SELECT id, config FROM indexes").fetchall():
            if include_mirrored or json.loads(config).get("type") != "mirror":
                total += c.execute("SELECT COUNT(*) FROM files WHERE index_id=?",
                                   (ix_id,)).fetchone()[0]
        progress = Progress("exported", total, quiet)
        f = open(tmp, "w", encoding="utf-8", buffering=COPY_CHUNK)
        out = JsonOut(f)
        out.open()
        out.member("dumpversion", DUMP_VERSION)
        out.member("pythonversion", list(sys.version_info))
        out.member("minidevpi", __version__)
        out.open("users")
        for name, pwhash, config, created, modified in store.rows(
                c, "SELECT name, pwhash, config, created, modified FROM users ORDER BY name"):
            why = refusal(check_user_name, name)
            if why:
                skip("user %r (%s)" % (name, why))
                continue
            u = {"username": name, "created": created}
            if modified:
                u["modified"] = modified
            u.update(json.loads(config))
            if pwhash.startswith("$argon2"):
                u["pwhash"] = pwhash  # devpi's own kind: it can check it
            else:
                # devpi-import keeps the dump's root entry over the root its --root-passwd
                # made: with no pwhash there, that password stays root's
                if name != "root":
                    u["pwhash"] = unusable_argon2()
                    devpi_cant_check.append(name)
                if is_known_hash(pwhash):
                    u["minidevpi_pwhash"] = pwhash
                    u["minidevpi_pwhash_for"] = pwhash_fingerprint(u.get("pwhash", ""))
            if name == "root":
                root_pwhash = bool(u.get("pwhash"))
            users.add(name)
            out.member(name, u)
        out.close()
        out.open("indexes")
        rows = c.execute("SELECT id, user, name, config FROM indexes ORDER BY user, name")
        for ix_id, user, name, config in rows.fetchall():
            config = json.loads(config)
            path = "%s/%s" % (user, name)
            why = refusal(check_index_name, name) or (
                None if user in users else "its user is not exported")
            if why:
                skip("index %r (%s)" % (path, why))
                continue
            nindexes += 1
            out.open(path)
            out.member("indexconfig", config)
            if config.get("type") == "mirror" and not include_mirrored:
                out.close()
                continue
            nfiles += _export_index(store, c, out, ix_id, path, config.get("type") == "mirror",
                                    target, root, hard_links, notes, progress, skip)
            out.close()
        out.close()
        naudit = _export_audit(store, c, target)
        out.close()
        c.execute("COMMIT")
        f.flush()
        os.fsync(f.fileno())
        f.close()
    except BaseException:
        if f is not None:
            f.close()
        _unlink_quiet(tmp)
        raise
    finally:
        c.close()
        store.close()
    os.replace(tmp, os.path.join(target, "dataindex.json"))  # written last: complete dumps only
    told.append("exported %s, %s, %s to %s"
                % (plural(len(users), "user"), plural(nindexes, "index", "indexes"),
                   plural(nfiles, "file"), target))
    told.append("and the audit log: %s (%s)" % (plural(naudit, "record"), AUDIT_DUMP_NAME))
    if notes.get("no_links"):
        told.append(notes["no_links"])
    if skipped:
        told.append("WARNING: not exported, because the API does not accept their names or "
                    "versions (so an import would refuse them): %s%s. Remove or rename them "
                    "on the server and export again." % (
                        "; ".join(skipped),
                        " and %d more" % (nskipped[0] - len(skipped))
                        if nskipped[0] > len(skipped) else ""))
    if "root" in users and not root_pwhash:
        told.append("for devpi-server: root's password does not travel (devpi can't check "
                    "minidevpi's hash); give root one with devpi-import --root-passwd PW "
                    "(without it devpi-import gives root the empty password)")
    if devpi_cant_check:
        told.append("for devpi-server: the password hashes of %s are of a kind devpi can't "
                    "check; after devpi-import they match no password (minidevpi keeps them "
                    "working). With devpi-server running, log in as root and set each:\n  %s"
                    % (", ".join(devpi_cant_check), "\n  ".join(
                        "devpi user -m %s password=..." % n for n in devpi_cant_check)))
    return told


AUDIT_DUMP_NAME = "audit.jsonl"  # our addition to devpi's dump: the audit log, a line each


def _export_audit(store, c, target):
    """The audit log into the dump, a row at a time (never the whole log in memory), from
    the export's snapshot ``c``; returns how many records."""
    n = 0
    with open(os.path.join(target, AUDIT_DUMP_NAME), "w", encoding="ascii") as f:
        for id, record in store.rows(c, "SELECT id, record FROM audit ORDER BY id"):
            f.write(audit_line(id, record))
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def _refuse_json_constant(name):
    raise ValueError("%s is not JSON" % name)


def audit_dump_records(dump):
    """The records of a dump's audit.jsonl, read a line at a time, each checked as the
    untrusted input it is: (id, epoch, actor, action, index, project, record without its
    id). Raises MinidevpiError naming the line of the first bad one. None in the dump
    (devpi's): nothing."""
    try:
        f = open_in_dump(os.path.realpath(dump), AUDIT_DUMP_NAME)
    except FileNotFoundError:
        return
    except DumpFileRefused as e:
        raise MinidevpiError(str(e))
    texts = {"time": 40, "actor": 200, "auth": 40, "address": 200, "forwarded_for": 200,
             "index": 201, "project": 200, "version": 200, "file": 1000}
    with f:
        last_id, last_at, n = 0, 0.0, 0
        while True:
            line = f.readline(AUDIT_LINE_MAX + 1)
            if not line:
                return
            n += 1
            where = "%s line %d" % (AUDIT_DUMP_NAME, n)
            if len(line) > AUDIT_LINE_MAX:
                raise MinidevpiError("%s: longer than %d bytes" % (where, AUDIT_LINE_MAX))
            try:
                record = json.loads(line.decode("utf-8"),
                                    parse_constant=_refuse_json_constant)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise MinidevpiError("%s: not JSON" % where)
            if not isinstance(record, dict):
                raise MinidevpiError("%s: not a JSON object" % where)
            rid, at = record.pop("id", None), record.get("epoch")
            if type(rid) is not int or not last_id < rid < 2 ** 62:
                raise MinidevpiError("%s: id must be a whole number above the line before's"
                                     % where)
            if isinstance(at, bool) or not isinstance(at, (int, float)) or \
                    not last_at <= at < 2 ** 40:
                raise MinidevpiError("%s: epoch must be a time no earlier than the line "
                                     "before's" % where)
            for key, most in texts.items():
                value = record.get(key)
                if value is not None and (not isinstance(value, str) or len(value) > most):
                    raise MinidevpiError("%s: %s must be text of at most %d characters"
                                         % (where, key, most))
            action, actor = record.get("action"), record.get("actor")
            if not isinstance(action, str) or not re.match(r"^[a-z][a-z_.]{0,63}$", action):
                raise MinidevpiError("%s: action must be a name like file.upload" % where)
            if not actor:
                raise MinidevpiError("%s: actor missing" % where)
            index, project = record.get("index"), record.get("project")
            if index is not None and index.count("/") != 1:
                raise MinidevpiError("%s: index must be USER/NAME" % where)
            if project is not None and (refusal(check_project_name, project) or
                                        normalize_name(project) != project):
                raise MinidevpiError("%s: project must be a normalised project name" % where)
            last_id, last_at = rid, at
            yield rid, at, actor, action, index, project, record


def _export_index(store, c, out, ix_id, path, is_mirror, target, root, hard_links, notes,
                  progress, skip):
    """An index's "projects" and "files" into ``out`` in two passes over its rows, one
    project (then one version's files) at a time; copies the files. Returns how many."""

    def version_refusal(norm, display, version):
        return refusal(check_project_name, norm) or refusal(check_version, version) \
            or (None if is_mirror else refusal(check_project_name, display))

    out.open("projects")
    for norm, rows in itertools.groupby(store.rows(
            c, "SELECT p.name, p.display, v.version, v.metadata, v.yanked, EXISTS (SELECT 1 "
            "FROM files f WHERE f.version_id=v.id) FROM versions v JOIN projects p ON "
            "v.project_id=p.id WHERE p.index_id=? ORDER BY p.name, v.id", (ix_id,)),
            key=lambda r: r[0]):
        versions = {}
        for _n, display, version, meta, yanked, has_files in rows:
            why = version_refusal(norm, display, version)
            if why:
                skip("%s %s version %r (%s)" % (path, norm, version, why))
                continue
            if is_mirror:
                if not has_files:
                    continue
                data = {"name": norm, "version": version}
                meta = json.loads(meta)
                if meta.get("requires_python"):
                    data["requires_python"] = meta["requires_python"]
            else:
                data = full_metadata(display, version, json.loads(meta))
            if yanked is not None:
                data["yanked"] = yanked
            versions[version] = data
        if versions:
            out.member(norm, versions)
    out.close()
    out.open("files", "[")
    nfiles = 0
    for vid, vfiles in itertools.groupby(store.rows(
            c, "SELECT v.id, p.name, p.display, v.version, f.filename, f.rel, f.sha256, "
            "f.uploaded, f.for_filename, f.log FROM files f JOIN versions v ON "
            "f.version_id=v.id JOIN projects p ON v.project_id=p.id WHERE p.index_id=? "
            "ORDER BY p.name, v.id, f.id", (ix_id,)), key=lambda r: r[0]):
        vfiles = list(vfiles)  # (one version's files)
        _v, norm, display, version = vfiles[0][:4]
        if version_refusal(norm, display, version):
            continue  # (said in the projects' pass)
        sha_of = {r[4]: r[6] for r in vfiles}
        for _v, _n, _d, _ver, filename, rel, sha, uploaded, for_filename, log_json in vfiles:
            mapping = {"last_modified": http_date(uploaded),
                       "hash_spec": "sha256=" + sha, "hashes": {"sha256": sha},
                       "project": norm, "version": version}
            log_list = json.loads(log_json)
            f = {"type": rel, "projectname": norm, "version": version}
            if rel == "doczip":  # (devpi: named as the project was written)
                relpath = "%s/%s-%s.doc.zip" % (path, display, version)
            elif rel == "toxresult":
                rsha = sha_of.get(for_filename, "")
                relpath = "%s/%s/sha256=%s/%s" % (path, norm, rsha, filename)
                f["for_entrypath"] = file_relpath(path, rsha, for_filename)
            else:
                relpath = "%s/%s/%s/%s" % (path, norm, version, filename)
            dest = os.path.join(target, *relpath.split("/"))
            why = refusal(check_filename, filename) or refusal(check_sha256, sha) or (
                refusal(check_filename, for_filename) if rel == "toxresult" else None) \
                or dump_path_refusal(relpath) or (
                    None if is_inside(root, dest) else "it would be written outside "
                                                       "the export")
            if why:
                skip("%s file %r (%s)" % (path, filename, why))
                continue
            if is_mirror:
                src = [e.get("src") for e in log_list if e.get("what") == "mirror"]
                mapping["url"] = src[0] if src and src[0] else filename
                log_list = []
            f["relpath"] = relpath
            f["entrymapping"] = mapping
            f["log"] = log_list
            blob = store.blob_path(sha)
            if not os.path.exists(blob):
                raise MinidevpiError("the bytes of %s/%s vanished while exporting "
                                     "(removed meanwhile?); run the export again"
                                     % (path, filename))
            _place_file(blob, dest, hard_links, notes)
            progress.add(os.path.getsize(blob))
            out.item(f)
            nfiles += 1
    out.close("]")
    return nfiles


DUMP_CHUNK = 1024 * 1024  # bytes of dataindex.json read at a time
DUMP_VALUE_MAX = 16 * 1024 * 1024  # characters of one value read whole: a user, an index's
#   config, one version's metadata, one file entry (a dump of any size streams past them)
DUMP_INDEXES_MAX = 100000  # indexes in one dump (their configs are held while importing)
DUMP_PROBLEMS_SHOWN = 200  # problems of a refused dump that its message lists
IMPORT_BATCH = 2000  # versions, or files, an import writes per transaction
IMPORT_QUEUE = 32  # files an import hashes and copies at once (queued in a bounded pool)
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


class JsonPull:
    """A JSON document read in bounded chunks from a binary file, one member of an object
    or one item of an array at a time (``members``, ``items``), each small value decoded
    whole by json's own decoder (``value``) but none larger than ``max_value`` characters:
    a dump of many GB is walked in flat memory. Every error says where it was (``where``:
    a path like ``indexes/alice/dev/files[3]``) and raises MinidevpiError."""

    def __init__(self, f, what="dataindex.json", max_value=None):
        self.f = f
        self.what = what
        self.max_value = max_value or DUMP_VALUE_MAX
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoder = json.JSONDecoder()
        self.buf = ""
        self.pos = 0
        self.before = 0  # characters dropped from the front of buf
        self.eof = False

    def error(self, where, why):
        return MinidevpiError("%s is not readable JSON: %s (at %s, character %d)"
                              % (self.what, why, where or "its top", self.before + self.pos))

    def _more(self):
        """Read on, at least as much as is buffered (a long value costs linear time);
        False at the end of the file."""
        if self.eof:
            return False
        self.before += self.pos
        self.buf = self.buf[self.pos:]
        self.pos = 0
        data = self.f.read(max(DUMP_CHUNK, len(self.buf)))
        try:
            self.buf += self.utf8.decode(data, not data)
        except UnicodeDecodeError as e:
            raise self.error("", "not UTF-8 (%s)" % e.reason)
        self.eof = not data
        return not self.eof

    def peek(self, where):
        """The next character that is not white space."""
        while True:
            self.pos = _JSON_SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                raise self.error(where, "it ends too early")

    def _take(self, where, char, expected):
        if self.peek(where) != char:
            raise self.error(where, "%s expected" % expected)
        self.pos += 1

    def value(self, where, raw=False):
        """The next value, decoded (``raw``: also its text, as (value, text))."""
        self.peek(where)
        while True:
            try:
                v, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:  # (a number may go on in the next chunk)
                    text = self.buf[self.pos:end] if raw else None
                    self.pos = end
                    return (v, text) if raw else v
            except json.JSONDecodeError as e:
                cut = e.pos >= len(self.buf) - 2 or e.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    self.pos = e.pos
                    raise self.error(where, "it ends too early (%s)" % e.msg
                                     if self.eof and cut else e.msg)
            except RecursionError:
                raise self.error(where, "nested too deeply")
            if len(self.buf) - self.pos > self.max_value:
                raise self.error(where, "a value larger than %d MB, more than any entry of a "
                                        "dump needs" % (self.max_value // 2 ** 20))
            self._more()

    def _container(self, where, opening, closing, name):
        self._take(where, opening, name)
        if self.peek(where) == closing:
            self.pos += 1
            return
        i = 0
        while True:
            yield i
            i += 1
            c = self.peek(where)
            self.pos += 1
            if c == closing:
                return
            if c != ",":
                self.pos -= 1
                raise self.error(where, "',' or '%s' expected" % closing)

    def members(self, where):
        """The keys of the object that comes next, one at a time: the caller reads each
        key's value (``value``, ``members`` or ``items``) before it asks for the next."""
        for _ in self._container(where, "{", "}", "an object"):
            key = self.value(where)
            if not isinstance(key, str):
                raise self.error(where, "a key that is not a string")
            self._take(where, ":", "':'")
            yield key

    def items(self, where):
        """The positions of the array that comes next, one at a time (read as members)."""
        return self._container(where, "[", "]", "an array")

    def end(self):
        """Nothing but white space after the document."""
        while True:
            self.pos = _JSON_SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                raise self.error("its end", "extra data after the document")
            if not self._more():
                return


class Problems(list):
    """The problems of a dump: the first DUMP_PROBLEMS_SHOWN kept, the rest counted."""

    more = 0

    def append(self, line):
        if len(self) < DUMP_PROBLEMS_SHOWN:
            list.append(self, line)
        else:
            self.more += 1

    def lines(self):
        return list(self) + (["... and %d more" % self.more] if self.more else [])


def _batches(rows, n=None):
    """``rows`` in runs of IMPORT_BATCH, each taken from ``rows`` only as it is read."""
    rows = iter(rows)
    for first in rows:
        yield itertools.chain((first,), itertools.islice(rows, (n or IMPORT_BATCH) - 1))


def _where(*parts):
    """A place in a dump for a message: its keys, each shortened (they are untrusted)."""
    return "/".join(p if len(p) <= 80 else p[:77] + "..." for p in parts)


class DumpScratch:
    """What an import read from dataindex.json, entry by entry, in a scratch SQLite
    database beside the target (deleted with the staging directory): checked and
    imported from here in the order the import needs, whatever order the dump had."""

    SCHEMA = """
    CREATE TABLE head (key TEXT PRIMARY KEY, raw TEXT NOT NULL);
    CREATE TABLE users (name TEXT PRIMARY KEY, raw TEXT NOT NULL);
    CREATE TABLE indexes (seq INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL,
                          raw TEXT NOT NULL);
    CREATE TABLE projects (seq INTEGER PRIMARY KEY, ix INTEGER NOT NULL, pname TEXT NOT NULL,
                           UNIQUE (ix, pname));
    CREATE TABLE versions (seq INTEGER PRIMARY KEY, ix INTEGER NOT NULL, pname TEXT NOT NULL,
                           ver TEXT, raw TEXT NOT NULL, UNIQUE (ix, pname, ver));
    --  (ver NULL: the project's versions were not an object, raw is what they were)
    CREATE TABLE files (seq INTEGER PRIMARY KEY, ix INTEGER NOT NULL, raw TEXT NOT NULL);
    CREATE TABLE registered (ix INTEGER, norm TEXT, ver TEXT, PRIMARY KEY (ix, norm, ver))
        WITHOUT ROWID;
    CREATE TABLE staged (rel TEXT PRIMARY KEY, sha TEXT NOT NULL, size INTEGER NOT NULL,
                         dest TEXT, core TEXT, core_path TEXT, core_none INTEGER)
        WITHOUT ROWID;
    CREATE TABLE vids (ix INTEGER, norm TEXT, ver TEXT, vid INTEGER, rp TEXT,
                       PRIMARY KEY (ix, norm, ver)) WITHOUT ROWID;
    """

    def __init__(self, directory):
        self.c = sqlite3.connect(os.path.join(directory, "dump.sqlite3"), isolation_level=None,
                                 check_same_thread=False)
        self.c.execute("PRAGMA journal_mode=OFF")
        self.c.execute("PRAGMA synchronous=OFF")
        self.c.executescript(self.SCHEMA)
        self.c.execute("BEGIN")

    def close(self):
        self.c.close()

    def count(self, table, where="", args=()):
        return self.c.execute("SELECT COUNT(*) FROM %s %s" % (table, where), args).fetchone()[0]

    def head(self, key, default=None):
        row = self.c.execute("SELECT raw FROM head WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def user_names(self):
        return [r[0] for r in self.c.execute("SELECT name FROM users")]

    def has_user(self, name):
        return self.c.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone() is not None

    def users(self):
        """(name, entry), by name."""
        for name, raw in self.c.execute("SELECT name, raw FROM users ORDER BY name"):
            yield name, json.loads(raw)

    def indexes(self):
        """{path: (seq, entry without projects and files)}: the few indexes, in dump order."""
        return {path: (seq, json.loads(raw)) for seq, path, raw in self.c.execute(
            "SELECT seq, path, raw FROM indexes ORDER BY seq")}

    def versions(self, ix):
        """(project, version or None, its entry) in dump order: a project's versions were
        one object in the dump, each version is a row here."""
        for pname, ver, raw in self.c.execute("SELECT pname, ver, raw FROM versions WHERE "
                                              "ix=? ORDER BY seq", (ix,)):
            yield pname, ver, json.loads(raw)

    def files(self, ix):
        for (raw,) in self.c.execute("SELECT raw FROM files WHERE ix=? ORDER BY seq", (ix,)):
            yield json.loads(raw)


def _read_dump(dump, scratch):
    """Read dataindex.json of a dump into ``scratch``, one entry at a time (checked for
    shape here, for content by check_dump); raises MinidevpiError where it is not a dump.
    Returns the list of problems found (duplicate names: json.load would keep only one)."""
    path = os.path.join(dump, "dataindex.json")
    if not os.path.isfile(path):
        raise MinidevpiError("%s has no dataindex.json: not an export directory "
                             "(or an incomplete one)" % dump)
    problems = Problems()
    try:
        with open_in_dump(os.path.realpath(dump), "dataindex.json") as f:
            reader = JsonPull(f)
            if reader.peek("") != "{":
                raise MinidevpiError("dataindex.json is not a JSON object")
            _read_dump_members(reader, scratch, problems)
            reader.end()
    except DumpFileRefused as e:
        raise MinidevpiError("the export at %s can't be imported: %s" % (dump, e))
    if str(scratch.head("dumpversion")) not in ("1", "2"):
        raise MinidevpiError("incompatible dumpversion: %r (1 and 2 are understood)"
                             % (scratch.head("dumpversion"),))
    if scratch.head("users") is not True or scratch.head("indexes") is not True:
        raise MinidevpiError("dataindex.json needs 'users' and 'indexes' objects")
    return problems


def _read_dump_members(reader, scratch, problems):
    c = scratch.c

    def unique(sql, args, what):
        try:
            return c.execute(sql, args).lastrowid
        except sqlite3.IntegrityError:
            problems.append("%s appears twice in dataindex.json" % what)

    for key in reader.members(""):
        if key in ("users", "indexes") and reader.peek(key) == "{":
            c.execute("INSERT OR REPLACE INTO head VALUES (?, 'true')", (key,))
            for name in reader.members(key):
                where = _where(key, name)
                if key == "users":
                    unique("INSERT INTO users VALUES (?,?)", (name, reader.value(where, True)[1]),
                           "user %r" % name)
                else:
                    _read_dump_index(reader, scratch, name, where, unique)
        else:
            v, raw = reader.value(key, True)
            c.execute("INSERT OR REPLACE INTO head VALUES (?,?)",
                      (key, "false" if key in ("users", "indexes") else raw))


def _read_dump_index(reader, scratch, path, where, unique):
    """One index of the dump: its projects and files into the scratch rows as they come;
    its other keys (indexconfig) kept together."""
    c = scratch.c
    seq = unique("INSERT INTO indexes (path, raw) VALUES (?, '{}')", (path,), "index %r" % path)
    if seq is not None and seq > DUMP_INDEXES_MAX:
        raise reader.error(where, "more than %d indexes" % DUMP_INDEXES_MAX)
    if reader.peek(where) != "{":
        v, raw = reader.value(where, True)
        if seq is not None:
            c.execute("UPDATE indexes SET raw=? WHERE seq=?", (raw, seq))
        return
    entry = {}
    for key in reader.members(where):
        w = _where(where, key)
        if key == "projects" and reader.peek(w) == "{" and seq is not None:
            for pname in reader.members(w):
                _read_dump_project(reader, c, seq, path, pname, _where(w, pname), unique)
        elif key == "files" and reader.peek(w) == "[" and seq is not None:
            for i in reader.items(w):
                c.execute("INSERT INTO files (ix, raw) VALUES (?,?)",
                          (seq, reader.value("%s[%d]" % (w, i), True)[1]))
        else:
            entry[key] = reader.value(w)  # (the index's config: small)
    entry.setdefault("projects", {})
    entry.setdefault("files", [])
    if seq is not None:
        c.execute("UPDATE indexes SET raw=? WHERE seq=?", (json.dumps(entry), seq))


def _read_dump_project(reader, c, seq, path, pname, where, unique):
    """One project's versions, one version at a time (a project of many versions with long
    descriptions is larger than any one value read whole)."""
    unique("INSERT INTO projects (ix, pname) VALUES (?,?)", (seq, pname),
           "%s: project %r" % (path, pname))
    add = "INSERT INTO versions (ix, pname, ver, raw) VALUES (?,?,?,?)"
    if reader.peek(where) != "{":
        c.execute(add, (seq, pname, None, reader.value(where, True)[1]))
        return
    for ver in reader.members(where):
        unique(add, (seq, pname, ver, reader.value(_where(where, ver), True)[1]),
               "%s: project %r version %r" % (path, pname, ver))


def check_dump(dump, scratch, skip_types=(), progress=None, stage_dir=None, hard_links=False,
               notes=None, problems=None):
    """Every problem of a dump read into ``scratch``, as a list of lines (empty: fine).
    Hashes every file, a few at a time in a bounded pool.

    With ``stage_dir``, each file is also copied (or linked) there while it is read, so an
    import reads every file once; the scratch table ``staged`` maps relpath -> (sha256,
    staged path, a wheel's staged core metadata).
    """
    import concurrent.futures
    dump = os.path.realpath(dump)
    problems = problems if problems is not None else Problems()
    notes = notes if notes is not None else {}
    sc = scratch.c
    nqueued = [0]
    inflight = {}  # relpath -> job: the same file in two indexes is read once
    window = collections.deque()  # (index path, relpath, sha256 wanted, job), oldest first
    pool = concurrent.futures.ThreadPoolExecutor(4)

    def settle(path, rel, want, job):
        try:
            got, size, dest, core = job.result()
        except FileNotFoundError:
            problems.append("%s: the file at %s is missing" % (path, rel))
            return
        except IsADirectoryError:
            problems.append("%s: the file at %s is not a file" % (path, rel))
            return
        except DumpFileRefused as e:
            problems.append("%s: %s" % (path, e))
            return
        if inflight.get(rel) is job:
            del inflight[rel]
            sc.execute("INSERT OR IGNORE INTO staged VALUES (?,?,?,?,?,?,?)",
                       (rel, got, size, dest, core[0] if core else None,
                        core[1] if core else None, 1 if core is False else 0))
        if want is not None and got != want:
            problems.append("%s: %s: sha256 mismatch" % (path, rel))
        if progress is not None:
            progress.add(size)

    def queue(path, rel, want, wheel):
        job = inflight.get(rel)
        if job is None:
            row = sc.execute("SELECT sha, size FROM staged WHERE rel=?", (rel,)).fetchone()
            if row is not None:  # read already
                if want is not None and row[0] != want:
                    problems.append("%s: %s: sha256 mismatch" % (path, rel))
                if progress is not None:
                    progress.add(row[1])
                return
            dest = None
            if stage_dir is not None:
                dest = os.path.join(stage_dir, "%d" % nqueued[0])
            nqueued[0] += 1
            job = inflight[rel] = pool.submit(_stage_file, dump, rel, dest, hard_links, notes,
                                              wheel)
        window.append((path, rel, want, job))
        while len(window) > IMPORT_QUEUE:
            settle(*window.popleft())

    try:
        for name in scratch.user_names():
            why = refusal(check_user_name, name)
            if why:
                problems.append("user %r: %s" % (name, why))
        for name, u in scratch.users():
            if not isinstance(u, dict):
                problems.append("user %r: not an object" % name)
            elif name == "root":
                for k in SERVER_POLICY_KEYS:  # (another user's are dropped on import)
                    if k in u:
                        try:
                            check_reserved_namespaces(u[k]) if k == "reserved_namespaces" \
                                else check_policy_entries(k, u[k])
                        except HTTPError as e:
                            problems.append("user root: %s" % e.message)
        indexes = scratch.indexes()
        for path, (seq, ix) in indexes.items():
            if not isinstance(ix, dict) or not isinstance(ix.get("indexconfig"), dict) \
                    or "type" not in ix["indexconfig"]:
                problems.append("index %r: no indexconfig with a type" % path)
                continue
            user, sep, name = path.partition("/")
            why = refusal(check_user_name, user) or refusal(check_index_name, name)
            if why:
                problems.append("index %r: %s" % (path, why))
                continue
            if not scratch.has_user(user):
                problems.append("index %r: its user %r is not in the dump" % (path, user))
            for k in POLICY_KEYS:
                if k in ix["indexconfig"]:
                    try:
                        check_policy_entries(k, ix["indexconfig"][k])
                    except HTTPError as e:
                        problems.append("index %r: %s" % (path, e.message))
            ixtype = ix["indexconfig"]["type"]
            if ixtype not in ("stage", "mirror") and ixtype not in skip_types:
                problems.append("index %r: unknown index type %r (use --skip-import-type %s "
                                "to leave it out)" % (path, ixtype, ixtype))
            if not isinstance(ix["projects"], dict):
                problems.append("index %r: 'projects' is not an object" % path)
                continue
            last, refused = None, None
            for pname, ver, vdata in scratch.versions(seq):
                if pname != last:
                    last, refused = pname, refusal(check_project_name, pname)
                    if refused:
                        problems.append("%s: project %s" % (path, refused))
                if refused:
                    continue
                if ver is None:
                    problems.append("%s/%s: versions are not an object" % (path, pname))
                    continue
                sc.execute("INSERT OR IGNORE INTO registered VALUES (?,?,?)",
                           (seq, normalize_name(pname), ver))
                if not isinstance(vdata, dict) or not vdata.get("name"):
                    problems.append('%s/%s %s: missing required field "name"'
                                    % (path, pname, ver))
                elif any(k.startswith("+") for k in vdata):
                    problems.append("%s/%s %s: unexpected '+' keys" % (path, pname, ver))
                else:
                    why = refusal(check_version, ver) or refusal(
                        check_version, str(vdata.get("version") or ver)) or refusal(
                        check_project_name, vdata["name"])
                    if why:
                        problems.append("%s/%s %r: %s" % (path, pname, ver, why))
            if not isinstance(ix["files"], list):
                problems.append("index %r: 'files' is not a list" % path)
                continue
            for f in scratch.files(seq):
                if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in (
                        "type", "projectname", "relpath")):
                    problems.append("%s: a file entry without type/projectname/relpath"
                                    % path)
                    continue
                rel = f["relpath"]
                parts = rel.split("/")
                why = dump_path_refusal(rel) or refusal(check_filename, parts[-1]) or refusal(
                    check_project_name, f["projectname"]) or refusal(check_version,
                                                                     _version_of(f))
                if not why and f["type"] == "toxresult" and f.get("for_entrypath"):
                    why = refusal(check_filename, str(f["for_entrypath"]).rsplit("/", 1)[-1])
                if why:
                    problems.append("%s: file %r: %s" % (path, rel, why))
                    continue
                if f["type"] not in ("releasefile", "doczip", "toxresult"):
                    problems.append("%s: file %s has unknown type %r" % (path, rel, f["type"]))
                norm = normalize_name(f["projectname"])
                if sc.execute("SELECT 1 FROM registered WHERE ix=? AND norm=? LIMIT 1",
                              (seq, norm)).fetchone() is None:
                    problems.append("%s: file %s belongs to project %r, which is not in the "
                                    "dump" % (path, rel, f["projectname"]))
                elif f["type"] == "releasefile" and sc.execute(
                        "SELECT 1 FROM registered WHERE ix=? AND norm=? AND ver=?",
                        (seq, norm, _version_of(f))).fetchone() is None:
                    problems.append("%s: file %s belongs to version %r, not registered"
                                    % (path, rel, f.get("version")))
                if ixtype == "mirror" and f["type"] == "releasefile" and not (
                        isinstance(f.get("entrymapping"), dict) and f["entrymapping"].get("url")):
                    problems.append("%s: mirrored file %s has no entrymapping.url"
                                    % (path, rel))
                # the files are read (hashed, copied, a wheel's metadata taken) by a few
                # threads: the reading waits on the disk, the hashing and copying let go of
                # the GIL
                queue(path, rel, _want_sha256(f), f["type"] == "releasefile"
                      and rel.endswith(".whl"))
        while window:
            settle(*window.popleft())
    finally:
        for job in inflight.values():
            job.cancel()
        pool.shutdown()
    cyc = _base_cycle({path: ix for path, (seq, ix) in indexes.items()})
    if cyc:
        problems.append("the bases of these indexes form a cycle: %s" % ", ".join(cyc))
    try:
        for _record in audit_dump_records(dump):
            pass
    except MinidevpiError as e:
        problems.append(e.message)
    return problems


def _stage_file(dump, rel, dest, hard_links, notes, wheel=False):
    """Hash the dump's file ``rel`` (opened by open_in_dump: never through a link) and,
    given a ``dest``, link or copy it there, reading it once. What is hashed is what is
    kept: a hard link is checked to be the very file that was opened.
    Returns (sha256, size, dest or None, a wheel's core metadata or None)."""
    h = hashlib.sha256()
    size = 0
    with open_in_dump(dump, rel) as fin:
        linked = False
        if dest is not None and hard_links and not notes.get("no_links"):
            try:
                os.link(os.path.join(dump, *rel.split("/")), dest, follow_symlinks=False)
                linked = True
            except OSError as e:
                notes["no_links"] = "hard links are not possible here (%s): files were copied" % e
        if linked:
            opened, placed = os.fstat(fin.fileno()), os.lstat(dest)
            if (opened.st_dev, opened.st_ino) != (placed.st_dev, placed.st_ino):
                _unlink_quiet(dest)
                raise DumpFileRefused("%s changed while it was read" % rel)
            size = copy_hashed(fin, None, h)
            return h.hexdigest(), size, dest, _core_or_none(dest, wheel)
        with contextlib.ExitStack() as stack:
            fout = stack.enter_context(open(dest, "wb")) if dest is not None else None
            size = copy_hashed(fin, fout, h)
    if dest is None:
        return h.hexdigest(), size, None, None
    return h.hexdigest(), size, dest, _core_or_none(dest, wheel)


def _core_or_none(path, wheel):
    """A wheel's METADATA, read right after the copy (still in the page cache) and
    staged beside it: (sha256, path), or False for a wheel without one."""
    if not wheel:
        return None
    try:
        data = read_core_metadata(path, os.path.basename(path) + ".whl")
    except HTTPError:
        data = None
    if not data:
        return False
    with open(path + ".metadata", "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest(), path + ".metadata"


def _version_of(f):
    """The version a file entry belongs to: its ``version``, or (dumpversion 1) the one in
    its file name."""
    if f.get("version"):
        return str(f["version"])
    return filename_version(os.path.basename(f["relpath"]))


def _want_sha256(f):
    em = f.get("entrymapping") if isinstance(f.get("entrymapping"), dict) else {}
    hashes = em.get("hashes") if isinstance(em.get("hashes"), dict) else {}
    if hashes.get("sha256"):
        return str(hashes["sha256"]).lower()
    spec = em.get("hash_spec") or ""
    if isinstance(spec, str) and spec.startswith("sha256="):
        return spec[7:].lower()
    return None


def _base_cycle(indexes):
    graph = {p: [b for b in (ix.get("indexconfig", {}).get("bases") or []) if b in indexes]
             for p, ix in indexes.items() if isinstance(ix, dict)}
    state = {}
    for start in graph:
        stack = [(start, iter(graph[start]))]
        state[start] = state.get(start, 0) or 1
        if state[start] == 2:
            continue
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [n for n, _ in stack]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(graph.get(nxt, []))))
    return []


def import_server(dump, serverdir, root_password=None, root_pwhash=None, root_pypi=True,
                  skip_types=(), hard_links=False, quiet=False, storage=None):
    """Create a server at ``serverdir`` (new or empty) from a devpi or minidevpi dump.

    Everything is checked first (every file's sha256 included); a damaged dump is refused
    with the list of problems and nothing is written. The server is built beside the
    target and moved into place only when complete. dataindex.json is read as a stream
    (JsonPull) into a scratch database beside the target, so memory stays flat whatever
    the size of the dump. Returns lines to tell the user. ``storage``: PostgreSQL's
    settings (parse_storage) to import into its database (empty: no minidevpi tables),
    with ``serverdir`` as the importing process's local directory.
    """
    check_root_pwhash(root_pwhash)  # the arguments first, before the long checks
    if storage and open_store(serverdir, storage).is_initialised():
        raise MinidevpiError("the database %s already holds a server: import into an empty "
                             "database" % open_store(serverdir, storage))
    dump = os.path.abspath(dump)
    serverdir = os.path.abspath(serverdir)
    if os.path.exists(serverdir) and (not os.path.isdir(serverdir) or os.listdir(serverdir)):
        raise MinidevpiError("%s must be new or empty to import into" % serverdir)
    if not os.path.isfile(os.path.join(dump, "dataindex.json")):
        raise MinidevpiError("%s has no dataindex.json: not an export directory "
                             "(or an incomplete one)" % dump)
    parent = os.path.dirname(serverdir)
    os.makedirs(parent, exist_ok=True)
    notes = {}
    # files are checked and copied in one read, beside the target (same file system)
    staging = tempfile.mkdtemp(prefix=".import-files-", dir=parent)
    scratch = None
    try:
        scratch = DumpScratch(staging)
        problems = _read_dump(dump, scratch)
        dump_types = {ix["indexconfig"].get("type") for _s, ix in scratch.indexes().values()
                      if isinstance(ix, dict) and isinstance(ix.get("indexconfig"), dict)}
        unknown = sorted(set(skip_types) - {"stage", "mirror"} - dump_types)
        if unknown:
            raise MinidevpiError("--skip-import-type %s: no index of that type in the export "
                                 "(its types: %s)" % (", ".join(unknown), ", ".join(sorted(
                                     t for t in dump_types if isinstance(t, str))) or "none"))
        nfiles = scratch.count("files")
        check_dump(dump, scratch, skip_types, Progress("checked", nfiles, quiet),
                   stage_dir=staging, hard_links=hard_links, notes=notes, problems=problems)
        if problems:
            raise MinidevpiError("the export at %s can't be imported:\n  %s"
                                 % (dump, "\n  ".join(problems.lines())))
        return _import_checked(dump, scratch, serverdir, parent, notes, nfiles, root_password,
                               root_pwhash, root_pypi, skip_types, hard_links, quiet, storage)
    finally:
        if scratch is not None:
            scratch.close()
        shutil.rmtree(staging, ignore_errors=True)


def _import_checked(dump, scratch, serverdir, parent, notes, nfiles, root_password,
                    root_pwhash, root_pypi, skip_types, hard_links, quiet, storage):
    building = tempfile.mkdtemp(prefix=".import-", dir=parent)
    told = []
    store = None
    try:
        os.rmdir(building)
        indexes = scratch.indexes()
        has_pypi = "root/pypi" in indexes
        store, model = init_serverdir(
            building, root_password=root_password if root_pwhash is None else None,
            root_pwhash=root_pwhash, root_pypi=root_pypi and not has_pypi,
            root_unusable=root_password is None and root_pwhash is None, audit=False,
            storage=storage)
        model.context.begin(command_line=True, quiet=True)  # (the dump's log, then one record)
        store.sync_each_blob = False  # 10,000 fsyncs cost more than the copying
        needs_password, stale = _import_users(store, scratch.users(), root_password,
                                              root_pwhash,
                                              own_export=scratch.head("minidevpi") is not None)
        if "root" in needs_password or (not scratch.has_user("root") and root_password is None
                                        and root_pwhash is None):
            # nobody could set passwords: give root a working one and say it once
            generated = secrets.token_urlsafe(12)
            model.accounts.set_password_hash("root", hash_password(generated))
            if "root" in needs_password:
                needs_password.remove("root")
            told.append("root's password in the dump can't be checked here (or there was "
                        "none); root's new password (shown only now): %s" % generated)
        nindexes = _import_indexes(store, model, dump, scratch, indexes, root_pypi,
                                   skip_types, hard_links, notes, told,
                                   Progress("imported", nfiles, quiet))
        _import_audit(store, model, dump, scratch.count("users"), nindexes, told)
        SearchIndex(store).fill()
        store.fix_ids()
        store.close()
        # everything copied and written is on disk before the server exists under its
        # name: one sync instead of one per file
        os.sync()
        if os.path.isdir(serverdir):
            os.rmdir(serverdir)  # empty, checked above
        os.rename(building, serverdir)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        if storage and store is not None:  # (the tables it wrote into the database go too)
            store.close()
            store.destroy()
        raise
    told.insert(0, "imported %s and %s from %s into %s" % (
        plural(scratch.count("users"), "user"), plural(nindexes, "index", "indexes"), dump,
        serverdir))
    if notes.get("no_links"):
        told.append(notes["no_links"])
    if stale:
        told.append("the passwords of these users were changed on the devpi side after "
                    "minidevpi exported them: minidevpi's older password hash was dropped and "
                    "devpi's newer one kept: %s" % ", ".join(stale))
    if needs_password:
        told.append("these users have a password hash minidevpi can't check (devpi's Argon2) "
                    "or none at all, so they can't log in until root sets a password: %s. "
                    "As root: devpi user -m NAME password=..." % ", ".join(needs_password))
    return told


def _import_audit(store, model, dump, nusers, nindexes, told):
    """The dump's audit log (checked by check_dump), its ids and times kept, then the
    record of this import."""
    with store.write() as c:
        n = 0
        for rid, at, actor, action, index, project, record in audit_dump_records(dump):
            store.insert_audit(c, at, actor, action, index, project, record, id=rid)
            n += 1
        store.fix_ids()  # (the import's own record numbered after the dump's)
        model.context.begin(command_line=True)
        model.audit(c, None, "server.import", records=n, users=nusers, indexes=nindexes)
    if n:
        told.append("kept the %s of the export's audit log" % plural(n, "record"))


def _import_users(store, users, root_password, root_pwhash, own_export=False):
    """Returns (users who need a new password, users whose minidevpi hash was stale).
    ``users``: (name, entry) by name.

    ``minidevpi_pwhash`` is used only while the devpi-side ``pwhash`` is still the one the
    export wrote beside it (``minidevpi_pwhash_for``): a password changed on the devpi side
    since then wins. Exports from before that fingerprint are trusted only as minidevpi
    wrote them (``own_export``), never after a trip through devpi."""
    needs, stale = [], []
    for batch in _batches(users):
        with store.write() as c:
            for name, u in batch:
                own = u.get("minidevpi_pwhash")
                if isinstance(own, str) and is_known_hash(own):
                    written_for = u.get("minidevpi_pwhash_for")
                    devpi_hash = u.get("pwhash") if isinstance(u.get("pwhash"), str) else ""
                    if written_for is None and own_export:
                        fresh = True
                    else:
                        fresh = isinstance(written_for, str) and hmac.compare_digest(
                            written_for, pwhash_fingerprint(devpi_hash)) and "pwsalt" not in u
                    if not fresh:
                        stale.append(name)
                        own = None
                if isinstance(own, str) and is_known_hash(own):
                    pwhash = own
                elif isinstance(u.get("pwsalt"), str) and isinstance(u.get("pwhash"), str):
                    pwhash = legacy_devpi_hash(u["pwsalt"], u["pwhash"])
                elif isinstance(u.get("pwhash"), str) and (is_known_hash(u["pwhash"])
                                                           or u["pwhash"].startswith("$argon2")):
                    pwhash = u["pwhash"]
                else:
                    pwhash = "!none"  # no password matches (devpi would give it the empty one)
                if name == "root" and (root_password is not None or root_pwhash is not None):
                    # --root-passwd always gives root a working password
                    pwhash = c.execute(
                        "SELECT pwhash FROM users WHERE name='root'").fetchone()[0]
                elif not is_known_hash(pwhash):
                    needs.append(name)
                # profile fields, and any other key devpi kept (plugins'): they survive
                config = {k: v for k, v in u.items() if k not in (
                    "pwhash", "pwsalt", "username", "created", "modified", "minidevpi_pwhash",
                    "minidevpi_pwhash_for", "password", "indexes")}
                for k in SERVER_POLICY_KEYS:  # the server-wide rules: root's record only
                    if k in config and name != "root":
                        del config[k]
                    elif k in config:
                        try:
                            config[k] = check_reserved_namespaces(config[k]) \
                                if k == "reserved_namespaces" else check_policy_entries(
                                    k, config[k])
                        except HTTPError as e:
                            raise MinidevpiError("user root: %s" % e.message)
                created = u.get("created") if isinstance(u.get("created"), str) \
                    else "1970-01-01T00:00:00Z"
                modified = u.get("modified") if isinstance(u.get("modified"), str) else None
                c.execute("INSERT INTO users (name, pwhash, config, created, modified) "
                          "VALUES (?,?,?,?,?) ON CONFLICT (name) DO UPDATE SET "
                          "pwhash=excluded.pwhash, config=excluded.config, "
                          "created=excluded.created, modified=excluded.modified",
                          (name, pwhash, json.dumps(config), created, modified))
    return needs, stale


def _import_indexes(store, model, dump, scratch, indexes, root_pypi, skip_types, hard_links,
                    notes, told, progress):
    """Returns how many indexes were imported (the skipped ones are said in ``told``)."""
    imported = 0
    for path, (seq, ix) in sorted(indexes.items()):
        config = dict(ix["indexconfig"])
        if config["type"] in skip_types:
            told.append("skipped index %s of type %r" % (path, config["type"]))
            continue
        if path == "root/pypi" and not root_pypi:
            told.append("skipped root/pypi (--no-root-pypi)")
            continue
        user = path.split("/", 1)[0]
        if "pypi_whitelist" in config:
            config.setdefault("mirror_whitelist", config.pop("pypi_whitelist"))
        allowed = STAGE_KEYS if config["type"] == "stage" else MIRROR_KEYS
        dropped = sorted(k for k in config if k not in allowed)
        for k in dropped:
            config.pop(k)
        if dropped:
            told.append("index %s: dropped settings minidevpi does not know: %s"
                        % (path, ", ".join(dropped)))
        for k in ("mirror_min_age", "mirror_min_age_exempt", "refuse_private",
                  "mirror_keep_removed") + POLICY_KEYS:  # read by every page, upload, walk
            if k in config:
                try:
                    config[k] = coerce_index_value(k, config[k])
                except HTTPError as e:
                    raise MinidevpiError("index %s: %s%s" % (
                        path, "" if k in e.message else k + ": ", e.message))
        for k, v in index_defaults(config["type"], user).items():
            config.setdefault(k, v)
        with store.write() as c:
            ix_id = store.insert_index(c, user, path.split("/", 1)[1], config)
        _import_releases(store, ix_id, path, seq, ix["indexconfig"]["type"] == "mirror",
                         scratch, notes, progress)
        imported += 1
    # bases left out (skipped, or not in the export) would make the index unmodifiable
    with store.write() as c:
        existing = {"%s/%s" % (u, n) for u, n in c.execute("SELECT user, name FROM indexes")}
        for ix_id, user, name, config in c.execute(
                "SELECT id, user, name, config FROM indexes").fetchall():
            config = json.loads(config)
            missing = [b for b in config.get("bases", []) if b not in existing]
            if missing:
                config["bases"] = [b for b in config["bases"] if b in existing]
                c.execute("UPDATE indexes SET config=? WHERE id=?", (json.dumps(config), ix_id))
                told.append("index %s/%s: dropped bases that are not there: %s"
                            % (user, name, ", ".join(missing)))
    return imported


def _import_releases(store, ix_id, path, seq, is_mirror, scratch, notes, progress):
    """An index's projects, versions and files, from the scratch rows, IMPORT_BATCH rows a
    transaction (the server being built is not anyone's yet: a failure removes it)."""
    sc = scratch.c
    for batch in _batches(scratch.versions(seq)):
        with store.write() as c:
            for pname, ver, vdata in batch:
                if ver is None:
                    continue  # (refused by check_dump)
                norm = normalize_name(pname)
                display = vdata.get("name") or pname
                row = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                                (ix_id, norm)).fetchone()
                pid = row["id"] if row else c.execute(
                    "INSERT INTO projects (index_id, name, display) VALUES (?,?,?)",
                    (ix_id, norm, norm if is_mirror else display)).lastrowid
                meta = {k: v for k, v in vdata.items() if k not in (
                    "name", "version", "yanked") and not k.startswith("+")
                    and k != ":action"}
                yanked = vdata.get("yanked")
                if yanked is True:
                    yanked = ""
                elif yanked is False:
                    yanked = None
                version = str(vdata.get("version") or ver)
                vid = c.execute("INSERT INTO versions (project_id, version, metadata, "
                                "yanked, created) VALUES (?,?,?,?,?) ON CONFLICT DO NOTHING",
                                (pid, version, json.dumps(meta), yanked,
                                 time.time())).lastrowid
                sc.execute("INSERT OR REPLACE INTO vids VALUES (?,?,?,?,?)",
                           (seq, norm, str(ver), vid, meta.get("requires_python", "") or ""))
    for batch in _batches(scratch.files(seq)):
        with store.write() as c:
            for f in batch:
                _import_file(store, c, ix_id, path, seq, is_mirror, sc, f, progress)


def _import_file(store, c, ix_id, path, seq, is_mirror, sc, f, progress):
    norm = normalize_name(f["projectname"])
    version = _version_of(f)
    row = sc.execute("SELECT vid, rp FROM vids WHERE ix=? AND norm=? AND ver=?",
                     (seq, norm, version)).fetchone()
    if row is None:
        # a doc zip or tox result of an unregistered version: register it bare
        pid = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                        (ix_id, norm)).fetchone()[0]
        vid = c.execute("INSERT INTO versions (project_id, version, metadata, created) "
                        "VALUES (?,?,?,?)", (pid, version, "{}", time.time())).lastrowid
        sc.execute("INSERT INTO vids VALUES (?,?,?,?,?)", (seq, norm, version, vid, ""))
        row = (vid, "")
    vid, requires_python = row
    # read, hashed and copied once by check_dump (never through a link): the dump itself
    # is not read again
    sha, tmp, core, core_tmp, core_none = sc.execute(
        "SELECT sha, dest, core, core_path, core_none FROM staged WHERE rel=?",
        (f["relpath"],)).fetchone()
    dest = store.place_blob(tmp, sha)
    filename = os.path.basename(f["relpath"])
    if f["type"] == "doczip":  # stored under the name an upload gives it
        filename = "%s-%s.doc.zip" % (norm, version)
    em = f.get("entrymapping") if isinstance(f.get("entrymapping"), dict) else {}
    uploaded = _http_date_ts(em.get("last_modified")) or time.time()
    log_list = f.get("log")
    if not isinstance(log_list, list):
        log_list = [{"what": "upload", "who": "<import>", "when": when_list(),
                     "dst": path}]
    if is_mirror:
        log_list = [{"what": "mirror", "who": None, "when": when_list(uploaded),
                     "src": em.get("url")}]
    meta_sha = None
    if filename.endswith(".whl") and f["type"] == "releasefile":
        if core:
            meta_sha = core
            store.place_blob(core_tmp, core)
        elif not core_none:
            try:
                meta_bytes = read_core_metadata(dest, filename)
            except HTTPError:
                meta_bytes = None
            meta_sha = store.put_bytes(meta_bytes) if meta_bytes else None
    for_filename = None
    if f["type"] == "toxresult":
        for_filename = os.path.basename(f.get("for_entrypath") or "") or None
    size = os.path.getsize(dest)
    store.insert_file(c, ix_id, vid, filename, f["type"], sha, size, uploaded,
                      requires_python if f["type"] == "releasefile" else "", meta_sha,
                      for_filename, log_list, replace=True)
    progress.add(size)


# ===================================================================================
# 9. embedding
# ===================================================================================


class Server:
    """A minidevpi server in this process, for test suites and scripts::

        with minidevpi.Server() as srv:
            srv.create_user("alice", "secret")
            srv.create_index("alice/dev")
            url = srv.upload("alice/dev", "dist/pkg-1.0-py3-none-any.whl")
            subprocess.run([sys.executable, "-m", "pip", "install",
                            "--index-url", srv.index_url("alice/dev"), "pkg"])

    ``serverdir=None`` uses a temporary directory that ``stop()`` removes. ``port=0``
    picks a free port. Several servers can run in one process; they share nothing.
    """

    def __init__(self, serverdir=None, *, host=DEFAULT_HOST, port=0, root_password=None,
                 mirror_url=None, offline=False, outside_url=None, access_log=False,
                 max_request_body_size=DEFAULT_MAX_BODY,
                 mirror_timeouts=(MIRROR_CONNECT_TIMEOUT, MIRROR_READ_TIMEOUT),
                 max_threads=DEFAULT_THREADS, connection_timeout=DEFAULT_CONNECTION_TIMEOUT,
                 mirror_allow_hosts=(), restrict_reads=False, user_create=None,
                 mirror_min_rate=MIRROR_MIN_RATE, mirror_creators=None, storage=None):
        self._serverdir_arg = serverdir
        self.storage = storage
        self.mirror_creators = check_mirror_creators_option(mirror_creators)
        self.mirror_min_rate = mirror_min_rate
        self.restrict_reads = restrict_reads
        self.user_create = check_user_create_option(user_create)
        self.host = host
        self._port_arg = port
        self.root_password = root_password
        self.mirror_url = mirror_url
        self.offline = offline
        self.outside_url = outside_url
        self.access_log = access_log
        self.max_request_body_size = max_request_body_size
        self.mirror_timeouts = mirror_timeouts
        self.max_threads = max_threads
        self.connection_timeout = connection_timeout
        self.mirror_allow_hosts = mirror_allow_hosts
        self.serverdir = None
        self.port = None
        self.url = None
        self.model = None
        self._httpd = None
        self._thread = None
        self._tmpdir = None

    def start(self):
        if self._httpd is not None:
            return self
        if self._serverdir_arg is None:
            self._tmpdir = tempfile.mkdtemp(prefix="minidevpi-")
            self.serverdir = self._tmpdir
        else:
            self.serverdir = os.path.abspath(str(self._serverdir_arg))
        try:
            self._httpd = IndexHTTPServer((self.host, self._port_arg), None,
                                          access_log=self.access_log,
                                          max_threads=self.max_threads,
                                          connection_timeout=self.connection_timeout)
            store = open_store(self.serverdir, self.storage)
            if store.is_initialised():
                store.open()
                self.model = Model(store)
            else:
                if self.root_password is None:
                    self.root_password = secrets.token_urlsafe(16)
                store, self.model = init_serverdir(
                    self.serverdir, root_password=self.root_password,
                    mirror_url=self.mirror_url, hash_soon=True, storage=self.storage)
            self.model.restrict_reads = bool(self.restrict_reads)
            self.model.user_create = self.user_create
            self.model.mirror_creators = self.mirror_creators
            self._httpd.app = App(self.model, outside_url=self.outside_url,
                                  max_body=self.max_request_body_size, offline=self.offline,
                                  mirror_timeouts=self.mirror_timeouts,
                                  mirror_allow_hosts=self.mirror_allow_hosts,
                                  mirror_min_rate=self.mirror_min_rate)
        except BaseException:
            if self._httpd is not None:
                self._httpd.server_close()
                self._httpd = None
            self._cleanup()
            raise
        self.port = self._httpd.server_address[1]
        host = "[%s]" % self.host if ":" in self.host else self.host
        self.url = "http://%s:%d" % (host, self.port)
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="minidevpi-%d" % self.port, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stop serving, release the port, join the thread; harmless when repeated."""
        httpd, self._httpd = self._httpd, None
        drained = True
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            if getattr(httpd, "app", None) is not None:
                httpd.app.mirror.upstream.cut_all()  # (a download going on for the cache)
            drained = httpd.close_connections()
            if getattr(httpd, "app", None) is not None:
                httpd.app.mirror.upstream.close_idle()  # (kept upstream connections)
            if self._thread is not None:
                self._thread.join(5)
        self._cleanup(close_store=drained)

    def _cleanup(self, close_store=True):
        if self.model is not None:
            self.model.wait_pending_hashes()
            if close_store:  # (else a thread still uses it; it goes with the process)
                self.model.store.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -- test set-up helpers: the same model code as the HTTP API ----------------------

    def _require_started(self):
        if self.model is None or self._httpd is None:
            raise RuntimeError("server is not running; call start() first")

    def create_user(self, name, password, email=None):
        self._require_started()
        body = {"password": password}
        if email is not None:
            body["email"] = email
        return self.model.create_user("root", name, body, hash_soon=True)

    def create_index(self, path, **config):
        self._require_started()
        return self.model.create_index("root", path.strip("/"), config)

    def upload(self, path, path_or_bytes, filename=None):
        """Upload a distribution file to an index (as root); returns its URL."""
        self._require_started()
        ix = self.model.require_index(path.strip("/"))
        store = self.model.store
        f, tmp = store.new_tmp()
        digest = hashlib.sha256()
        size = 0
        with f:
            if isinstance(path_or_bytes, (bytes, bytearray)):
                if filename is None:
                    raise ValueError("filename is needed when uploading bytes")
                f.write(path_or_bytes)
                digest.update(path_or_bytes)
                size = len(path_or_bytes)
            else:
                filename = filename or os.path.basename(str(path_or_bytes))
                with open(str(path_or_bytes), "rb") as src:
                    size = copy_hashed(src, f, digest)
        _reason, relpath = self.model.upload_file("root", ix, filename, tmp, digest.hexdigest(),
                                                  size, [])
        return "%s/%s" % (self.url, relpath)

    def index_url(self, path):
        """The ``+simple/`` URL of an index, for pip's and uv's --index-url."""
        return "%s/%s/+simple/" % (self.url, path.strip("/"))


# ===================================================================================
# 10. command line
# ===================================================================================


def number_option(kind, low, high=None):
    """The check of a numeric option, the same from the command line (an argparse type:
    a bad value is a usage error) and from a config file: a ``kind`` (int: a whole number;
    float: seconds, finite) of at least ``low`` (for float: above it) and at most ``high``."""
    what = "a whole number" if kind is int else "a number of seconds"
    bound = ("from %d to %d" % (low, high) if high is not None
             else "of at least %d" % low if kind is int else "above %g" % low)

    def parse(text):
        try:
            value = kind(str(text).strip())
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or (
                value < low if kind is int else value <= low) or (
                high is not None and value > high):
            raise argparse.ArgumentTypeError("must be %s %s, not %r" % (what, bound, str(text)))
        return value
    return parse


# devpi-server options that a --configfile may set, and what they mean here: str, bool, or
# the check of a number (number_option)
NUMBER_OPTIONS = {
    "port": number_option(int, 0, 65535),
    "max-request-body-size": number_option(int, 1),
    "threads": number_option(int, 1),
    "connection-timeout": number_option(float, 0),
    "mirror-connect-timeout": number_option(float, 0),
    "mirror-read-timeout": number_option(float, 0),
    "mirror-min-rate": number_option(int, 1),
}
CONFIG_OPTIONS = dict({
    "serverdir": str, "host": str, "outside-url": str, "root-passwd": str,
    "root-passwd-hash": str, "no-root-pypi": bool, "mirror-url": str, "access-log": bool,
    "offline-mode": bool, "storage": str, "hard-links": bool, "include-mirrored-files": bool,
    "no-events": bool, "mirror-allow-host": str, "restrict-reads": bool, "user-create": str,
    "mirror-creators": str, "pg-url": str,
}, **NUMBER_OPTIONS)


def default_serverdir():
    return os.environ.get("MINIDEVPI_SERVERDIR") or os.path.expanduser("~/.minidevpi")


def _yaml_scalar(text, where):
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text.lower() in ("true", "yes", "on"):
        return True
    if text.lower() in ("false", "no", "off"):
        return False
    if text in ("", "~", "null"):
        return None
    if re.match(r"^-?[0-9]+$", text):
        return int(text)
    if text[:1] in "[{&*!|>":
        raise SystemExit("error: %s: only plain values are understood, not %r" % (where, text))
    return text


def read_configfile(path):
    """devpi-server's YAML config (a 'devpi-server:' mapping of option names to values),
    for the subset such files use. Anything not understood is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit("error: cannot read config file %s: %s" % (path, e))
    options = {}
    in_section = False
    for n, line in enumerate(lines, 1):
        where = "%s line %d" % (path, n)
        stripped = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        if not stripped.strip():
            continue
        if not stripped.startswith((" ", "\t")):
            if stripped.strip() != "devpi-server:":
                raise SystemExit("error: %s: expected 'devpi-server:', found %r"
                                 % (where, stripped))
            in_section = True
            continue
        if not in_section:
            raise SystemExit("error: %s: option outside the 'devpi-server:' mapping" % where)
        key, sep, value = stripped.strip().partition(":")
        if not sep:
            raise SystemExit("error: %s: expected 'option: value', found %r" % (where, stripped))
        key = key.strip().replace("_", "-")
        if key not in CONFIG_OPTIONS:
            raise SystemExit("error: %s: option %r is not understood by minidevpi "
                             "(it understands: %s)" % (where, key,
                                                       ", ".join(sorted(CONFIG_OPTIONS))))
        value = _yaml_scalar(value, where)
        kind = CONFIG_OPTIONS[key]
        if key in NUMBER_OPTIONS:
            try:
                value = kind(value)
            except argparse.ArgumentTypeError as e:
                raise SystemExit("error: %s: %r %s" % (where, key, e))
        elif kind is bool and not isinstance(value, bool) or kind is str and not isinstance(
                value, (str, int)):
            raise SystemExit("error: %s: %r needs a %s value" % (where, key, kind.__name__))
        options[key.replace("-", "_")] = str(value) if kind is str else value
    return options


def apply_configfile(args, defaults):
    """Fill options not given on the command line from --configfile, then defaults."""
    if getattr(args, "configfile", None):
        for key, value in read_configfile(args.configfile).items():
            if getattr(args, key, None) in (None, False):
                setattr(args, key, value)
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="minidevpi.py",
        description="A private Python package index in one file, compatible with "
                    "devpi-client, pip, uv and twine.")
    parser.add_argument("--version", action="version", version="minidevpi " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.commands = sub.choices  # (main shows a command's own usage for its mistakes)

    def common(p):
        p.add_argument("--serverdir", metavar="DIR",
                       help="server directory (default: $MINIDEVPI_SERVERDIR or ~/.minidevpi)")
        p.add_argument("--storage", metavar="SPEC",
                       help="sqlite (the default: a database in the server directory), or "
                            "pg8000[:host=H,port=P,database=D,user=U,password=PW,unix_sock=S] "
                            "for PostgreSQL (needs: pip install pg8000), which several serve "
                            "processes share; the server directory then holds this "
                            "process's cache")
        p.add_argument("--pg-url", metavar="URL",
                       help="PostgreSQL as postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE "
                            "(implies --storage pg8000)")
        p.add_argument("-c", "--configfile", metavar="FILE",
                       help="devpi-server style YAML config file ('devpi-server:' mapping); "
                            "command line options win over it")

    def root_options(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--root-passwd", metavar="PW",
                       help="password of the root user (default: a random one, printed once; "
                            "'' is allowed and means no password)")
        g.add_argument("--root-passwd-hash", metavar="HASH",
                       help="password hash of the root user, as minidevpi writes it")
        p.add_argument("--no-root-pypi", action="store_true", default=None,
                       help="do not create the root/pypi mirror index")
        p.add_argument("--mirror-url", metavar="URL",
                       help="upstream of root/pypi (default: the index pip on this host uses)")

    p = sub.add_parser("init", help="create a server directory with the root user",
                       description="Create a server directory: database, root user and the "
                                   "root/pypi mirror index.")
    common(p)
    root_options(p)

    p = sub.add_parser("serve", help="run the server (initialising the directory if needed)",
                       description="Run the server. An uninitialised server directory is "
                                   "initialised first.")
    common(p)
    root_options(p)
    p.add_argument("--host", help="address to listen on (default: %s; 0.0.0.0 or :: for "
                                  "every interface)" % DEFAULT_HOST)
    p.add_argument("--port", type=NUMBER_OPTIONS["port"], help="port (default: %d; 0 picks a free one)"
                                            % DEFAULT_PORT)
    p.add_argument("--outside-url", metavar="URL",
                   help="URL the server is reached at through a proxy, for the absolute URLs "
                        "it writes (default: from the request's Host or X-Outside-Url)")
    p.add_argument("--max-request-body-size", type=NUMBER_OPTIONS["max-request-body-size"], metavar="BYTES",
                   help="largest request body (upload) accepted, enforced while it streams "
                        "(default: %d, 2 GiB)" % DEFAULT_MAX_BODY)
    p.add_argument("--threads", type=NUMBER_OPTIONS["threads"], metavar="N",
                   help="most connections served at once, a thread each; more are answered "
                        "503 (default: %d)" % DEFAULT_THREADS)
    p.add_argument("--connection-timeout", type=NUMBER_OPTIONS["connection-timeout"], metavar="SECONDS",
                   help="close a connection idle or stalled this long (default: %d)"
                        % DEFAULT_CONNECTION_TIMEOUT)
    p.add_argument("--offline-mode", action="store_true", default=None,
                   help="no upstream traffic: mirrors serve only what they kept")
    p.add_argument("--mirror-connect-timeout", type=NUMBER_OPTIONS["mirror-connect-timeout"], metavar="SECONDS",
                   help="seconds to wait for a mirror's upstream to accept a connection "
                        "(default: %g)" % MIRROR_CONNECT_TIMEOUT)
    p.add_argument("--mirror-read-timeout", type=NUMBER_OPTIONS["mirror-read-timeout"], metavar="SECONDS",
                   help="seconds to wait for each read from a mirror's upstream; a page's "
                        "whole fetch must be done within the connect timeout + %d times this "
                        "(default: %g)" % (PAGE_DEADLINE_READS, MIRROR_READ_TIMEOUT))
    p.add_argument("--mirror-min-rate", type=NUMBER_OPTIONS["mirror-min-rate"], metavar="BYTES",
                   help="bytes a second a file (or the project list) from a mirror's "
                        "upstream must average, after a grace of the connect + read "
                        "timeouts; slower, it is cut (default: %d)" % MIRROR_MIN_RATE)
    p.add_argument("--mirror-allow-host", action="append", metavar="HOST[:PORT]",
                   help="a host (any port, or only PORT) a mirror may fetch files from even "
                        "though it is not the mirror_url's own host and has non-public "
                        "addresses, e.g. an internal upstream's file server (repeatable, "
                        "or comma-separated)")
    p.add_argument("--restrict-reads", action="store_true", default=None,
                   help="nothing public: indexes without an acl_read (and new ones) are read "
                        "by logged-in users only, and anonymous requests get no user or "
                        "index lists")
    p.add_argument("--user-create", choices=USER_CREATE_CHOICES,
                   help="who may create users: 'anyone' (as devpi-server without "
                        "--restrict-modify) or 'root' (default: root with --restrict-reads, "
                        "else anyone)")
    p.add_argument("--mirror-creators", action="append", metavar="root|anyone|USER,...",
                   help="who may create mirror indexes and set a mirror_url on their own "
                        "indexes: 'root' (default), 'anyone' (as devpi-server) or these "
                        "users and root (repeatable, or comma-separated); a mirror not of "
                        "root's fetches only from public hosts and --mirror-allow-host")
    p.add_argument("--access-log", dest="access_log", action="store_true", default=None,
                   help="(default) one line per request on stderr")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no access log")

    def devpi_compat(p):
        p.add_argument("--hard-links", action="store_true", default=None,
                       help="hard-link files instead of copying them where the file system "
                            "allows (says so when it can't)")

    p = sub.add_parser("export", help="write the server in devpi-server's export format",
                       description="Write users (with password hashes), indexes, projects, "
                                   "versions and files in devpi-server's export format, from "
                                   "a consistent snapshot (the server may keep running).")
    p.add_argument("directory", metavar="DIR", help="where to write (new or empty)")
    common(p)
    devpi_compat(p)
    p.add_argument("--include-mirrored-files", action="store_true", default=None,
                   help="also the files mirrors keep (and what serves them offline)")
    p.add_argument("-q", "--quiet", action="store_true", default=None,
                   help="no progress lines on stderr")

    p = sub.add_parser("import", help="create a server from a devpi or minidevpi export",
                       description="Create a server directory (new or empty) from an export "
                                   "written by minidevpi or devpi-server 6.x. Everything is "
                                   "checked first; a damaged export changes nothing.")
    p.add_argument("directory", metavar="DIR", help="the export directory")
    common(p)
    devpi_compat(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--root-passwd", metavar="PW",
                   help="give root this password, whatever the export says")
    g.add_argument("--root-passwd-hash", metavar="HASH",
                   help="give root this password hash (as minidevpi writes them)")
    p.add_argument("--no-root-pypi", action="store_true", default=None,
                   help="no root/pypi: neither the default one nor the export's")
    p.add_argument("--skip-import-type", metavar="TYPE", action="append", default=None,
                   help="leave out indexes of this type (repeatable)")
    p.add_argument("--no-events", action="store_true", default=None,
                   help="accepted for devpi's scripts; changes nothing")
    p.add_argument("-q", "--quiet", action="store_true", default=None,
                   help="no progress lines on stderr")

    p = sub.add_parser("passwd", help="set a user's password (root's too) while the server "
                                      "is stopped",
                       description="Set a user's password in a server directory while no "
                                   "server runs on it, e.g. root's when it is lost. The new "
                                   "password is asked twice at a terminal, else read as one "
                                   "line from stdin.")
    p.add_argument("user", metavar="USER", help="whose password (e.g. root)")
    common(p)

    p = sub.add_parser("audit", help="print the audit log as JSON lines",
                       description="Print the audit log's records (what GET /+audit answers "
                                   "root) as JSON lines, oldest first; the server may keep "
                                   "running. Without --limit, every record the filters "
                                   "match.")
    common(p)
    for name, what in (("user", "made by this user (:anonymous:, '(command line)')"),
                       ("index", "on this index (USER/NAME)"), ("project", "of this project"),
                       ("action", "of this action (user.create, file.upload, ...)"),
                       ("since", "at or after this time (epoch, RFC 3339 or a date)"),
                       ("until", "at or before this time"),
                       ("after", "with an id above this one"), ("limit", "at most this many")):
        p.add_argument("--" + name, metavar=name.upper(), help="records " + what)

    p = sub.add_parser("hash-password", help="print the hash of a password, for "
                                             "--root-passwd-hash",
                       description="Print the hash of a password as minidevpi stores it, for "
                                   "--root-passwd-hash (init, serve, import), so that the "
                                   "password itself is in no command line or script. The "
                                   "password is asked twice at a terminal, else read as one "
                                   "line from stdin.")
    return parser


def read_new_password():
    """A new password: asked twice at a terminal (no echo), else the first line of stdin."""
    if sys.stdin is not None and sys.stdin.isatty():
        import getpass
        password = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != password:
            raise MinidevpiError("the two passwords differ; nothing was changed")
        return password
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line:
        raise MinidevpiError("no password: give it on stdin (one line) or at a terminal")
    return line.rstrip("\r\n")


def cmd_passwd(args):
    store = open_store(args.serverdir, args.storage)
    store.open()  # (refused while a server runs on it: that one changes it with devpi user -m)
    try:
        model = Model(store)
        if model.get_user_row(args.user) is None:
            raise MinidevpiError("no user %r in %s" % (args.user, store.serverdir))
        model.context.begin(command_line=True)
        model.set_password_hash(None, args.user, hash_password(read_new_password()))
    finally:
        store.close()
    print("password of %s changed in %s" % (args.user, store.serverdir), flush=True)
    return 0


def cmd_audit(args):
    store = open_store(args.serverdir, args.storage)
    if not store.is_initialised():
        raise MinidevpiError("%s contains no minidevpi server" % store.serverdir)
    query = audit_query(lambda key: getattr(args, key))
    want = query.pop("limit", None)
    store.open(readonly=True)
    try:
        model = Model(store)
        printed = 0
        while want is None or printed < want:
            limit = AUDIT_PAGE_MAX if want is None else min(AUDIT_PAGE_MAX, want - printed)
            ids, more = model.audit_ids(limit=limit, **query)
            for chunk in model.audit_lines(ids):
                sys.stdout.write(chunk.decode("ascii"))
            printed += len(ids)
            if not more:
                break
            query["after"] = ids[-1]
        sys.stdout.flush()
    finally:
        store.close()
    return 0


def cmd_hash_password(args):
    print(hash_password(read_new_password()), flush=True)
    return 0


def cmd_init(args, hash_soon=False):
    """Initialise; returns the open (store, model). ``hash_soon``: hash root's password
    in the background (serve answers at once; root's login waits for the hash)."""
    password = args.root_passwd
    generated = False
    if password is None and args.root_passwd_hash is None:
        password = secrets.token_urlsafe(12)
        generated = True
    store, model = init_serverdir(args.serverdir, root_password=password,
                                  root_pwhash=args.root_passwd_hash,
                                  root_pypi=not args.no_root_pypi,
                                  mirror_url=args.mirror_url, hash_soon=hash_soon,
                                  storage=args.storage)
    print("initialised server directory %s" % os.path.abspath(args.serverdir), flush=True)
    if generated:
        print("root password (shown only now): %s" % password, flush=True)
        print("change it with: devpi login root --password=...; "
              "devpi user -m root password=NEW", flush=True)
    return store, model


def is_loopback(host):
    return host in ("localhost", "::1") or host.startswith("127.")


def _limit_malloc_arenas():
    """glibc gives threads up to 8 malloc arenas per core, each keeping what it freed;
    with a thread per connection that is memory never given back. Two arenas are
    plenty for a server whose threads mostly wait (measured at 10,000 projects under
    load: 62 MB peak -> 53 MB, no loss of speed). A MALLOC_ARENA_MAX the user set wins."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        os.confstr("CS_GNU_LIBC_VERSION")  # glibc only
        import ctypes
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    except (ValueError, OSError, AttributeError, ImportError):
        pass


def cmd_serve(args):
    try:
        parse_allow_hosts(args.mirror_allow_host)
        check_user_create_option(args.user_create)
        mirror_creators = check_mirror_creators_option(args.mirror_creators)
    except ValueError as e:
        raise SystemExit("error: %s" % e)
    _limit_malloc_arenas()
    # the port first: a busy port must not leave a fresh directory initialised behind it
    try:
        httpd = IndexHTTPServer((args.host, args.port), None, access_log=args.access_log,
                                max_threads=args.threads,
                                connection_timeout=args.connection_timeout)
    except OSError as e:
        raise SystemExit("error: cannot listen on %s:%s: %s" % (args.host, args.port, e))
    host, port = httpd.server_address[:2]
    shown = "[%s]" % host if ":" in host else host
    url = "http://%s:%d/" % (shown, port)
    try:
        store = open_store(args.serverdir, args.storage)
        fresh = not store.is_initialised()
    except BaseException:
        httpd.server_close()
        raise
    try:
        if fresh:
            print("server directory %s is not initialised: initialising it"
                  % os.path.abspath(args.serverdir), flush=True)
            try:
                store, model = cmd_init(args, hash_soon=True)
            except AlreadyInitialised:  # (another serve process was first: join it)
                fresh = False
        if not fresh:
            store.open()
            model = Model(store)
            if args.root_passwd is not None or args.root_passwd_hash is not None:
                log("warning: --root-passwd%s is ignored: %s is initialised and root keeps "
                    "its password. Change it with 'devpi user -m root password=...', or "
                    "with the server stopped, 'python3 minidevpi.py passwd root'"
                    % ("" if args.root_passwd is not None else "-hash", store.serverdir))
    except BaseException:
        httpd.server_close()
        raise
    store.write_switch_interval = WRITE_SWITCH_INTERVAL
    model.restrict_reads = bool(args.restrict_reads)
    model.user_create = args.user_create
    model.mirror_creators = mirror_creators
    httpd.app = App(model, outside_url=args.outside_url, max_body=args.max_request_body_size,
                    offline=args.offline_mode,
                    mirror_timeouts=(args.mirror_connect_timeout, args.mirror_read_timeout),
                    mirror_allow_hosts=args.mirror_allow_host,
                    mirror_min_rate=args.mirror_min_rate)
    if not is_loopback(args.host):
        empty = [name for name, pwhash in store.conn().execute(
            "SELECT name, pwhash FROM users") if verify_password("", pwhash)]
        if empty:
            log("WARNING: %s with an empty password, reachable from other hosts on %s: %s. "
                "Set passwords with 'devpi user -m NAME password=...'."
                % (plural(len(empty), "account"), args.host, ", ".join(empty)))

    stopping, hurry = threading.Event(), threading.Event()

    def stop(signum, frame):  # no new connections; a second signal: no more waiting
        if stopping.is_set():
            hurry.set()
            return
        stopping.set()
        threading.Thread(target=httpd.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # what clients use: the URL it is reached at through a proxy, where one is given
    public = httpd.app.outside_url + "/" if httpd.app.outside_url else url
    print("minidevpi %s serving %s at %s%s%s%s%s%s" % (
        __version__, store.serverdir, url,
        " (outside URL: %s)" % public if public != url else "",
        " in offline mode (no upstream traffic: mirrors serve what they kept)"
        if args.offline_mode else "",
        " with restricted reads (indexes without acl_read: logged-in users only)"
        if args.restrict_reads else "",
        "; only root creates users" if model.user_creators() == USER_CREATE_ROOT
        else "", "" if mirror_creators == frozenset([MIRROR_CREATORS_ROOT]) else
        "; %s create mirrors" % ("anyone may" if mirror_creators == MIRROR_CREATORS_ANYONE
                                 else ", ".join(sorted(mirror_creators)) + " may")),
        flush=True)
    if fresh:
        print("next: devpi use %s && devpi login root --password=...   "
              "(or pip install --index-url %sroot/pypi/+simple/ ...)" % (public, public),
              flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        with httpd.connections_lock:
            busy = len(httpd.busy)
        if busy:
            log("minidevpi stopping: no new connections; %s in flight, given up to %d s to "
                "finish (a second signal: no waiting)" % (plural(busy, "request"), STOP_GRACE))
        httpd.drain(STOP_GRACE, hurry)
        httpd.app.mirror.upstream.cut_all()
        if httpd.close_connections():
            store.close()
    log("minidevpi stopped")
    return 0


SERVE_DEFAULTS = {"host": DEFAULT_HOST, "port": DEFAULT_PORT, "outside_url": None,
                  "max_request_body_size": DEFAULT_MAX_BODY, "access_log": True,
                  "no_root_pypi": False, "offline_mode": False,
                  "mirror_connect_timeout": MIRROR_CONNECT_TIMEOUT,
                  "mirror_read_timeout": MIRROR_READ_TIMEOUT, "threads": DEFAULT_THREADS,
                  "connection_timeout": DEFAULT_CONNECTION_TIMEOUT, "mirror_allow_host": [],
                  "restrict_reads": False, "mirror_min_rate": MIRROR_MIN_RATE}


def cmd_export(args):
    lines = export_server(args.serverdir, args.directory,
                          include_mirrored=bool(args.include_mirrored_files),
                          hard_links=bool(args.hard_links), quiet=bool(args.quiet),
                          storage=args.storage)
    for line in lines:
        print(line, flush=True)
    return 0


def cmd_import(args):
    lines = import_server(args.directory, args.serverdir, root_password=args.root_passwd,
                          root_pwhash=args.root_passwd_hash,
                          root_pypi=not args.no_root_pypi,
                          skip_types=tuple(args.skip_import_type or ()),
                          hard_links=bool(args.hard_links), quiet=bool(args.quiet),
                          storage=args.storage)
    for line in lines:
        print(line, flush=True)
    return 0


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error("unrecognized arguments: " + " ".join(unknown))
    defaults = {"serverdir": default_serverdir(), "no_root_pypi": False}
    if args.command == "serve":
        defaults.update(SERVE_DEFAULTS)
    apply_configfile(args, defaults)
    if getattr(args, "root_passwd", None) is not None and \
            getattr(args, "root_passwd_hash", None) is not None:
        raise SystemExit("error: give --root-passwd or --root-passwd-hash, not both")
    if hasattr(args, "storage"):  # (None for SQLite, else PostgreSQL's settings)
        try:
            args.storage = parse_storage(args.storage, args.pg_url)
        except ValueError as e:
            raise SystemExit("error: %s" % e)
    try:
        return run_command(args)
    except MinidevpiError as e:  # what the user got wrong or must know: a message, no traceback
        raise SystemExit("error: " + e.message)


def run_command(args):
    if args.command == "init":
        store, model = cmd_init(args)
        model.wait_pending_hashes()
        store.close()
        return 0
    if args.command == "export":
        return cmd_export(args)
    if args.command == "import":
        return cmd_import(args)
    if args.command == "passwd":
        return cmd_passwd(args)
    if args.command == "audit":
        return cmd_audit(args)
    if args.command == "hash-password":
        return cmd_hash_password(args)
    return cmd_serve(args)


if __name__ == "__main__":
    sys.exit(main())
