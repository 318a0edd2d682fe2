"""The built-in text corpus: docstrings of Python's standard library, by module and family.

Every machine with Python has this corpus: real English technical prose, with
a natural writer per text (the top-level module it documents). Modules fall
into :data:`FAMILIES` (text processing, networking, concurrency, ...), the
labels of the classification task and the groups of Dirichlet partitions.
The corpus is read with :mod:`ast` (nothing is imported) in sorted file
order, so it is the same on every run of the same Python; the parsed result
is cached (``fedopt.cache``) because parsing the library takes seconds.
"""

from __future__ import annotations

import ast
import functools
import json
import sys
import sysconfig
import types
from collections.abc import Mapping
from pathlib import Path

from fedopt.cache import atomic_write, cache_dir, config_key

__all__ = ["FAMILIES", "family_of", "stdlib_docstrings"]

#: Module families: the classes of the ``classify`` task (modules in none are "other").
FAMILIES: Mapping[str, tuple[str, ...]] = types.MappingProxyType(
    {
        "text": (
            "codecs difflib encodings gettext locale pprint re reprlib shlex string "
            "stringprep textwrap unicodedata"
        ).split(),
        "formats": (
            "aifc base64 binascii chunk configparser copyreg csv dbm email html imghdr json "
            "mailbox mailcap marshal mimetypes netrc pickle pickletools plistlib quopri shelve "
            "sndhdr sqlite3 sunau tomllib uu wave xdrlib xml"
        ).split(),
        "numbers": (
            "_pydecimal _strptime calendar cmath colorsys datetime decimal fractions hashlib "
            "hmac math numbers random secrets statistics time uuid zoneinfo"
        ).split(),
        "files": (
            "_compression _pyio bz2 filecmp fileinput fnmatch genericpath getpass glob gzip io "
            "linecache lzma ntpath os pathlib platform posixpath pty shutil stat tarfile "
            "tempfile zipfile"
        ).split(),
        "concurrency": (
            "_bootsubprocess _threading_local asynchat asyncio asyncore concurrent "
            "multiprocessing queue sched selectors signal subprocess threading"
        ).split(),
        "network": (
            "cgi cgitb ftplib http imaplib ipaddress nntplib nturl2path poplib smtpd smtplib "
            "socket socketserver ssl telnetlib urllib webbrowser wsgiref xmlrpc"
        ).split(),
        "devtools": (
            "argparse ast bdb cmd code codeop cProfile dis doctest getopt inspect keyword "
            "logging opcode optparse pdb profile pstats pyclbr pydoc rlcompleter symtable "
            "tabnanny timeit token tokenize trace traceback tracemalloc unittest warnings"
        ).split(),
        "packaging": (
            "_aix_support _osx_support compileall distutils imp importlib modulefinder pkgutil "
            "py_compile runpy site sysconfig zipapp zipimport"
        ).split(),
        "language": (
            "__future__ _collections_abc _py_abc _sitebuiltins abc bisect collections "
            "contextlib copy dataclasses enum functools graphlib heapq itertools operator "
            "types typing weakref"
        ).split(),
    }
)

_FAMILY_OF = {module: i for i, mods in enumerate(FAMILIES.values()) for module in mods}

#: Directories that hold tests, demos, GUIs or vendored code rather than the library.
_SKIP = frozenset(
    "test tests idle_test idlelib lib2to3 site-packages dist-packages __pycache__ tkinter "
    "turtledemo ensurepip venv pydoc_data".split()
)

#: Bumped whenever extraction changes, so stale cache entries are not read.
_FORMAT = 1


def family_of(module: str) -> int:
    """Index of ``module``'s family in :data:`FAMILIES`, or ``len(FAMILIES)`` ("other")."""
    return _FAMILY_OF.get(module, len(FAMILIES))


def _extract(root: Path) -> list[tuple[str, str]]:
    """(top-level module, docstring) of every module, class and function under ``root``."""
    out: list[tuple[str, str]] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a file this Python cannot parse documents nothing we can read
        module = rel.parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    out.append((module, doc))
    return out


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[tuple[str, str], ...]:
    """Every docstring of this Python's standard library, as (top-level module, text).

    Deterministic for a given Python installation; duplicates (the same text
    in the same module) are kept once, in first-seen order.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    key = config_key({"format": _FORMAT, "python": sys.version, "root": str(root)})
    path = cache_dir("corpus") / f"stdlib-{key}.json"
    if path.is_file():
        try:
            return tuple((m, t) for m, t in json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, TypeError):
            path.unlink(missing_ok=True)  # an unreadable entry is rebuilt below
    seen: set[tuple[str, str]] = set()
    docs = [d for d in _extract(root) if not (d in seen or seen.add(d))]
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(docs), encoding="utf-8"))
    return tuple(docs)
