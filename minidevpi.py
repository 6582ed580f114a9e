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
    4  storage       SQLite schema, connections, transactions, content-addressed blobs,
                     the lock that makes one process the server of a directory
    5  model         accounts (passwords, tokens, login throttling), index configuration,
                     the one walk through bases, releases, files, push, change listeners
    6  mirror        the upstream HTTP client and its address policy, then upstream pages
                     and files on demand, kept for offline use
    7  HTTP          simple pages from data, route table, negotiation, page cache, request
                     bodies and deadlines, handler, threading server
    8  export/import devpi-server's dump format, both ways (dumps are untrusted input)
    9  embedding     Server: start on a free port in a thread, stop, test helpers
   10  command line  init, serve, export, import; main()
"""

# ===================================================================================
# 1. header
# ===================================================================================

import argparse
import base64
import binascii
import contextlib
import email.parser
import email.utils
import gzip
import hashlib
import hmac
import html
import io
import json
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
DEFAULT_MAX_BODY = 2 * 1024 ** 3  # bytes an upload body may have; real wheels pass 1 GB
DEVPI_API_VERSION = "2"
DEVPI_SERVER_VERSION = "6.20.3"  # the devpi-server whose API this one speaks
COPY_CHUNK = 1024 * 1024  # bytes read at a time where files are hashed or copied
SCHEMA_VERSION = 2
DB_NAME = "minidevpi.sqlite3"
SECRET_NAME = "secret"
LOCK_NAME = ".lock"  # held (flock) by the one process that serves a server directory
FILES_DIR = "+files"
TMP_DIR = "+tmp"
JSON_TYPE = "application/json"
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


SDIST_EXTS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".tar")
OTHER_EXTS = (".egg", ".exe", ".msi", ".rpm", ".dmg")


_PLATFORM = (r"(?:win32|win-amd64|win-arm64|win-arm32|linux-[a-z0-9_]+|macosx-[0-9._]+-[a-z0-9_]+"
             r"|cygwin-[0-9a-z._]+-[a-z0-9_]+|freebsd-[0-9a-z._]+-[a-z0-9_]+)")
_DUMB_SUFFIX_RE = re.compile(r"\.%s$" % _PLATFORM)
_RPM_SUFFIX_RE = re.compile(r"-[0-9][a-z0-9_]*\.[a-z0-9_]+$")  # -release.arch
_BINARY_SUFFIX_RE = re.compile(  # egg, exe, msi: -pyX.Y and/or a platform
    r"(?:(?:[.-]%s)?-py\d+(?:\.\d+)?(?:-%s)?|[.-]%s)$" % (_PLATFORM, _PLATFORM, _PLATFORM))


def check_filename(filename):
    """Refuse file names that could escape a directory or confuse a URL."""
    if (not filename or len(filename) > 255 or "/" in filename or "\\" in filename
            or "\x00" in filename or filename in (".", "..") or filename.startswith(".")
            or any(ord(c) < 32 for c in filename)):
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


def _zip_member(f, entry, limit):
    """The bytes of one zip member (an entry of zip_entries), or ArchiveTooLarge when it
    is larger than ``limit``. Stored and deflated members (what wheels and sdists use) are
    read; never more than the stated size is inflated, and the CRC is checked."""
    import struct
    import zlib
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
    inflate = zlib.decompressobj(-15) if method == 8 else None
    out, got, left, pending = [], 0, csize, b""
    while left > 0 or pending:
        if not pending:
            pending = f.read(min(left, 1024 * 1024))
            if not pending:
                raise zipfile.BadZipFile("%s is cut short" % name)
            left -= len(pending)
        if inflate is None:
            piece, pending = pending, b""
        else:
            piece = inflate.decompress(pending, size - got + 1)
            pending = inflate.unconsumed_tail
        got += len(piece)
        if got > size:
            raise zipfile.BadZipFile("%s is larger than its stated size" % name)
        out.append(piece)
    data = b"".join(out)
    if len(data) != size or zlib.crc32(data) != crc:
        raise zipfile.BadZipFile("%s: CRC or size mismatch" % name)
    return data


# A documentation zip is an untrusted archive served member by member: it may hold at
# most this many members and this many bytes unpacked (the sum of the members' stated
# sizes; a member is never inflated past its stated size), and a member at most
# MAX_DOC_MEMBER_BYTES (a page is read whole to be served).
MAX_DOC_MEMBERS = 50000
MAX_DOC_BYTES = 1024 * 1024 * 1024
MAX_DOC_MEMBER_BYTES = 128 * 1024 * 1024
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


def doc_zip_members(f):
    """{member name: zip entry} of the documentation zip ``f`` (open, binary), directories
    left out. Raises ValueError naming the problem for a member outside the zip's root
    (absolute, a drive, a ``..`` segment), a symlink, an encrypted member or one not stored
    or deflated, past the MAX_DOC_* bounds;
    zipfile.BadZipFile for a broken zip."""
    members = {}
    total = 0
    count = 0
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
CREATE TABLE IF NOT EXISTS gone (  -- deleted files: their URLs answer 410
    index_id INTEGER NOT NULL REFERENCES indexes(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (index_id, filename, sha256)
);
"""


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
            conn.executescript(SCHEMA)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('uuid', ?)", (secrets.token_hex(16),))
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('serial', '0')")
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
        with open(os.path.join(self.serverdir, SECRET_NAME)) as f:
            self.secret = f.read().strip().encode()
        conn = self.conn()
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
            conn.executescript(SCHEMA)
            with self.write() as c:
                c.execute("UPDATE meta SET value=? WHERE key='schema_version'",
                          (str(SCHEMA_VERSION),))
        self.uuid = conn.execute("SELECT value FROM meta WHERE key='uuid'").fetchone()[0]
        if not readonly:
            self.clean_tmp()

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
            with self._conns_lock:
                c = self._idle.pop() if self._idle else None
            if c is None:
                c = self._connect()
                with self._conns_lock:
                    self._conns.append(c)
            self._local.conn = c
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
    def write(self):
        """One write transaction; bumps the serial. Nested use joins the outer one."""
        c = self.conn()
        with self._write_lock:
            if getattr(self._local, "in_write", False):
                yield c
                return
            self._local.in_write = True
            self._local.after_commit = []
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield c
                    c.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                              "WHERE key='serial'")
                    c.execute("COMMIT")
                    self.serial += 1
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
                for fn in self._local.after_commit:
                    fn(c)
            finally:
                self._local.in_write = False
                self._local.after_commit = []

    def after_commit(self, fn):
        """Run fn(conn) once the current write transaction committed (lock still held)."""
        self._local.after_commit.append(fn)

    # -- rows that more than one part writes --------------------------------------------

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
        c.execute(
            "INSERT " + ("OR REPLACE " if replace else "") + "INTO files (index_id, "
            "version_id, filename, rel, sha256, size, uploaded, requires_python, "
            "core_metadata, for_filename, log) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (index_id, version_id, filename, rel, sha256, size, uploaded, requires_python,
             core_metadata, for_filename, json.dumps(list(log))))
        c.execute("DELETE FROM gone WHERE index_id=? AND filename=? AND sha256=?",
                  (index_id, filename, sha256))

    # -- blobs ------------------------------------------------------------------------

    def blob_path(self, sha256):
        return os.path.join(self.files_dir, sha256[:2], sha256[2:4], sha256)

    def new_tmp(self):
        fd, path = tempfile.mkstemp(dir=self.tmp_dir, prefix="blob-")
        return os.fdopen(fd, "wb"), path

    def place_blob(self, tmp_path, sha256):
        """Move a complete temporary file into its content address (fsynced first)."""
        dest = self.blob_path(sha256)
        if os.path.exists(dest):
            _unlink_quiet(tmp_path)
            return dest
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if self.sync_each_blob:
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dest)
        return dest

    def put_bytes(self, data):
        """Store bytes as a blob; returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not os.path.exists(self.blob_path(sha)):
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
                _unlink_quiet(self.blob_path(sha))


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

    def authenticate(self, name, secret, source=None):
        """The user name if ``secret`` is the user's password or a valid login token.
        ``source``: the client's address, for throttling (see LoginThrottle)."""
        pending = self._pending_hashes.get(name)
        if pending is not None:
            pending.wait()
        row = self.get_user_row(name)
        if row is not None and self.check_token(name, secret, row["pwhash"]):
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

    def login(self, name, password, source=None):
        if self.authenticate(name, password, source) is None:
            raise HTTPError(401, "user %r could not be authenticated" % name)
        return {"password": self.make_token(name), "expiration": TOKEN_LIFETIME}


# -- index configuration -------------------------------------------------------------

LIST_KEYS = ("bases", "acl_upload", "acl_toxresult_upload", "mirror_whitelist")
ACL_KEYS = ("acl_upload", "acl_toxresult_upload")  # lists of user names
SPECIAL_ACL = {":ANONYMOUS:": ":ANONYMOUS:", ":AUTHENTICATED:": ":AUTHENTICATED:"}
BOOL_KEYS = ("volatile", "mirror_no_project_list", "mirror_use_external_urls",
             "mirror_ignore_serial_header", "mirror_provides_core_metadata")
TEXT_KEYS = ("title", "description", "custom_data", "mirror_web_url_fmt")
STAGE_KEYS = ("type", "bases", "volatile", "acl_upload", "acl_toxresult_upload",
              "mirror_whitelist", "mirror_whitelist_inheritance", "title", "description",
              "custom_data")
MIRROR_KEYS = ("type", "volatile", "mirror_url", "mirror_cache_expiry", "mirror_web_url_fmt",
               "mirror_no_project_list", "mirror_use_external_urls",
               "mirror_ignore_serial_header", "mirror_provides_core_metadata", "title",
               "description", "custom_data")
OPTIONAL_KEYS = ("title", "description", "custom_data", "mirror_web_url_fmt",
                 "mirror_cache_expiry", "mirror_no_project_list", "mirror_use_external_urls",
                 "mirror_ignore_serial_header", "mirror_provides_core_metadata")
DEFAULT_MIRROR_CACHE_EXPIRY = 1800
# a mirror fetches from whatever its mirror_url says (devpi also leaves mirrors to root)
ONLY_ROOT_MIRRORS = ("only root can create mirror indexes, make an index a mirror or set "
                     "a mirror_url")


def index_defaults(ixtype, user):
    """The settings a new index of type ``ixtype`` owned by ``user`` starts with, as in
    devpi (what a config does not say, whether created here or imported)."""
    if ixtype == "mirror":
        return {"type": "mirror", "volatile": True}
    return {"type": "stage", "bases": [], "volatile": True, "acl_upload": [user],
            "acl_toxresult_upload": [":ANONYMOUS:"], "mirror_whitelist": [],
            "mirror_whitelist_inheritance": "intersection"}


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


def coerce_index_value(key, value):
    """Turn one config value (a string from the command line, or JSON) into its type."""
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


# -- the model ------------------------------------------------------------------------


class Index:
    """One index ("stage" in devpi's words) as read from the database."""

    __slots__ = ("id", "user", "name", "config")

    def __init__(self, id, user, name, config):
        self.id = id
        self.user = user
        self.name = name
        self.config = config

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


class File:
    """A stored file of a release, with what pages need to list it."""

    __slots__ = ("index", "project", "version", "filename", "rel", "sha256", "size",
                 "uploaded", "requires_python", "core_metadata", "yanked", "for_filename",
                 "log", "ext")

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
    """

    __slots__ = ("model", "index", "project", "reader", "chain", "_held", "_hidden")

    def __init__(self, model, ix, norm, reader, chain):
        self.model = model
        self.index = ix
        self.project = norm
        self.reader = reader
        self.chain = chain
        self._held = None
        self._hidden = None

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
        """The chain without the mirrors the whitelist hides."""
        return [b for b in self.chain if not (b.is_mirror and self.mirrors_hidden)]

    @property
    def mirrors(self):
        """The mirrors that contribute to the project."""
        return [b for b in self.visible if b.is_mirror]


def when_list(ts=None):
    return list(time.gmtime(ts)[:6])


class Model:
    """Users, indexes and releases: every rule of devpi's data model lives here.

    Methods take the acting user's name (``actor``; None for anonymous) and raise
    HTTPError for anything the caller may not do or got wrong.
    """

    def __init__(self, store):
        self.store = store
        self._index_cache = {}
        self.accounts = Accounts(store)
        self.throttle = self.accounts.throttle
        self._upstream_listeners = []
        self._change_listeners = []

    # -- change notifications ---------------------------------------------------------

    def on_upstream_change(self, fn):
        """Call ``fn(index_id)`` after each commit that gives an index a new mirror_url (the
        mirror, a later section, forgets what it holds of the old upstream)."""
        self._upstream_listeners.append(fn)

    def on_change(self, fn):
        """Call ``fn(config, project_set, projects)`` after each commit that changed what
        pages show: any index's config (``config``), which projects exist (``project_set``),
        or the releases of the (normalised) ``projects`` (the page cache listens)."""
        self._change_listeners.append(fn)

    def mirror_page_changed(self, norm):
        """A mirror stored a page of project ``norm`` that differs from the one it had:
        the pages built from it are out of date (call inside the write transaction)."""
        self._changed(projects=[norm])

    def _changed(self, projects=(), config=False, project_set=False):
        def tell(_c):
            if config:
                self._index_cache = {}
            for fn in self._change_listeners:
                fn(config, project_set, projects)
        self.store.after_commit(tell)

    # -- users --------------------------------------------------------------------------

    def get_user_row(self, name):
        return self.accounts.get_user_row(name)

    def make_token(self, name):
        return self.accounts.make_token(name)

    def wait_pending_hashes(self):
        self.accounts.wait_pending_hashes()

    def user_exists(self, name):
        return self.get_user_row(name) is not None

    def user_info(self, name, with_indexes=True, actor=None):
        row = self.get_user_row(name)
        if row is None:
            raise not_found("no user %r" % name)
        info = {"username": row["name"]}
        info.update(json.loads(row["config"]))
        info["created"] = row["created"]
        if row["modified"]:
            info["modified"] = row["modified"]
        if with_indexes:
            info["indexes"] = {ix.name: self.shown_config(ix.config, actor)
                               for ix in self.user_indexes(name)}
        return info

    def list_users(self, actor=None):
        names = [r[0] for r in self.store.conn().execute("SELECT name FROM users ORDER BY name")]
        return {n: self.user_info(n, actor=actor) for n in names}

    USER_KEYS = ("password", "email", "title", "description", "custom_data")

    def create_user(self, actor, name, body, pwhash=None, hash_soon=False):
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
        if pwhash == "!pending":
            self.accounts.set_password_soon(name, password)
        return self.user_info(name)

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
        # keys it already has (imported from devpi's plugins) come back from devpi-client
        unknown = sorted(k for k in body if k not in self.USER_KEYS and k not in stored)
        if unknown:
            raise bad_request("Unknown keys in user config: %s" % ", ".join(unknown))
        password = body.pop("password", None)
        if password is not None and not isinstance(password, str):
            raise bad_request("password must be a string")
        config = self._user_config(stored, body)
        with self.store.write() as c:
            pwhash = row["pwhash"] if password is None else hash_password(password)
            c.execute("UPDATE users SET pwhash=?, config=?, modified=? WHERE name=?",
                      (pwhash, json.dumps(config), utcnow_iso(), name))
        if password is not None:
            return self.make_token(name)
        return None

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
            for ix_id, config_json in c.execute("SELECT id, config FROM indexes").fetchall():
                config = json.loads(config_json)
                if any(name in config.get(k, ()) for k in ACL_KEYS):
                    for k in ACL_KEYS:
                        if k in config:
                            config[k] = [u for u in config[k] if u != name]
                    c.execute("UPDATE indexes SET config=? WHERE id=?",
                              (json.dumps(config), ix_id))
            self.store.drop_unused_blobs(shas)
            self._changed(config=True, project_set=True, projects=self._all_project_names(c))

    def _all_project_names(self, c):
        return [r[0] for r in c.execute("SELECT DISTINCT name FROM projects")]

    # -- indexes --------------------------------------------------------------------------

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

    def create_index(self, actor, path, body):
        user, _, name = path.partition("/")
        check_index_name(name)
        if not self.user_exists(user):
            raise not_found("no user %r" % user)
        if not self.can_modify_index(actor, user):
            raise forbidden("no permission to create index %s" % path)
        if not isinstance(body, dict):
            raise bad_request("index config must be a JSON object")
        ixtype = body.get("type", "stage")
        if actor != "root" and (ixtype == "mirror" or "mirror_url" in body):
            raise forbidden(ONLY_ROOT_MIRRORS)
        config = index_defaults(ixtype, user)
        config.update(body)
        if ixtype == "mirror" and "mirror_url" not in config:
            raise bad_request("a mirror index needs a mirror_url")
        config = self.validate_index_config(path, config)
        self._check_cycle(path, config.get("bases", []))
        with self.store.write() as c:
            if not c.execute("SELECT 1 FROM users WHERE name=?", (user,)).fetchone():
                raise not_found("no user %r" % user)  # deleted meanwhile
            if c.execute("SELECT 1 FROM indexes WHERE user=? AND name=?",
                         (user, name)).fetchone():
                raise HTTPError(409, "index %r exists" % path)
            self.store.insert_index(c, user, name, config)
            self._changed(config=True)
        return config

    def modify_index(self, actor, path, patch):
        ix = self.require_index(path)
        if not self.can_modify_index(actor, ix.user):
            raise forbidden("no permission to modify index %s" % path)
        with self.store.write() as c:
            # the patch applies to the config as it is now: a change committed meanwhile
            # (a deleted user's name leaving the ACLs) is not undone
            row = c.execute("SELECT config FROM indexes WHERE id=?", (ix.id,)).fetchone()
            if row is None:
                raise not_found("The stage %s could not be found." % path)
            current = json.loads(row["config"])
            new = apply_index_patch(current, patch)
            to_mirror = new.get("type") == "mirror" and current["type"] != "mirror"
            if actor != "root" and (to_mirror or
                                    new.get("mirror_url") != current.get("mirror_url")):
                raise forbidden(ONLY_ROOT_MIRRORS)
            if new.get("type", current["type"]) != current["type"]:
                raise bad_request("the 'type' of an index can't be changed")
            new["type"] = current["type"]
            config = self.validate_index_config(path, new)
            self._check_cycle(path, config.get("bases", []))
            c.execute("UPDATE indexes SET config=? WHERE id=?", (json.dumps(config), ix.id))
            if config.get("mirror_url") != current.get("mirror_url"):
                # a new upstream takes effect at once: forget what the old one said
                c.execute("DELETE FROM mirror_pages WHERE index_id=?", (ix.id,))
                for fn in self._upstream_listeners:
                    self.store.after_commit(lambda _c, fn=fn: fn(ix.id))
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
        if not ix.volatile:
            raise forbidden("index %s non-volatile, cannot delete" % path)
        self._check_not_a_base(ix)
        with self.store.write() as c:
            shas = self._file_shas(c, "f.index_id=?", (ix.id,))
            c.execute("DELETE FROM indexes WHERE id=?", (ix.id,))
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
        what it inherits from (resolve_bases). Every read through bases starts here or at
        ``walk``, so that a rule about who may read what is a change in this one place.

        ``reader`` is the user name asking (None: anonymous), or a function giving it,
        called only when a rule needs to know: a page anyone may read does not have to
        authenticate the request. (Today every reader sees everything.)"""
        return [ix] if ignore_bases else self.resolve_bases(ix)

    def walk(self, ix, norm, reader, ignore_bases=False):
        """The walk through bases for the project ``norm``, as ``reader`` sees it from
        ``ix``: a BaseWalk."""
        return BaseWalk(self, ix, norm, reader, self.chain(ix, reader, ignore_bases))

    # -- permissions -----------------------------------------------------------------------

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
        self._changed(project_set=True)
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
        if not version:
            raise bad_request("version needs to be set")
        check_version(version)
        norm = normalize_name(name)
        with self.store.write() as c:
            pid = self._project_id(c, ix, norm, name, True)
            self._version_id(c, pid, version, meta, time.time())
            self._changed(projects=[norm])

    def add_file(self, actor, ix, name, version, filename, tmp_path, sha256, size, meta,
                 rel="releasefile", for_filename=None, log_entry=None, core_metadata=None,
                 uploaded=None):
        """Store an uploaded file; the temporary file is consumed in all cases.

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
                    prev = json.loads(old["log"])
                    count = max([e.get("count", 1) for e in prev
                                 if e.get("what") == "overwrite"] or [0]) + 1
                    log_list = [{"what": "overwrite", "who": None, "when": when_list(now),
                                 "count": count}, entry]
                    self._retire_file(c, ix.id, old["id"], filename, old["sha256"],
                                      old["core_metadata"])
                pid = self._project_id(c, ix, norm, name, True)
                vid = self._version_id(c, pid, version, meta, now)
                self.store.place_blob(tmp_path, sha256)
                self.store.insert_file(c, ix.id, vid, filename, rel, sha256, size, now,
                                       requires_python, core_metadata, for_filename, log_list)
                self._changed(projects=[norm])
            return "OK"
        finally:
            if os.path.exists(tmp_path):
                _unlink_quiet(tmp_path)

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
        split = split_filename(filename, version)
        if split is None or split[2] == "doczip":
            raise bad_request("filename %r does not contain version %r" % (filename, version))
        if normalize_name(split[0]) != normalize_name(name):
            raise bad_request("filename %r does not match project name %r" % (filename, name))
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
                                   meta, core_metadata=core_sha)
        return reason, file_relpath(ix.path, sha256, filename)

    def upload_doczip(self, actor, ix, name, version, tmp_path, sha256, size):
        """Store a documentation zip for a release (``:action=doc_upload``). Without a
        version, the project's latest version in ``ix`` is taken, as devpi does."""
        self.check_upload(actor, ix)
        if not name:
            raise bad_request("name needs to be set for a doc upload")
        check_project_name(name)
        norm = normalize_name(name)
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
                             rel="doczip")

    def add_toxresult(self, actor, ix, filename, sha_prefix, report):
        """Keep a tox JSON report (what ``devpi test`` posts to a release file's URL) with
        that file, named as devpi names it: <file>.toxresult-<UTC YYYYmmddHHMMSS>-<n>, and
        served below the release file's hash directory. Allowed by the index's
        acl_toxresult_upload. Returns its path below the server root with #sha256=."""
        if ix.is_mirror:
            raise forbidden("cannot store toxresults on mirror index %s" % ix.path)
        if not self.can_upload(actor, ix, "acl_toxresult_upload"):
            if actor is None:
                raise unauthorized()
            raise forbidden("No permission to upload tox results. You can use the devpi "
                            "test --no-upload option to skip the upload.")
        if not isinstance(report, dict):
            raise bad_request("a toxresult is a JSON object (tox's JSON report)")
        data = json.dumps(report, ensure_ascii=False).encode("utf-8")
        now = time.time()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        sha = self.store.put_bytes(data)
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
                n = 0
                while c.execute("SELECT 1 FROM files WHERE index_id=? AND filename=?",
                                (ix.id, "%s.toxresult-%s-%d" % (filename, stamp, n))).fetchone():
                    n += 1
                name = "%s.toxresult-%s-%d" % (filename, stamp, n)
                check_filename(name)
                entry = {"what": "upload", "who": actor, "when": when_list(now), "dst": ix.path}
                self.store.insert_file(c, ix.id, row["version_id"], name, "toxresult", sha,
                                       len(data), now, "", None, filename, [entry])
                self._changed(projects=[row["name"]])
        except Exception:
            with self.store.write():
                self.store.drop_unused_blobs([sha])
            raise
        return file_relpath(ix.path, row["sha256"], name) + "#sha256=" + sha

    def _retire_file(self, c, index_id, file_id, filename, sha256, core_metadata):
        """Drop a file row that another of its name replaces: its URL answers 410, and its
        blobs go once nothing names them."""
        c.execute("DELETE FROM files WHERE id=?", (file_id,))
        c.execute("INSERT OR IGNORE INTO gone VALUES (?,?,?)", (index_id, filename, sha256))
        self.store.drop_unused_blobs([sha256, core_metadata])

    def _delete_files(self, c, ix, where, args):
        rows = c.execute("SELECT f.id, f.filename, f.sha256, f.core_metadata FROM files f "
                         "WHERE " + where, args).fetchall()
        for r in rows:
            c.execute("INSERT OR IGNORE INTO gone VALUES (?,?,?)",
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
        if not self._check_removable(actor, ix, force):
            raise forbidden("cannot delete version on non-volatile index")
        with self.store.write() as c:
            version_id = self._version_id_of(c, ix, norm, version)
            self._delete_files(c, ix, "f.version_id=?", (version_id,))
            c.execute("DELETE FROM versions WHERE id=?", (version_id,))
            self._changed(projects=[norm])

    def delete_project(self, actor, ix, name, force=False):
        norm = normalize_name(name)
        if not self._check_removable(actor, ix, force):
            raise forbidden("cannot delete project on non-volatile index")
        with self.store.write() as c:
            row = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                            (ix.id, norm)).fetchone()
            if row is None:
                raise not_found("project %r not found on %s" % (norm, ix.path))
            self._delete_files(c, ix, "f.version_id IN (SELECT id FROM versions "
                                      "WHERE project_id=?)", (row["id"],))
            c.execute("DELETE FROM projects WHERE id=?", (row["id"],))
            self._changed(projects=[norm], project_set=True)

    def delete_file(self, actor, ix, filename, sha_prefix, force=False):
        if not self._check_removable(actor, ix, force):
            raise forbidden("cannot delete file on non-volatile index")
        with self.store.write() as c:
            row = c.execute(
                "SELECT f.id, f.sha256, p.name FROM files f JOIN versions v ON f.version_id=v.id "
                "JOIN projects p ON v.project_id=p.id WHERE f.index_id=? AND f.filename=?",
                (ix.id, filename)).fetchone()
            if row is None or not row["sha256"].startswith(sha_prefix):
                raise self._missing_file(c, ix, filename, sha_prefix)
            # toxresults of this file go with it
            self._delete_files(c, ix, "f.index_id=? AND (f.id=? OR f.for_filename=?)",
                               (ix.id, row["id"], filename))
            c.execute("DELETE FROM files WHERE index_id=? AND (id=? OR for_filename=?)",
                      (ix.id, row["id"], filename))
            self._changed(projects=[row["name"]])

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
        with self.store.write() as c:
            version_id = self._version_id_of(c, ix, norm, version)
            c.execute("UPDATE versions SET yanked=? WHERE id=?", (value, version_id))
            self._changed(projects=[norm])

    def push(self, actor, src, name, version, target, no_docs=False, only_docs=False):
        """Copy a release with its files to another index; returns devpi's action log.

        The release is read in the transaction that writes the copy: one deleted meanwhile
        is not pushed, and no row is ever written for bytes that are gone."""
        norm = normalize_name(name)
        if target.is_mirror:
            raise not_found("cannot submit to mirror index")
        if not self.can_upload(actor, target):
            raise HTTPError(401 if actor is None else 403,
                            "user %r cannot upload to %r" % (actor, target.path))
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
                "SELECT filename, rel, sha256, size, uploaded, requires_python, core_metadata "
                "FROM files WHERE version_id=? AND rel IN ('releasefile', 'doczip') ORDER BY id",
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
            pid = self._project_id(c, target, norm, display, True)
            tvid = self._version_id(c, pid, version, json.loads(release["metadata"]), now)
            for f in files:
                filename, sha = f["filename"], f["sha256"]
                store_what = "store_%s" % ("releasefile" if f["rel"] == "releasefile"
                                           else "doczip")
                stored = file_relpath(target.path, sha, filename)
                old = c.execute("SELECT id, sha256, core_metadata FROM files "
                                "WHERE index_id=? AND filename=?",
                                (target.id, filename)).fetchone()
                if old is not None:
                    if old["sha256"] == sha:
                        actionlog.append([200, store_what, stored])
                        continue
                    self._retire_file(c, target.id, old["id"], filename, sha256=old["sha256"],
                                      core_metadata=old["core_metadata"])
                entry = {"what": "push", "who": actor, "when": when_list(now),
                         "src": ix.path, "dst": target.path}
                self.store.insert_file(c, target.id, tvid, filename, f["rel"], sha, f["size"],
                                       f["uploaded"], f["requires_python"], f["core_metadata"],
                                       log=[entry])
                actionlog.append([200, store_what, stored])
            if not only_docs:
                self._push_toxresults(c, release["id"], ix, target, tvid, files, actor, now,
                                      actionlog)
            self._changed(projects=[norm])
        return actionlog

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
            actionlog.append([200, "store_toxresult", stored])

    # -- releases: reading ------------------------------------------------------------------

    def project_names(self, ix, reader, ignore_bases=False):
        """{normalised name: display name} of the projects an index serves to ``reader``."""
        names = {}
        c = self.store.conn()
        for b in self.chain(ix, reader, ignore_bases):
            for norm, display in c.execute(
                    "SELECT name, display FROM projects WHERE index_id=?", (b.id,)):
                names.setdefault(norm, display)
        return names

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
            for f in got:
                if f.filename not in seen:
                    seen.add(f.filename)
                    files.append(f)
        return files if found else None

    def project_versions(self, ix, norm, reader):
        """Every version string of a project through the index and its bases (the mirrors
        the whitelist hides included: what they kept)."""
        walk = self.walk(ix, norm, reader)
        out = set()
        c = self.store.conn()
        for b in walk.chain:
            if walk.holds(b):
                for (v,) in c.execute("SELECT v.version FROM versions v JOIN projects p "
                                      "ON v.project_id=p.id WHERE p.index_id=? AND p.name=?",
                                      (b.id, norm)):
                    out.add(v)
        return out

    def releases(self, walk, mirror_data, version=None):
        """{version: [(metadata, yanked, [File]), ...]} of the walk's project through its
        visible indexes: first the release that counts, then the ones it shadows (devpi's
        ``+shadowing``), in the order of the chain; only ``version`` if given. None when no
        index has the project. ``mirror_data(mirror_index)`` gives a mirror's
        {version: (metadata, yanked, [File])}, or None."""
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
            for ver, release in data.items():
                if version is None or ver == version:
                    out.setdefault(ver, []).append(release)
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
VIA_HEADER = "X-Minidevpi-Via"  # marks our own upstream requests, to detect a loop


class UpstreamError(HTTPError):
    """The upstream of a mirror failed: 502 (bad answer) or 504 (no answer in time)."""


# -- simple pages: what the mirror's project list and the HTTP layer's pages share ----

def simple_html_head(title, heading=False):
    """The start of a simple page in HTML (PEP 503; the repository version of PEP 629),
    through <body> and, with ``heading``, the title as <h1>; SIMPLE_HTML_END ends it."""
    t = html.escape(title)
    return ('<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" '
            'content="1.1"><title>%s</title></head><body>\n' % t
            + ("<h1>%s</h1>\n" % t if heading else ""))


SIMPLE_HTML_END = "</body></html>\n"


def simple_root_links(names, prefix=""):
    """The <a> lines of a project list from (normalised name, name shown) pairs, the
    links relative, after ``prefix``."""
    esc = html.escape
    p = esc(prefix)
    return "".join('<a href="%s%s/">%s</a>\n' % (p, esc(norm), esc(shown))
                   for norm, shown in names)


# -- the upstream HTTP client ---------------------------------------------------------

POOL_IDLE_SECONDS = 30.0   # an idle upstream connection older than this is not reused
POOL_PER_HOST = 16         # idle connections kept per (scheme, host, port, proxy)
POOL_TOTAL = 64            # idle connections kept in all
_STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


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
    when the response was read to its end and may be followed by another, else closes it."""

    def __init__(self, upstream, key, conn, resp):
        self.upstream, self.key, self.conn, self.resp = upstream, key, conn, resp

    def close(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            self.upstream._release(self.key, conn, self.resp)


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
                 read_timeout=MIRROR_READ_TIMEOUT, allow_hosts=()):
        self.server_id = server_id
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.allow_hosts = parse_allow_hosts(allow_hosts)
        self._idle = {}  # pool key -> [(connection, time it went idle)], newest last
        self._idle_count = 0
        self._pool_lock = threading.Lock()
        self.connections_made = 0  # (for tests and the benchmark)

    def open(self, url, origin, headers=None, compressed=False):
        """GET ``url`` upstream (following a few redirects), for the mirror whose
        ``mirror_url`` is ``origin``; every hop must pass the mirror policy (``_route``).
        ``compressed`` asks for gzip (pages: ``body_chunks`` decompresses within its
        bound; never for files, which are kept as upstream sends them). Returns
        (response, final URL, connection); the caller reads the body and closes the
        connection (which goes back to the pool if the body was read to its end)."""
        import http.client
        import ssl
        seen = set()
        for _hop in range(MAX_REDIRECTS + 1):
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
                    try:
                        conn.request("GET", target, headers=h)
                        resp = conn.getresponse()
                    except _STALE_ERRORS + (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                        # closed by the peer while idle, before any answer: once more, anew
                        conn.close()
                        conn = None
                if conn is None:
                    conn = self._connect(u, port, addresses, proxy)
                    conn.request("GET", target, headers=h)
                    resp = conn.getresponse()
            except socket.timeout:
                if conn is not None:
                    conn.close()
                raise UpstreamError(504, "upstream %s did not answer in time" % _safe_url(url))
            except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as e:
                if conn is not None:
                    conn.close()
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
        if addresses is not None and not proxy:
            # connect to the addresses that were checked, not to whatever the name
            # resolves to a moment later (DNS rebinding); TLS still checks the name
            conn._create_connection = _connect_to(addresses)
        if proxy and u.scheme == "https":
            conn.set_tunnel(u.hostname, port)
        try:
            conn.connect()
            conn.sock.settimeout(self.read_timeout)
        except BaseException:
            conn.close()
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
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
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
        wire = total = 0
        while True:
            try:
                chunk = read(size)
            except socket.timeout:
                raise UpstreamError(504, "upstream %s stalled" % _safe_url(url))
            except (OSError, http.client.HTTPException) as e:
                raise UpstreamError(502, "upstream %s broke off: %s" % (_safe_url(url), e))
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


def _proxy_for(u):
    """(host, port) of the proxy for a URL, from the usual environment variables."""
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
        self._current = None
        self._text = []
        self.parser = P(convert_charrefs=True)

    def feed(self, text):
        self.parser.feed(text)
        return self


def parse_upload_time(value):
    if not isinstance(value, str):
        return None
    try:
        import datetime
        v = value.strip().replace("Z", "+00:00")
        if "." in v:  # fromisoformat on 3.9/3.10 wants 3 or 6 fraction digits
            head, _, rest = v.partition(".")
            digits = re.match(r"\d*", rest).group(0)
            v = head + "." + (digits + "000000")[:6] + rest[len(digits):]
        return datetime.datetime.fromisoformat(v).timestamp()
    except (ValueError, OverflowError):
        return None


def _entry(filename, url, sha256, requires_python=None, yanked=None, core_metadata=None,
           size=None, upload_time=None, md5=None):
    e = {"filename": filename, "url": url, "sha256": sha256,
         "requires_python": requires_python or "", "yanked": yanked,
         "core_metadata": core_metadata, "size": size, "upload_time": upload_time}
    if sha256 is None:  # a link upstream gives no sha256 for: fetched, then hashed here
        e["md5"] = md5
    return e


def ext_key(url):
    """The key of an upstream file that has no sha256 in our URL for it (+e/KEY/name):
    stable for as long as upstream's URL is, and nothing of that URL's text."""
    return hashlib.sha256(url.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _clean_sha(value):
    if isinstance(value, str) and re.match(r"^[0-9a-fA-F]{64}$", value):
        return value.lower()
    return None


def _clean_md5(value):
    if isinstance(value, str) and re.match(r"^[0-9a-fA-F]{32}$", value):
        return value.lower()
    return None


_MIRROR_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.!+_]*$")


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


def parse_project_page(body, content_type, page_url):
    """(display name, [file entries]) of an upstream PEP 691 JSON or PEP 503 HTML page.
    A link without a (well-formed) sha256 gets sha256 None (and its md5 if one is given):
    it is hashed when first fetched. A page with more than MAX_PAGE_LINKS links is refused."""
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
            if not isinstance(f, dict) or not isinstance(f.get("filename"), str) or \
                    not isinstance(f.get("url"), str):
                continue
            hashes = f.get("hashes") if isinstance(f.get("hashes"), dict) else {}
            meta = f.get("core-metadata", f.get("dist-info-metadata"))
            meta_sha = _clean_sha(meta.get("sha256")) if isinstance(meta, dict) else None
            yanked = f.get("yanked")
            yanked = (yanked if isinstance(yanked, str) else "") if yanked else None
            size = f.get("size") if isinstance(f.get("size"), int) else None
            rp = f.get("requires-python")
            try:
                url = urllib.parse.urljoin(page_url, f["url"])
            except ValueError:
                continue
            entries.append(_entry(f["filename"], url,
                                  _clean_sha(hashes.get("sha256")),
                                  rp if isinstance(rp, str) else None, yanked, meta_sha,
                                  size, parse_upload_time(f.get("upload-time")),
                                  _clean_md5(hashes.get("md5"))))
        name = data.get("name") if isinstance(data.get("name"), str) else None
        return name, entries
    if ctype in ("text/html", SIMPLE_HTML, "application/xhtml+xml", ""):
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = body.decode("latin-1")
        entries = []
        for attrs, label in _LinkParser(MAX_PAGE_LINKS, page_url).feed(text).links:
            href = attrs.get("href")
            if not href:
                continue
            try:
                url, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
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
            yanked = attrs.get("data-yanked")
            entries.append(_entry(filename, url, sha, attrs.get("data-requires-python"),
                                  yanked if "data-yanked" in attrs else None, meta_sha, None,
                                  parse_upload_time(attrs.get("data-upload-time")), md5))
        return None, entries
    raise UpstreamError(502, "upstream %s answered with %r, not an index page"
                        % (_safe_url(page_url), content_type))


class Mirror:
    """On-demand mirrors (indexes of type ``mirror``): project pages fetched from
    ``mirror_url`` and kept ``mirror_cache_expiry`` seconds, files fetched on first
    download, checked against upstream's sha256 and kept for good, so installs keep
    working with the upstream unplugged. ``offline`` makes no upstream traffic at all."""

    def __init__(self, model, offline=False, connect_timeout=MIRROR_CONNECT_TIMEOUT,
                 read_timeout=MIRROR_READ_TIMEOUT, max_file=DEFAULT_MAX_BODY, allow_hosts=()):
        self.model = model
        self.store = model.store
        self.offline = offline
        self.upstream = Upstream(model.store.uuid, connect_timeout, read_timeout, allow_hosts)
        self.max_file = max_file
        self._flights = {}
        self._flights_lock = threading.Lock()
        self._fresh = {}  # (index id, project) -> time upstream last confirmed the page
        self._failed = {}  # (index id, project) -> (time, error) of the last upstream failure
        self._root_refreshing = set()
        model.on_upstream_change(self._forget_index)

    def _forget_index(self, index_id):
        for cache in (self._fresh, self._failed):
            for key in [k for k in cache if k[0] == index_id]:
                cache.pop(key, None)
        shutil.rmtree(os.path.join(self.store.serverdir, "+mirror", str(index_id)),
                      ignore_errors=True)

    # -- one fetch at a time per thing --------------------------------------------------

    @contextlib.contextmanager
    def single_flight(self, key):
        """Yields True to the one caller that should do the work; the others wait until
        it is done and get False (they then read what it stored)."""
        with self._flights_lock:
            ev = self._flights.get(key)
            leader = ev is None
            if leader:
                ev = self._flights[key] = threading.Event()
        if not leader:
            ev.wait(self.upstream.connect_timeout + self.upstream.read_timeout * 6 + 60)
            yield False
            return
        try:
            yield True
        finally:
            with self._flights_lock:
                self._flights.pop(key, None)
            ev.set()

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

    def page(self, ix, norm):
        """(display, entries) of a mirrored project, or None when upstream has no such
        project. Fetches or revalidates upstream when the cached page expired; serves a
        stale page (logging a warning) when upstream fails. A name that is not a valid
        project name is no project: upstream is not asked."""
        if self.offline or len(norm) > 200 or not PROJECT_NAME_RE.match(norm):
            return None
        key = (ix.id, norm)
        fresh = self._fresh.get(key)
        if fresh is not None and time.time() - fresh < self._expiry(ix):
            row = self._row(ix, norm)
            if row is not None:
                return (row["display"], json.loads(row["files"])) if row["status"] == 200 else None
        row = self._row(ix, norm)
        if row is not None and time.time() - row["fetched"] < self._expiry(ix):
            self._fresh[key] = row["fetched"]
            return (row["display"], json.loads(row["files"])) if row["status"] == 200 else None
        failed = self._failed.get(key)
        if failed is not None and time.time() - failed[0] < min(FAILURE_BACKOFF,
                                                                 self._expiry(ix)):
            # upstream failed a moment ago: don't make every request wait for it again
            if row is not None and row["status"] == 200:
                return row["display"], json.loads(row["files"])
            raise failed[1]
        with self.single_flight(("page",) + key) as leader:
            # the one before us in the flight may have just fetched it
            newer = self._row(ix, norm)
            if newer is not None and (not leader or row is None or newer["fetched"] > row["fetched"]):
                return (newer["display"], json.loads(newer["files"])) if newer["status"] == 200 else None
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
                    return row["display"], json.loads(row["files"])
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
        """Drop a cached page (devpi's refresh): the next request asks upstream."""
        with self.store.write() as c:
            c.execute("DELETE FROM mirror_pages WHERE index_id=? AND project=?", (ix.id, norm))
        self._fresh.pop((ix.id, norm), None)
        self._failed.pop((ix.id, norm), None)

    def _fetch_page(self, ix, norm, row):
        url = self._page_url(ix, norm)
        headers = {"Accept": "%s, %s;q=0.2, text/html;q=0.1" % (SIMPLE_JSON, SIMPLE_HTML)}
        if row is not None and row["status"] == 200:
            if row["etag"]:
                headers["If-None-Match"] = row["etag"]
            if row["last_modified"]:
                headers["If-Modified-Since"] = row["last_modified"]
        resp, final_url, conn = self.upstream.open(url, ix.config.get("mirror_url"), headers,
                                                   compressed=True)
        try:
            now = time.time()
            if resp.status == 304 and row is not None:
                with self.store.write() as c:
                    c.execute("UPDATE mirror_pages SET fetched=? WHERE index_id=? AND project=?",
                              (now, ix.id, norm))
                self._fresh[(ix.id, norm)] = now
                return row["display"], json.loads(row["files"])
            if resp.status == 404:
                self.upstream.read_body(resp, url, 1024 * 1024)
                self._store_page(ix, norm, now, 404, None, None, None, [])
                if self.model.local_files(ix, norm):
                    log("WARNING: upstream has no project %s (404) any more; %s keeps "
                        "listing the files it kept (stale)" % (norm, ix.path))
                return None
            if resp.status != 200:
                raise UpstreamError(502, "upstream %s answered %d" % (_safe_url(url),
                                                                     resp.status))
            body = self.upstream.read_body(resp, final_url, MAX_PAGE_BYTES)
            display, entries = parse_project_page(body, resp.getheader("Content-Type"),
                                                  final_url)
            del body
            # upstream's names are data: files are taken only under the project whose
            # page lists them, and a display name only if it is a valid spelling of it
            entries = [e for e in entries if _file_of_project(e["filename"], norm)]
            if not _is_display_of(display, norm):
                display = row["display"] if row and _is_display_of(row["display"], norm) else norm
            self._store_page(ix, norm, now, 200, resp.getheader("ETag"),
                             resp.getheader("Last-Modified"), display, entries)
            return display, entries
        finally:
            conn.close()

    def _store_page(self, ix, norm, now, status, etag, last_modified, display, entries):
        data = json.dumps(entries)
        with self.store.write() as c:
            old = c.execute("SELECT files, status FROM mirror_pages WHERE index_id=? AND "
                            "project=?", (ix.id, norm)).fetchone()
            c.execute("INSERT OR REPLACE INTO mirror_pages VALUES (?,?,?,?,?,?,?,?)",
                      (ix.id, norm, now, status, etag, last_modified, display, data))
            if old is None or old["files"] != data or old["status"] != status:
                self.model.mirror_page_changed(norm)
        self._fresh[(ix.id, norm)] = now

    def files(self, ix, norm):
        """The files of a mirrored project as the model lists them (upstream's, and those
        kept locally), or None when neither has the project."""
        local = self.model.local_files(ix, norm)
        page = self.page(ix, norm)
        if page is None:
            return local
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
                    out.append(kept)  # hashed when it was fetched: listed with its hash
                else:
                    out.append(File(ix.path, norm, version, filename=e["filename"],
                                    rel="releasefile", sha256=None, size=e["size"] or 0,
                                    uploaded=e["upload_time"] or 0,
                                    requires_python=e["requires_python"], yanked=e["yanked"],
                                    ext=ext_key(e["url"])))
                continue
            core = e["core_metadata"]
            out.append(File(ix.path, norm, version, filename=e["filename"], rel="releasefile",
                            sha256=e["sha256"], size=e["size"] or 0,
                            uploaded=e["upload_time"] or (kept.uploaded if kept else 0),
                            requires_python=e["requires_python"], core_metadata=core,
                            yanked=e["yanked"]))
        out.extend(have.values())
        return out

    def find_entry(self, ix, filename, sha_prefix, ext=None):
        """(display name, entry) of a file on its project's upstream page, or None; with
        ``ext``, the link without a hash whose ext_key that is."""
        split = split_filename(filename)
        if split is None:
            return None
        norm = normalize_name(split[0])
        if not _file_of_project(filename, norm):
            return None
        page = self.page(ix, norm)
        if page is None:
            return None
        for e in page[1]:
            if e["filename"] != filename:
                continue
            if (e["sha256"].startswith(sha_prefix) if e["sha256"] else
                    ext is not None and ext_key(e["url"]) == ext):
                return (page[0] if _is_display_of(page[0], norm) else norm), e
        return None

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
        found = self.find_entry(ix, filename, sha_prefix, ext)
        if found is None:
            raise not_found("no such file")
        display, entry = found
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
            resp, url, conn = self.upstream.open(entry["url"], ix.config.get("mirror_url"))
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
        chunks = Download(self._stream(ix, display, entry, resp, size, cleanup), cleanup)
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
            if held is not None:
                yield held
        finally:
            if not ok:
                _unlink_quiet(tmp)
                log("WARNING: mirror download of %s on %s failed" % (entry["filename"], ix.path))
            cleanup()

    def _keep(self, ix, display, entry, tmp, size, sha):
        version = filename_version(entry["filename"])
        meta = {"requires_python": entry["requires_python"]} if entry["requires_python"] else {}
        core = entry["core_metadata"]
        if core and not os.path.exists(self.store.blob_path(core)):
            core = None  # offered, but not fetched yet: it is fetched on first request
        self.model.add_file(None, ix, display, version, entry["filename"], tmp, sha,
                            size, meta, core_metadata=core,
                            uploaded=entry["upload_time"] or time.time(),
                            log_entry={"what": "mirror", "who": None, "when": when_list(),
                                       "src": _safe_url(entry["url"])})

    def core_metadata(self, ix, filename, sha_prefix):
        """Blob path of a mirrored wheel's PEP 658 metadata, fetched once and checked."""
        found = self.find_entry(ix, filename, sha_prefix) if not self.offline else None
        if found is None:
            raise not_found("no such file")
        entry = found[1]
        sha = entry["core_metadata"]
        if not sha:
            raise not_found("upstream offers no metadata file for %s" % filename)
        path = self.store.blob_path(sha)
        if os.path.exists(path):
            return path, sha
        with self.single_flight(("meta", sha)):
            if not os.path.exists(path):  # (kept meanwhile by the one before us?)
                resp, url, conn = self.upstream.open(entry["url"] + ".metadata",
                                                ix.config.get("mirror_url"))
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
        return path, sha

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
        if age is None:
            if self.offline:
                return None
            with self.single_flight(("root", ix.id)):
                if not os.path.exists(path):  # (fetched meanwhile by the one before us?)
                    self._fetch_root(ix, d)
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

    def _fetch_root(self, ix, d):
        """Fetch upstream's project list and write it as HTML and JSON, each also gzipped,
        in one streaming pass: the list is never held in memory whole (600,000 names)."""
        url = ix.config.get("mirror_url", "").rstrip("/") + "/"
        resp, final_url, conn = self.upstream.open(
            url, ix.config.get("mirror_url"), {"Accept": "%s, text/html;q=0.1" % SIMPLE_JSON},
            compressed=True)
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
            _write_root_listing(self.store, d, names, url)
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


def _write_root_listing(store, d, batches, url):
    """root.html and root.json in ``d``, each with a .gz twin, from batches of names."""
    quote = json.encoder.encode_basestring
    outs = {}
    try:
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
        write("json", '{"meta": {"api-version": "1.1"}, "projects": [')
        first = True
        for names in batches:
            if not names:
                continue
            # (valid project names need no escaping; escaped anyway, cheaply)
            write("html", simple_root_links((normalize_name(n), n) for n in names))
            write("json", ("" if first else ", ") + ", ".join('{"name": %s}' % quote(n)
                                                              for n in names))
            first = False
        write("html", SIMPLE_HTML_END)
        write("json", "]}")
        for fmt, (f, tmp, gf, gtmp, gz) in outs.items():
            gz.close()
            gf.close()
            f.close()
        for fmt, (f, tmp, gf, gtmp, gz) in outs.items():
            os.replace(gtmp, os.path.join(d, "root.%s.gz" % fmt))
            os.replace(tmp, os.path.join(d, "root." + fmt))
        outs = {}
    finally:
        for f, tmp, gf, gtmp, gz in outs.values():
            for x in (gz, gf, f):
                try:
                    x.close()
                except Exception:
                    pass
            _unlink_quiet(tmp)
            _unlink_quiet(gtmp)


class Download:
    """Chunks of a file coming from upstream; ``close()`` releases the upstream connection
    whether or not the chunks were ever read."""

    def __init__(self, chunks, cleanup):
        self.chunks = chunks
        self.cleanup = cleanup

    def __iter__(self):
        return self.chunks

    def close(self):
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

    __slots__ = ("status", "headers", "body", "file_path", "file_size", "reason", "stream")

    def __init__(self, status=200, body=b"", headers=None, reason=None):
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []
        self.file_path = None
        self.file_size = 0
        self.reason = reason
        self.stream = None  # an iterable of chunks with close(), of file_size bytes in all


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
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + ".%06dZ" % int(
        (ts % 1) * 1000000)


def http_date(ts):
    return email.utils.formatdate(ts, usegmt=True)


class CachedPage:
    __slots__ = ("validator", "body", "gzipped", "etag", "content_type")

    def __init__(self, validator, body, content_type):
        self.validator = validator
        self.body = body
        self.content_type = content_type
        self.etag = '"%s"' % hashlib.sha256(body).hexdigest()[:32]
        self.gzipped = gzip.compress(body, 6) if len(body) > 2048 else None


class PageCache:
    """Rendered simple pages as bytes, valid while their generations are unchanged; the
    least recently used go first once they take more than ``max_bytes``.

    The generations count the model's commits (``changed``, a listener of
    ``Model.on_change``): any index config, the set of projects, each project's releases.
    A page is stored with the generations it was built from (its validator)."""

    def __init__(self, max_bytes=16 * 1024 * 1024):
        import collections
        self.pages = collections.OrderedDict()
        self.max_bytes = max_bytes
        self.size = 0
        self.lock = threading.Lock()
        self.gen_config = 0
        self.gen_projects = 0
        self.gen_project = {}

    def changed(self, config, project_set, projects):
        if config:
            self.gen_config += 1
        if project_set:
            self.gen_projects += 1
        for name in projects:
            self.gen_project[name] = self.gen_project.get(name, 0) + 1

    def root_validator(self):
        """What a project list depends on."""
        return self.gen_config, self.gen_projects

    def project_validator(self, norm):
        """What a project's page depends on."""
        return self.gen_config, self.gen_project.get(norm, 0)

    def get(self, key, validator):
        page = self.pages.get(key)
        if page is not None and page.validator == validator:
            try:
                self.pages.move_to_end(key)
            except KeyError:
                pass
            return page
        return None

    def put(self, key, validator, body, content_type):
        page = CachedPage(validator, body, content_type)
        cost = len(page.body) + len(page.gzipped or b"") + 200
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

def render_simple_root(names, fmt, prefix=""):
    """(body, content type) of an index's project list: ``names`` normalised and sorted,
    HTML links relative, after ``prefix``."""
    if fmt == "json":
        return json.dumps({"meta": {"api-version": "1.1"},
                           "projects": [{"name": n} for n in names]}).encode(), SIMPLE_JSON
    links = simple_root_links(((n, n) for n in names), prefix)
    return (simple_html_head("Simple index") + links + SIMPLE_HTML_END).encode(), HTML_TYPE


def render_simple_project(norm, display, files, versions, fmt, href):
    """(body, content type) of a project's simple page: its ``files`` (File rows), linked
    to ``href(f)``; ``versions``, those without files too (PEP 700, in JSON)."""
    if fmt == "json":
        out = []
        versions = set(versions)
        for f in files:
            versions.add(f.version)
            d = {"filename": f.filename, "url": href(f),
                 "hashes": {"sha256": f.sha256} if f.sha256 else {}}
            if f.requires_python:
                d["requires-python"] = f.requires_python
            meta = offered_core_metadata(f)
            if meta:
                # PEP 714: only the new key in JSON (pip 22.3-23.1 crash on the old one)
                d["core-metadata"] = {"sha256": meta}
            d["yanked"] = (f.yanked or True) if f.yanked is not None else False
            d["size"] = f.size
            d["upload-time"] = iso_upload_time(f.uploaded)
            out.append(d)
        body = json.dumps({"meta": {"api-version": "1.1"}, "name": norm,
                           "versions": sorted(versions, key=version_key),
                           "files": out}).encode()
        return body, SIMPLE_JSON
    esc = html.escape
    lines = [simple_html_head("Links for %s" % display, heading=True)]
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
        lines.append('<a href="%s%s"%s>%s</a><br>\n'
                     % (esc(href(f)), "#sha256=" + f.sha256 if f.sha256 else "", attrs,
                        esc(f.filename)))
    lines.append(SIMPLE_HTML_END)
    return "".join(lines).encode(), HTML_TYPE


# -- routes ---------------------------------------------------------------------------


# Path variables: {name} is one segment that does not start with "+" (those are the
# server's own words), {name:rest} one or more segments (a path inside a release's docs).
ROUTE_VARIABLES = {"": r"[^/+][^/]*", "rest": r".+"}
ROUTE_SPECS = [
    # method   path pattern                                        handler (App.route_...)
    ("GET",    "/+api",                                            "api"),
    ("GET",    "/+status",                                         "status"),
    ("POST",   "/+login",                                          "login"),
    ("GET",    "/",                                                "list_users"),
    ("GET",    "/{user}/+api",                                     "api"),
    ("GET",    "/{user}",                                          "get_user"),
    ("PUT",    "/{user}",                                          "create_user"),
    ("PATCH",  "/{user}",                                          "modify_user"),
    ("DELETE", "/{user}",                                          "delete_user"),
    ("GET",    "/{user}/{index}/+api",                             "api"),
    ("GET",    "/{user}/{index}/+simple",                          "simple_root"),
    ("GET",    "/{user}/{index}/+simple/{project}",                "simple_project"),
    ("POST",   "/{user}/{index}/+simple/{project}/refresh",        "refresh"),
    ("GET",    "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "get_file"),
    ("HEAD",   "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "get_file"),
    ("DELETE", "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "delete_file"),
    ("POST",   "/{user}/{index}/+f/{h3}/{h13}/{filename}",         "post_toxresult"),
    ("GET",    "/{user}/{index}/+e/{key}/{filename}",              "get_ext_file"),
    ("GET",    "/{user}/{index}",                                  "get_index"),
    ("PUT",    "/{user}/{index}",                                  "create_index"),
    ("PATCH",  "/{user}/{index}",                                  "modify_index"),
    ("DELETE", "/{user}/{index}",                                  "delete_index"),
    ("POST",   "/{user}/{index}",                                  "upload_or_push"),
    ("PUSH",   "/{user}/{index}",                                  "push"),
    ("GET",    "/{user}/{index}/{project}",                        "get_project"),
    ("DELETE", "/{user}/{index}/{project}",                        "delete_project"),
    ("GET",    "/{user}/{index}/{project}/{version}",              "get_version"),
    ("PATCH",  "/{user}/{index}/{project}/{version}",              "yank_version"),
    ("DELETE", "/{user}/{index}/{project}/{version}",              "delete_version"),
    ("GET",    "/{user}/{index}/{project}/{version}/+doc",         "doc_root"),
    ("GET",    "/{user}/{index}/{project}/{version}/+doc/{path:rest}", "doc"),
]


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


class App:
    """The HTTP surface over a Model: each route handler turns a Request into a Response."""

    def __init__(self, model, outside_url=None, max_body=DEFAULT_MAX_BODY, offline=False,
                 mirror_timeouts=(MIRROR_CONNECT_TIMEOUT, MIRROR_READ_TIMEOUT),
                 mirror_allow_hosts=()):
        self.model = model
        self.store = model.store
        self.mirror = Mirror(model, offline=offline, connect_timeout=mirror_timeouts[0],
                             read_timeout=mirror_timeouts[1], max_file=max_body,
                             allow_hosts=mirror_allow_hosts)
        self.outside_url = outside_url.rstrip("/") if outside_url else None
        self.max_body = max_body
        self.pages = PageCache()
        model.on_change(self.pages.changed)
        self._doc_cache = {}  # sha256 of a doc zip: its members (App._doc_members)

    # -- dispatch ---------------------------------------------------------------------

    def dispatch(self, req):
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
            return getattr(self, name)(req, **m.groupdict())
        if allowed:
            raise HTTPError(405, "method %s not allowed here" % req.method,
                            {"Allow": ", ".join(sorted(allowed))})
        raise not_found("The resource could not be found: %s" % path)

    def authenticate_request(self, req):
        h = req.headers
        creds = []
        xauth = h.get("X-Devpi-Auth")
        if xauth:
            creds.append(xauth)
        auth = h.get("Authorization") or ""
        if auth[:6].lower() == "basic ":
            creds.append(auth[6:].strip())
        for cred in creds:
            try:
                user, sep, secret = base64.b64decode(cred, validate=True).decode(
                    "utf-8").partition(":")
            except (binascii.Error, ValueError, UnicodeDecodeError):
                continue
            if sep and user and len(user) <= 100 and len(secret) <= 4096:
                try:
                    name = self.model.accounts.authenticate(user, secret,
                                                            req.handler.client_address[0])
                except HTTPError as e:
                    if e.status != 429 or req.method not in ("GET", "HEAD"):
                        raise
                    continue  # a read goes on anonymously, as with a wrong password
                if name:
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
        if user is not None and index is None and not self.model.user_exists(user):
            raise not_found("no user %r" % user)
        if index is not None:
            ix = self.model.require_index(user + "/" + index)
            result["index"] = req.absolute(ix.path)
            result["simpleindex"] = req.absolute(ix.path + "/+simple/")
            if not ix.is_mirror:
                result["pypisubmit"] = req.absolute(ix.path + "/")
        return api_result("apiconfig", result)

    def route_status(self, req):
        return api_result("status", {
            "versioninfo": {"devpi-server": DEVPI_SERVER_VERSION, "minidevpi": __version__},
            "serial": self.store.serial, "uuid": self.store.uuid,
            "serverdir": self.store.serverdir, "outside-url": self.outside_url,
            "host": req.handler.server.server_address[0],
            "port": req.handler.server.server_address[1],
        })

    def route_login(self, req):
        # never authenticated first (a stale token would count as a wrong password)
        body = req.json_body(JSON_MAX_BODY_ANONYMOUS)
        if not isinstance(body, dict) or not isinstance(body.get("user"), str) \
                or not isinstance(body.get("password"), str):
            raise bad_request("Bad request: no user/password specified")
        result = self.model.accounts.login(body["user"], body["password"],
                                  req.handler.client_address[0])
        return api_result("proxyauth", result, message="login successful")

    def route_list_users(self, req):
        return api_result("list:userconfig", self.model.list_users(actor=req.actor))

    # -- users --------------------------------------------------------------------------

    def route_get_user(self, req, user):
        return api_result("userconfig", self.model.user_info(user, actor=req.actor))

    def route_create_user(self, req, user):
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

    # -- indexes ------------------------------------------------------------------------

    def route_get_index(self, req, user, index):
        path = user + "/" + index
        m = self.model
        if not wants_json(req.accept) and (req.is_installer or wants_simple(req.accept)):
            return self.simple_root(req, m.require_index(path))
        ix = m.require_index(path)
        result = m.shown_config(ix.config, req.actor)
        if "no_projects" not in req.query:
            result["projects"] = sorted(m.project_names(ix, req.actor, ignore_bases=True))
        return api_result("indexconfig", result)

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
        if not wants_json(req.accept) and (req.is_installer or wants_simple(req.accept)):
            return self.simple_project_page(req, ix, norm)
        return api_result("projectconfig", self.project_config(
            req, ix, norm, ignore_bases="ignore_bases" in req.query))

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

    def project_config(self, req, ix, norm, ignore_bases=False):
        walk = self.model.walk(ix, norm, lambda: req.actor, ignore_bases)
        releases = self.model.releases(walk, lambda b: self.mirror_version_data(b, walk))
        if releases is None:
            raise not_found("no project %r" % norm)
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
        walk = m.walk(ix, norm, lambda: req.actor)
        found = (m.releases(walk, lambda b: self.mirror_version_data(b, walk), version)
                 or {}).get(version)
        if not found:
            raise not_found("The version %s of project %s does not exist." % (version, norm))
        return api_result("versiondata", self._shadowing_json(req, found))

    # -- upload -------------------------------------------------------------------------

    def upload(self, req, ix):
        req.is_upload = True  # errors go into the reason phrase, where upload clients look
        m = self.model
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
        """{name: zip entry} of a stored doc zip; the last few are kept (by content)."""
        cache = self._doc_cache
        members = cache.get(sha256)
        if members is None:
            with open(blob, "rb") as f:
                members = doc_zip_members(f)
            while len(cache) >= 16:
                cache.pop(next(iter(cache)), None)
            cache[sha256] = members
        return members

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
            with open(blob, "rb") as fh:
                data = _zip_member(fh, entry, MAX_DOC_MEMBER_BYTES)
        except (OSError, ValueError, zipfile.BadZipFile):
            raise not_found("the documentation of %s %s can't be read" % (f.project, f.version))
        ctype, encoding = mimetypes.guess_type(name)
        if encoding or not ctype:
            ctype = "application/octet-stream"
        return Response(200, data, [("Content-Type", ctype)] + list(self.DOC_HEADERS))

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
        if wants_json(req.accept) and not metadata:
            return api_result("releasefilemeta", {
                "hash_spec": "sha256=" + f.sha256, "hashes": {"sha256": f.sha256},
                "last_modified": http_date(f.uploaded), "project": f.project,
                "version": f.version})
        sha = f.core_metadata if metadata else f.sha256
        return self._blob_response(req, self.store.blob_path(sha), sha, f.filename, f.uploaded,
                                   metadata)

    def route_get_ext_file(self, req, user, index, key, filename):
        """A mirrored file upstream gave no hash for: served from disk once kept (also
        offline), else fetched, hashed and kept on this first download."""
        ix = self.model.require_index(user + "/" + index)
        if not ix.is_mirror or len(key) != 16 or not HEX_RE.match(key):
            raise not_found("no such file")
        try:
            f = self.model.find_file(ix, filename, "")
        except HTTPError as e:
            if e.status != 404:
                raise
            return self._mirror_download(req, ix, filename, "", ext=key)
        return self._blob_response(req, self.store.blob_path(f.sha256), f.sha256, f.filename,
                                   f.uploaded, False)

    def _file_headers(self, sha, filename, uploaded, metadata):
        # a file URL holds its sha256: its bytes can never change, any cache may keep them
        return [("Content-Type", file_content_type(filename, metadata)),
                ("ETag", '"%s"' % sha),
                ("Last-Modified", http_date(uploaded)),
                ("Cache-Control", "public, max-age=31536000, immutable")]

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
        return r

    def _mirror_download(self, req, ix, filename, sha_prefix, ext=None):
        """First download of a mirrored file: streamed from upstream while it is kept."""
        got = self.mirror.download(ix, filename, sha_prefix, ext)
        if got is None or req.method == "HEAD":
            if got is not None:  # HEAD: fetch it whole, then answer from disk
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
        found = self.mirror.find_entry(ix, filename, sha_prefix)
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

    def simple_root(self, req, ix):
        fmt = choose_simple_format(req.accept)
        m = self.model
        if ix.is_mirror and req.path.endswith("/+simple/"):
            resp = self.mirror_root(req, ix, fmt)
            if resp is not None:
                return resp
        validator = self.pages.root_validator()
        base = self._page_base(req)
        key = ("root", ix.path, fmt, base)
        page = self.pages.get(key, validator)
        if page is None:
            prefix = posixpath.relpath("/%s/+simple/" % ix.path, base)
            prefix = "" if prefix == "." else prefix + "/"
            page = self.pages.put(key, validator, *render_simple_root(
                sorted(m.project_names(ix, lambda: req.actor)), fmt, prefix))
        return self.page_response(req, page)

    def simple_project_page(self, req, ix, norm):
        fmt = choose_simple_format(req.accept)
        m = self.model
        validator = self.pages.project_validator(norm)
        base = self._page_base(req)
        absolute = bool(req.headers.get("X-Devpi-Absolute-Urls"))
        key = ("project", ix.path, norm, fmt, base,
               req.outside_url() if absolute else None)
        mirrors = m.walk(ix, norm, lambda: req.actor).mirrors
        if mirrors:
            for b in mirrors:
                self.mirror.ensure_fresh(b, norm)
            validator = self.pages.project_validator(norm)
        page = self.pages.get(key, validator)
        if page is None:
            walk = m.walk(ix, norm, lambda: req.actor)  # (read after the validator)
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
                if self.mirror.offline and any(b.is_mirror for b in walk.chain):
                    raise not_found("The project %s is not kept locally (offline mode: no "
                                    "upstream traffic)" % norm)
                raise not_found("The project %s does not exist." % norm)
            display = walk.display or norm
            if absolute:
                def href(f):
                    return req.absolute(f.relpath)
            else:
                def href(f):
                    return posixpath.relpath("/" + f.relpath, base)
            versions = m.project_versions(ix, norm, lambda: req.actor) if fmt == "json" else ()  # (HTML has none)
            rendered = render_simple_project(norm, display, files, versions, fmt, href)
            if errors:  # partial (a mirror failed): serve, but do not keep
                page = CachedPage(None, *rendered)
            else:
                page = self.pages.put(key, validator, *rendered)
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
        t0 = time.monotonic()
        self.raw_in.pause()  # the headers are in; a body is bounded when a route reads it
        app = self.server.app
        req = None
        self.body = None
        try:
            self.body = self._request_body()
            path, query = self._parse_target()
            req = Request(self, app, self.command, path, query, False)
            resp = app.dispatch(req)
        except HTTPError as e:
            resp = self._error_response(e, req)
        except Exception:
            if self.raw_in.failed:  # the client stalled or went away while sending its body
                resp = message_response("request body not received in time", 408)
            else:  # a bug: log it, answer 500, keep serving
                import traceback
                log("ERROR handling %s %s:\n%s" % (self.command, self.path[:200],
                                                    traceback.format_exc()))
                resp = message_response("internal server error", 500)
        unread = self._finish_body()
        self._send(resp, req)
        if unread:
            self._linger()
        self.server.log_access(self, resp, time.monotonic() - t0)

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
        resp = message_response(e.message, e.status)
        resp.headers.extend(e.headers.items())
        if e.challenge:
            resp.headers.append(("WWW-Authenticate", 'Basic realm="pypi"'))
        if e.retry_after is not None:
            resp.headers.append(("Retry-After", str(e.retry_after)))
        if req is not None and req.is_upload:
            # upload clients (devpi upload, twine) print the reason phrase, not the body
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

    def _send(self, resp, req):
        status = resp.status
        reason = resp.reason or self.responses.get(status, ("Error",))[0]
        head = ["HTTP/1.1 %d %s\r\n" % (status, reason)]
        for k, v in COMMON_HEADERS:
            head.append("%s: %s\r\n" % (k, v))
        store = self.server.app.store
        head.append("X-Devpi-Serial: %d\r\nX-Devpi-Uuid: %s\r\nX-Devpi-Master-Uuid: %s\r\n"
                    "X-Devpi-Primary-Uuid: %s\r\n" % (store.serial, store.uuid, store.uuid,
                                                      store.uuid))
        for k, v in resp.headers:
            head.append("%s: %s\r\n" % (k, v))
        length = resp.file_size if (resp.file_path or resp.stream) else len(resp.body)
        if status != 304:
            head.append("Content-Length: %d\r\n" % length)
        if self.close_connection or (self.headers.get("Connection", "").lower() == "close"):
            self.close_connection = True
            head.append("Connection: close\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1", "replace")
        send_body = self.command != "HEAD" and status != 304
        try:
            if resp.stream is not None:
                self._send_stream(data, resp)
            elif resp.file_path and send_body:
                with open(resp.file_path, "rb") as f:
                    if length <= SMALL_FILE:  # metadata, small wheels: one write
                        self.wfile.write(data + f.read(length))
                    else:
                        self._sendfile(data, f, length)
            else:
                self.wfile.write(data + resp.body if send_body else data)
        except OSError:
            self.close_connection = True

    def _sendfile(self, head, f, count):
        """Headers, then the file by the kernel (``socket.sendfile``: it gives up on a
        client that stops reading for the connection timeout). On Linux TCP_CORK holds
        the headers back to go out with the file in full-sized segments."""
        sock = self.connection
        cork = getattr(socket, "TCP_CORK", None)
        if cork is None:
            self.wfile.write(head)
            sock.sendfile(f, 0, count)
            return
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
        try:
            self.wfile.write(head)
            sock.sendfile(f, 0, count)
        finally:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    def _send_stream(self, head, resp):
        """Send chunks as they come; if they fail, cut the connection so the client sees a
        short body, never a complete bad one."""
        try:
            self.wfile.write(head)
            for chunk in resp.stream:
                self.wfile.write(chunk)
        except HTTPError as e:
            log("ERROR: %s; connection cut" % e.message)
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
        self.connections_lock = threading.Lock()
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

    def close_connections(self, wait=5.0):
        """Shut every open connection and wait (a while) for their threads to finish, so
        that nothing still uses the database when it is closed."""
        with self.connections_lock:
            conns = list(self.connections)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with self.connections_lock:
                if not self.connections:
                    return True
            time.sleep(0.01)
        return False

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, socket.timeout, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def log_access(self, handler, resp, elapsed):
        if self.access_log:
            log('%s - "%s %s" %d %.1fms' % (handler.client_address[0], handler.command,
                                           handler.path[:300], resp.status, elapsed * 1000))


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


def init_serverdir(serverdir, root_password=None, root_pwhash=None, root_pypi=True,
                   mirror_url=None, hash_soon=False, root_unusable=False):
    """Create a server directory with root and (unless told not to) root/pypi.

    Returns the Store, opened. Refuses a directory that is already initialised.
    """
    store = Store(serverdir)
    if store.is_initialised():
        raise MinidevpiError("%s is already initialised; nothing was changed" % store.serverdir)
    if os.path.isdir(serverdir) and os.listdir(serverdir):
        raise MinidevpiError("%s is not empty; initialise a new or empty directory"
                        % store.serverdir)
    store.create()
    store.open()
    model = Model(store)
    if root_unusable:  # (an import, which gives root its password next)
        model.create_user(None, "root", {}, pwhash="!none")
    elif root_pwhash is not None:
        if not is_known_hash(root_pwhash):
            raise MinidevpiError("--root-passwd-hash is not a hash minidevpi can check "
                              "(scrypt$... or pbkdf2_sha256$..., as written by minidevpi)")
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
            sys.stderr.write("%s: %d of %d files, %.1f MB\n"
                             % (self.what, self.done, self.total, self.bytes / 1e6))
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


def export_server(serverdir, target, include_mirrored=False, hard_links=False, quiet=False):
    """Write a devpi-compatible dump of the server at ``serverdir`` into ``target`` (new or
    empty). Reads one consistent snapshot, so a running server may go on meanwhile.
    Returns a list of lines to tell the user."""
    store = Store(serverdir)
    if not store.is_initialised():
        raise MinidevpiError("%s contains no minidevpi server" % store.serverdir)
    if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)):
        raise MinidevpiError("export directory %s must not exist or be empty" % target)
    store.open(readonly=True)
    os.makedirs(target, exist_ok=True)
    root = os.path.realpath(target)
    notes = {}
    told = []
    # rows that no dump may carry (a name or version the API refuses, e.g. from a doctored
    # database): left out with a warning, so the dump imports again and nothing is ever
    # written outside the target
    skipped = []
    c = store._connect()
    try:
        c.execute("BEGIN")  # one snapshot for everything below (WAL)
        total = 0
        for ix_id, config in c.execute("SELECT id, config FROM indexes").fetchall():
            if include_mirrored or json.loads(config).get("type") != "mirror":
                total += c.execute("SELECT COUNT(*) FROM files WHERE index_id=?",
                                   (ix_id,)).fetchone()[0]
        progress = Progress("exported", total, quiet)
        users = {}
        devpi_cant_check = []
        for name, pwhash, config, created, modified in c.execute(
                "SELECT name, pwhash, config, created, modified FROM users ORDER BY name"):
            why = refusal(check_user_name, name)
            if why:
                skipped.append("user %r (%s)" % (name, why))
                continue
            u = {"username": name, "created": created}
            if modified:
                u["modified"] = modified
            u.update(json.loads(config))
            if pwhash.startswith("$argon2"):
                u["pwhash"] = pwhash  # devpi's own kind: it can check it
            else:
                u["pwhash"] = unusable_argon2()
                if is_known_hash(pwhash):
                    u["minidevpi_pwhash"] = pwhash
                    u["minidevpi_pwhash_for"] = pwhash_fingerprint(u["pwhash"])
                devpi_cant_check.append(name)
            users[name] = u
        indexes = {}
        rows = c.execute("SELECT id, user, name, config FROM indexes ORDER BY user, name")
        for ix_id, user, name, config in rows.fetchall():
            config = json.loads(config)
            path = "%s/%s" % (user, name)
            why = refusal(check_index_name, name) or (
                None if user in users else "its user is not exported")
            if why:
                skipped.append("index %r (%s)" % (path, why))
                continue
            entry = {"indexconfig": config}
            indexes[path] = entry
            if config.get("type") == "mirror" and not include_mirrored:
                continue
            projects = {}
            files = []
            versions = c.execute(
                "SELECT p.name, p.display, v.id, v.version, v.metadata, v.yanked FROM versions v "
                "JOIN projects p ON v.project_id=p.id WHERE p.index_id=? ORDER BY p.name, v.id",
                (ix_id,)).fetchall()
            is_mirror = config.get("type") == "mirror"
            for norm, display, vid, version, meta, yanked in versions:
                why = refusal(check_project_name, norm) or refusal(check_version, version) \
                    or (None if is_mirror else refusal(check_project_name, display))
                if why:
                    skipped.append("%s %s version %r (%s)" % (path, norm, version, why))
                    continue
                vfiles = c.execute(
                    "SELECT filename, rel, sha256, uploaded, for_filename, log FROM files "
                    "WHERE version_id=? ORDER BY id", (vid,)).fetchall()
                if is_mirror:
                    if not vfiles:
                        continue
                    data = {"name": norm, "version": version}
                    meta = json.loads(meta)
                    if meta.get("requires_python"):
                        data["requires_python"] = meta["requires_python"]
                else:
                    data = full_metadata(display, version, json.loads(meta))
                if yanked is not None:
                    data["yanked"] = yanked
                projects.setdefault(norm, {})[version] = data
                sha_of = {fn: sha for fn, rel, sha, _u, _f, _l in vfiles}
                for filename, rel, sha, uploaded, for_filename, log_json in vfiles:
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
                        skipped.append("%s file %r (%s)" % (path, filename, why))
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
                    files.append(f)
            entry["projects"] = projects
            entry["files"] = files
        c.execute("COMMIT")
    finally:
        c.close()
        store.close()
    data = {"dumpversion": DUMP_VERSION, "pythonversion": list(sys.version_info),
            "minidevpi": __version__, "users": users, "indexes": indexes}
    tmp = os.path.join(target, ".dataindex.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(target, "dataindex.json"))  # written last: complete dumps only
    nfiles = sum(len(i.get("files", [])) for i in indexes.values())
    told.append("exported %d users, %d indexes, %d files to %s"
                % (len(users), len(indexes), nfiles, target))
    if notes.get("no_links"):
        told.append(notes["no_links"])
    if skipped:
        told.append("WARNING: not exported, because the API does not accept their names or "
                    "versions (so an import would refuse them): %s%s. Remove or rename them "
                    "on the server and export again." % (
                        "; ".join(skipped[:20]),
                        " and %d more" % (len(skipped) - 20) if len(skipped) > 20 else ""))
    if devpi_cant_check:
        told.append("for devpi-server: the password hashes of %s are of a kind devpi can't "
                    "check; after devpi-import they match no password. Set them as root: "
                    "devpi user -m NAME password=... (minidevpi keeps them working)"
                    % ", ".join(devpi_cant_check))
    return told


def _read_dump(dump):
    """dataindex.json of a dump, checked for shape; raises with the list of problems."""
    path = os.path.join(dump, "dataindex.json")
    if not os.path.isfile(path):
        raise MinidevpiError("%s has no dataindex.json: not an export directory "
                             "(or an incomplete one)" % dump)
    try:
        with open_in_dump(os.path.realpath(dump), "dataindex.json") as f:
            data = json.load(io.TextIOWrapper(f, encoding="utf-8"))
    except DumpFileRefused as e:
        raise MinidevpiError("the export at %s can't be imported: %s" % (dump, e))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise MinidevpiError("dataindex.json is not readable JSON: %s" % e)
    if not isinstance(data, dict):
        raise MinidevpiError("dataindex.json is not a JSON object")
    if str(data.get("dumpversion")) not in ("1", "2"):
        raise MinidevpiError("incompatible dumpversion: %r (1 and 2 are understood)"
                        % (data.get("dumpversion"),))
    if not isinstance(data.get("users"), dict) or not isinstance(data.get("indexes"), dict):
        raise MinidevpiError("dataindex.json needs 'users' and 'indexes' objects")
    return data


def check_dump(dump, data, skip_types=(), progress=None, stage_dir=None, hard_links=False,
               notes=None):
    """Every problem of a dump, as a list of lines (empty: fine). Hashes every file.

    With ``stage_dir``, each file is also copied (or linked) there while it is read, so an
    import reads every file once; ``notes["staged"]`` maps relpath -> (sha256, staged path).
    """
    import concurrent.futures
    dump = os.path.realpath(dump)
    problems = []
    notes = notes if notes is not None else {}
    staged = notes.setdefault("staged", {})
    queued, jobs = {}, []
    pool = concurrent.futures.ThreadPoolExecutor(4)
    users = data["users"]
    for name, u in users.items():
        if not isinstance(u, dict):
            problems.append("user %r: not an object" % name)
        elif refusal(check_user_name, name):
            problems.append("user %r: %s" % (name, refusal(check_user_name, name)))
    for path, ix in data["indexes"].items():
        if not isinstance(ix, dict) or not isinstance(ix.get("indexconfig"), dict) \
                or "type" not in ix["indexconfig"]:
            problems.append("index %r: no indexconfig with a type" % path)
            continue
        user, sep, name = path.partition("/")
        why = refusal(check_user_name, user) or refusal(check_index_name, name)
        if why:
            problems.append("index %r: %s" % (path, why))
            continue
        if user not in users:
            problems.append("index %r: its user %r is not in the dump" % (path, user))
        ixtype = ix["indexconfig"]["type"]
        if ixtype not in ("stage", "mirror") and ixtype not in skip_types:
            problems.append("index %r: unknown index type %r (use --skip-import-type %s to "
                            "leave it out)" % (path, ixtype, ixtype))
        projects = ix.get("projects", {})
        if not isinstance(projects, dict):
            problems.append("index %r: 'projects' is not an object" % path)
            continue
        norm_projects = {}
        for pname, versions in projects.items():
            why = refusal(check_project_name, pname)
            if why:
                problems.append("%s: project %s" % (path, why))
                continue
            if not isinstance(versions, dict):
                problems.append("%s/%s: versions are not an object" % (path, pname))
                continue
            norm_projects.setdefault(normalize_name(pname), {}).update(versions)
            for ver, vdata in versions.items():
                if not isinstance(vdata, dict) or not vdata.get("name"):
                    problems.append('%s/%s %s: missing required field "name"' % (path, pname, ver))
                elif any(k.startswith("+") for k in vdata):
                    problems.append("%s/%s %s: unexpected '+' keys" % (path, pname, ver))
                else:
                    why = refusal(check_version, ver) or refusal(
                        check_version, str(vdata.get("version") or ver)) or refusal(
                        check_project_name, vdata["name"])
                    if why:
                        problems.append("%s/%s %r: %s" % (path, pname, ver, why))
        files = ix.get("files", [])
        if not isinstance(files, list):
            problems.append("index %r: 'files' is not a list" % path)
            continue
        for f in files:
            if not isinstance(f, dict) or not all(isinstance(f.get(k), str) for k in (
                    "type", "projectname", "relpath")):
                problems.append("%s: a file entry without type/projectname/relpath" % path)
                continue
            rel = f["relpath"]
            parts = rel.split("/")
            why = dump_path_refusal(rel) or refusal(check_filename, parts[-1]) or refusal(
                check_project_name, f["projectname"]) or refusal(check_version, _version_of(f))
            if not why and f["type"] == "toxresult" and f.get("for_entrypath"):
                why = refusal(check_filename, str(f["for_entrypath"]).rsplit("/", 1)[-1])
            if why:
                problems.append("%s: file %r: %s" % (path, rel, why))
                continue
            if f["type"] not in ("releasefile", "doczip", "toxresult"):
                problems.append("%s: file %s has unknown type %r" % (path, rel, f["type"]))
            norm = normalize_name(f["projectname"])
            if norm not in norm_projects:
                problems.append("%s: file %s belongs to project %r, which is not in the dump"
                                % (path, rel, f["projectname"]))
            elif f["type"] == "releasefile" and _version_of(f) not in norm_projects[norm]:
                problems.append("%s: file %s belongs to version %r, not registered"
                                % (path, rel, f.get("version")))
            if ix["indexconfig"]["type"] == "mirror" and f["type"] == "releasefile" and not (
                    isinstance(f.get("entrymapping"), dict) and f["entrymapping"].get("url")):
                problems.append("%s: mirrored file %s has no entrymapping.url" % (path, rel))
            job = queued.get(rel)
            if job is None:  # (the same file in two indexes is read once)
                dest = None
                if stage_dir is not None:
                    dest = os.path.join(stage_dir, "%d" % len(queued))
                wheel = f["type"] == "releasefile" and rel.endswith(".whl")
                job = queued[rel] = pool.submit(_stage_file, dump, rel, dest, hard_links, notes,
                                                wheel)
            jobs.append((path, rel, _want_sha256(f), job))
    # the files are read (hashed, copied, a wheel's metadata taken) by a few threads: the
    # reading waits on the disk, the hashing and copying let go of the GIL
    for path, rel, want, job in jobs:
        try:
            got, size, dest, core = job.result()
        except FileNotFoundError:
            problems.append("%s: the file at %s is missing" % (path, rel))
            continue
        except IsADirectoryError:
            problems.append("%s: the file at %s is not a file" % (path, rel))
            continue
        except DumpFileRefused as e:
            problems.append("%s: %s" % (path, e))
            continue
        if dest is not None:
            staged[rel] = (got, dest)
            if core is not None:
                notes.setdefault("core", {})[rel] = core  # (sha256, staged path) or None
        if want is not None and got != want:
            problems.append("%s: %s: sha256 mismatch" % (path, rel))
        if progress is not None:
            progress.add(size)
    pool.shutdown()
    cyc = _base_cycle(data["indexes"])
    if cyc:
        problems.append("the bases of these indexes form a cycle: %s" % ", ".join(cyc))
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
                  skip_types=(), hard_links=False, quiet=False):
    """Create a server at ``serverdir`` (new or empty) from a devpi or minidevpi dump.

    Everything is checked first (every file's sha256 included); a damaged dump is refused
    with the list of problems and nothing is written. The server is built beside the
    target and moved into place only when complete. Returns lines to tell the user.
    """
    dump = os.path.abspath(dump)
    serverdir = os.path.abspath(serverdir)
    if os.path.exists(serverdir) and (not os.path.isdir(serverdir) or os.listdir(serverdir)):
        raise MinidevpiError("%s must be new or empty to import into" % serverdir)
    data = _read_dump(dump)
    dump_types = {ix["indexconfig"].get("type") for ix in data["indexes"].values()
                  if isinstance(ix, dict) and isinstance(ix.get("indexconfig"), dict)}
    unknown = sorted(set(skip_types) - {"stage", "mirror"} - dump_types)
    if unknown:
        raise MinidevpiError("--skip-import-type %s: no index of that type in the export (its "
                          "types: %s)" % (", ".join(unknown), ", ".join(sorted(
                              t for t in dump_types if isinstance(t, str))) or "none"))
    nfiles = sum(len(ix.get("files") or []) for ix in data["indexes"].values()
                 if isinstance(ix, dict) and isinstance(ix.get("files"), list))
    parent = os.path.dirname(serverdir)
    os.makedirs(parent, exist_ok=True)
    notes = {}
    # files are checked and copied in one read, beside the target (same file system)
    staging = tempfile.mkdtemp(prefix=".import-files-", dir=parent)
    try:
        problems = check_dump(dump, data, skip_types, Progress("checked", nfiles, quiet),
                              stage_dir=staging, hard_links=hard_links, notes=notes)
        if problems:
            raise MinidevpiError("the export at %s can't be imported:\n  %s"
                            % (dump, "\n  ".join(problems)))
        return _import_checked(dump, data, serverdir, parent, notes, nfiles, root_password,
                               root_pwhash, root_pypi, skip_types, hard_links, quiet)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _import_checked(dump, data, serverdir, parent, notes, nfiles, root_password, root_pwhash,
                    root_pypi, skip_types, hard_links, quiet):
    building = tempfile.mkdtemp(prefix=".import-", dir=parent)
    told = []
    try:
        os.rmdir(building)
        has_pypi = "root/pypi" in data["indexes"]
        store, model = init_serverdir(
            building, root_password=root_password if root_pwhash is None else None,
            root_pwhash=root_pwhash, root_pypi=root_pypi and not has_pypi,
            root_unusable=root_password is None and root_pwhash is None)
        store.sync_each_blob = False  # 10,000 fsyncs cost more than the copying
        needs_password, stale = _import_users(store, data["users"], root_password, root_pwhash,
                                              own_export="minidevpi" in data)
        if "root" in needs_password or ("root" not in data["users"] and root_password is None
                                        and root_pwhash is None):
            # nobody could set passwords: give root a working one and say it once
            generated = secrets.token_urlsafe(12)
            model.accounts.set_password_hash("root", hash_password(generated))
            if "root" in needs_password:
                needs_password.remove("root")
            told.append("root's password in the dump can't be checked here (or there was "
                        "none); root's new password (shown only now): %s" % generated)
        nindexes = _import_indexes(store, model, dump, data["indexes"], root_pypi,
                                   skip_types, hard_links, notes, told,
                                   Progress("imported", nfiles, quiet))
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
        raise
    told.insert(0, "imported %d users and %d indexes from %s into %s" % (
        len(data["users"]), nindexes, dump, serverdir))
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


def _import_users(store, users, root_password, root_pwhash, own_export=False):
    """Returns (users who need a new password, users whose minidevpi hash was stale).

    ``minidevpi_pwhash`` is used only while the devpi-side ``pwhash`` is still the one the
    export wrote beside it (``minidevpi_pwhash_for``): a password changed on the devpi side
    since then wins. Exports from before that fingerprint are trusted only as minidevpi
    wrote them (``own_export``), never after a trip through devpi."""
    needs, stale = [], []
    with store.write() as c:
        for name, u in sorted(users.items()):
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
                pwhash = c.execute("SELECT pwhash FROM users WHERE name='root'").fetchone()[0]
            elif not is_known_hash(pwhash):
                needs.append(name)
            # profile fields, and any other key devpi kept (plugins'): they survive
            config = {k: v for k, v in u.items() if k not in (
                "pwhash", "pwsalt", "username", "created", "modified", "minidevpi_pwhash",
                "minidevpi_pwhash_for", "password", "indexes")}
            created = u.get("created") if isinstance(u.get("created"), str) \
                else "1970-01-01T00:00:00Z"
            modified = u.get("modified") if isinstance(u.get("modified"), str) else None
            c.execute("INSERT OR REPLACE INTO users (name, pwhash, config, created, modified) "
                      "VALUES (?,?,?,?,?)", (name, pwhash, json.dumps(config), created, modified))
    return needs, stale


def _import_indexes(store, model, dump, indexes, root_pypi, skip_types, hard_links, notes,
                    told, progress):
    """Returns how many indexes were imported (the skipped ones are said in ``told``)."""
    imported = 0
    for path, ix in sorted(indexes.items()):
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
        for k, v in index_defaults(config["type"], user).items():
            config.setdefault(k, v)
        with store.write() as c:
            ix_id = store.insert_index(c, user, path.split("/", 1)[1], config)
            _import_releases(store, c, ix_id, path, dump, ix, hard_links, notes, progress)
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


def _import_releases(store, c, ix_id, path, dump, ix, hard_links, notes, progress):
    is_mirror = ix["indexconfig"]["type"] == "mirror"
    version_ids = {}
    for pname, versions in (ix.get("projects") or {}).items():
        norm = normalize_name(pname)
        for ver, vdata in versions.items():
            display = vdata.get("name") or pname
            row = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                            (ix_id, norm)).fetchone()
            pid = row["id"] if row else c.execute(
                "INSERT INTO projects (index_id, name, display) VALUES (?,?,?)",
                (ix_id, norm, norm if is_mirror else display)).lastrowid
            meta = {k: v for k, v in vdata.items() if k not in ("name", "version", "yanked")
                    and not k.startswith("+") and k != ":action"}
            yanked = vdata.get("yanked")
            if yanked is True:
                yanked = ""
            elif yanked is False:
                yanked = None
            version = str(vdata.get("version") or ver)
            vid = c.execute("INSERT OR IGNORE INTO versions (project_id, version, metadata, "
                            "yanked, created) VALUES (?,?,?,?,?)",
                            (pid, version, json.dumps(meta), yanked, time.time())).lastrowid
            version_ids[(norm, str(ver))] = (vid, meta.get("requires_python", "") or "")
    for f in ix.get("files") or []:
        norm = normalize_name(f["projectname"])
        version = _version_of(f)
        if (norm, version) not in version_ids:
            # a doc zip or tox result of an unregistered version: register it bare
            pid = c.execute("SELECT id FROM projects WHERE index_id=? AND name=?",
                            (ix_id, norm)).fetchone()[0]
            vid = c.execute("INSERT INTO versions (project_id, version, metadata, created) "
                            "VALUES (?,?,?,?)", (pid, version, "{}", time.time())).lastrowid
            version_ids[(norm, version)] = (vid, "")
        vid, requires_python = version_ids[(norm, version)]
        # read, hashed and copied once by check_dump (never through a link): the dump itself
        # is not read again
        sha, tmp = notes["staged"][f["relpath"]]
        dest = store.blob_path(sha)
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
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
        core = None
        if filename.endswith(".whl") and f["type"] == "releasefile":
            staged_core = notes.get("core", {}).get(f["relpath"])
            if staged_core:
                core, core_tmp = staged_core
                core_dest = store.blob_path(core)
                if not os.path.exists(core_dest):
                    os.makedirs(os.path.dirname(core_dest), exist_ok=True)
                    os.replace(core_tmp, core_dest)
            elif staged_core is None:
                try:
                    meta_bytes = read_core_metadata(dest, filename)
                except HTTPError:
                    meta_bytes = None
                core = store.put_bytes(meta_bytes) if meta_bytes else None
        for_filename = None
        if f["type"] == "toxresult":
            for_filename = os.path.basename(f.get("for_entrypath") or "") or None
        size = os.path.getsize(dest)
        store.insert_file(c, ix_id, vid, filename, f["type"], sha, size, uploaded,
                          requires_python if f["type"] == "releasefile" else "", core,
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
                 mirror_allow_hosts=()):
        self._serverdir_arg = serverdir
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
            store = Store(self.serverdir)
            if store.is_initialised():
                store.open()
                self.model = Model(store)
            else:
                if self.root_password is None:
                    self.root_password = secrets.token_urlsafe(16)
                store, self.model = init_serverdir(
                    self.serverdir, root_password=self.root_password,
                    mirror_url=self.mirror_url, hash_soon=True)
            self._httpd.app = App(self.model, outside_url=self.outside_url,
                                  max_body=self.max_request_body_size, offline=self.offline,
                                  mirror_timeouts=self.mirror_timeouts,
                                  mirror_allow_hosts=self.mirror_allow_hosts)
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

# devpi-server options that a --configfile may set, and what they mean here
CONFIG_OPTIONS = {
    "serverdir": str, "host": str, "port": int, "outside-url": str,
    "max-request-body-size": int, "root-passwd": str, "root-passwd-hash": str,
    "no-root-pypi": bool, "mirror-url": str, "access-log": bool, "offline-mode": bool,
    "mirror-connect-timeout": int, "mirror-read-timeout": int, "storage": str,
    "hard-links": bool, "include-mirrored-files": bool, "no-events": bool, "threads": int,
    "connection-timeout": int, "mirror-allow-host": str,
}


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
        if kind is int and not isinstance(value, int) or kind is bool and not isinstance(
                value, bool) or kind is str and not isinstance(value, (str, int)):
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
    p.add_argument("--port", type=int, help="port (default: %d; 0 picks a free one)"
                                            % DEFAULT_PORT)
    p.add_argument("--outside-url", metavar="URL",
                   help="URL the server is reached at through a proxy, for the absolute URLs "
                        "it writes (default: from the request's Host or X-Outside-Url)")
    p.add_argument("--max-request-body-size", type=int, metavar="BYTES",
                   help="largest request body (upload) accepted, enforced while it streams "
                        "(default: %d, 2 GiB)" % DEFAULT_MAX_BODY)
    p.add_argument("--threads", type=int, metavar="N",
                   help="most connections served at once, a thread each; more are answered "
                        "503 (default: %d)" % DEFAULT_THREADS)
    p.add_argument("--connection-timeout", type=float, metavar="SECONDS",
                   help="close a connection idle or stalled this long (default: %d)"
                        % DEFAULT_CONNECTION_TIMEOUT)
    p.add_argument("--offline-mode", action="store_true", default=None,
                   help="no upstream traffic: mirrors serve only what they kept")
    p.add_argument("--mirror-connect-timeout", type=float, metavar="SECONDS",
                   help="seconds to wait for a mirror's upstream to accept a connection "
                        "(default: %g)" % MIRROR_CONNECT_TIMEOUT)
    p.add_argument("--mirror-read-timeout", type=float, metavar="SECONDS",
                   help="seconds to wait for each read from a mirror's upstream "
                        "(default: %g)" % MIRROR_READ_TIMEOUT)
    p.add_argument("--mirror-allow-host", action="append", metavar="HOST[:PORT]",
                   help="a host (any port, or only PORT) a mirror may fetch files from even "
                        "though it is not the mirror_url's own host and has non-public "
                        "addresses, e.g. an internal upstream's file server (repeatable, "
                        "or comma-separated)")
    p.add_argument("--access-log", dest="access_log", action="store_true", default=None,
                   help="(default) one line per request on stderr")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="no access log")

    def devpi_compat(p):
        p.add_argument("--storage", metavar="NAME",
                       help="accepted for devpi's scripts; only 'sqlite' (changes nothing)")
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
    return parser


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
                                  mirror_url=args.mirror_url, hash_soon=hash_soon)
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
    store = Store(args.serverdir)
    fresh = not store.is_initialised()
    try:
        if fresh:
            print("server directory %s is not initialised: initialising it"
                  % os.path.abspath(args.serverdir), flush=True)
            store, model = cmd_init(args, hash_soon=True)
        else:
            store.open()
            model = Model(store)
    except BaseException:
        httpd.server_close()
        raise
    httpd.app = App(model, outside_url=args.outside_url, max_body=args.max_request_body_size,
                    offline=args.offline_mode,
                    mirror_timeouts=(args.mirror_connect_timeout, args.mirror_read_timeout),
                    mirror_allow_hosts=args.mirror_allow_host)
    if not is_loopback(args.host):
        empty = [name for name, pwhash in store.conn().execute(
            "SELECT name, pwhash FROM users") if verify_password("", pwhash)]
        if empty:
            log("WARNING: account(s) with an empty password, reachable from other hosts "
                "on %s: %s. Set passwords with 'devpi user -m NAME password=...'."
                % (args.host, ", ".join(empty)))

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("minidevpi %s serving %s at %s%s" % (
        __version__, store.serverdir, url,
        " in offline mode (no upstream traffic: mirrors serve what they kept)"
        if args.offline_mode else ""), flush=True)
    if fresh:
        print("next: devpi use %s && devpi login root --password=...   "
              "(or pip install --index-url %sroot/pypi/+simple/ ...)" % (url, url), flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
        if httpd.close_connections():
            store.close()
    log("minidevpi stopped")
    return 0


SERVE_DEFAULTS = {"host": DEFAULT_HOST, "port": DEFAULT_PORT, "outside_url": None,
                  "max_request_body_size": DEFAULT_MAX_BODY, "access_log": True,
                  "no_root_pypi": False, "offline_mode": False,
                  "mirror_connect_timeout": MIRROR_CONNECT_TIMEOUT,
                  "mirror_read_timeout": MIRROR_READ_TIMEOUT, "threads": DEFAULT_THREADS,
                  "connection_timeout": DEFAULT_CONNECTION_TIMEOUT, "mirror_allow_host": []}


def _check_storage(args):
    if getattr(args, "storage", None) not in (None, "sqlite"):
        raise SystemExit("error: --storage %s: minidevpi stores in sqlite only"
                         % args.storage)


def cmd_export(args):
    _check_storage(args)
    lines = export_server(args.serverdir, args.directory,
                          include_mirrored=bool(args.include_mirrored_files),
                          hard_links=bool(args.hard_links), quiet=bool(args.quiet))
    for line in lines:
        print(line, flush=True)
    return 0


def cmd_import(args):
    _check_storage(args)
    lines = import_server(args.directory, args.serverdir, root_password=args.root_passwd,
                          root_pwhash=args.root_passwd_hash,
                          root_pypi=not args.no_root_pypi,
                          skip_types=tuple(args.skip_import_type or ()),
                          hard_links=bool(args.hard_links), quiet=bool(args.quiet))
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
    return cmd_serve(args)


if __name__ == "__main__":
    sys.exit(main())
