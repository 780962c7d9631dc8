#!/usr/bin/env bash
# Run iampg's tests on a free-threaded (no-GIL) CPython 3.13t, using only PyPI and Debian's archive.
# Needs root (debootstrap, chroot, mounts), about 4.2 GB of disk and, the first time, about 7 min.
#
#   nox -s freethreaded                                   # the same as the next line
#   bash tools/free_threaded.sh                           # tests/test_concurrency.py tests/test_tokens.py
#   bash tools/free_threaded.sh tests -x                  # any pytest arguments
#   FT_GIL_MODES="0" bash tools/free_threaded.sh ...      # only PYTHON_GIL=0 (default: "0 default")
#   IAMPG_FT_DIR=/some/dir bash tools/free_threaded.sh    # where it builds (default: /tmp/iampg-ft)
#
# Why it is built this way (every route checked on 2026-11-29):
# * Debian has no free-threaded interpreter: no python3.13-nogil / python3.1xt binary package in
#   trixie, sid or experimental. So CPython is built here with --disable-gil from Debian's own
#   python3.13 source package (upstream tarball, Debian patches not applied). The python3.14 and
#   python3.15 source packages were listed in sid but their files could not be downloaded.
# * cryptography (needed by the emulator, which tests/conftest.py imports) has no cp313t wheel,
#   cffi>=2 refuses to build for 3.13t, and crates.io is unreachable. So cryptography 47.0.0 (the
#   sdist whose Rust pins match Debian sid's librust-*-dev crates: pyo3 0.28, cc 1.2.60, asn1 0.24)
#   is built offline against those Debian crates, without abi3, with cffi 1.17.1.
#   cffi 1.17.1's _cffi_backend does not declare free-threading support: importing cryptography's
#   Rust bindings RE-ENABLES THE GIL unless PYTHON_GIL=0 is set.
# * psycopg-binary has no cp313t wheel: psycopg runs its pure-Python (ctypes) libpq binding on
#   Debian trixie's libpq5 17 (so libpq-18-only options such as max_protocol_version are missing).
# Idempotent: each stage is skipped when its result is already there. Reads this repository
# (git clone / fetch of its HEAD) and writes nothing to it. Mounts are undone on exit.
set -euo pipefail

FT=${IAMPG_FT_DIR:-/tmp/iampg-ft}
R=$FT/trixie                      # the Debian 13 root
SRC=$FT/src                       # bind-mounted at the same path inside the root
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYVERS_TRY="3.13.15-1 3.13.5-2+deb13u5"   # Debian python3.13 source versions to try, in order
CRYPTO_VERSION=47.0.0
GIL_MODES=${FT_GIL_MODES:-"0 default"}
if [ $# -eq 0 ]; then set -- tests/test_concurrency.py tests/test_tokens.py; fi

T0=$(date +%s)
stamp() { echo "[ft +$(( $(date +%s) - T0 ))s] $*"; }
in_root() {  # run a command in the root with a clean environment
  timeout "${TMO:-1200}" chroot "$R" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"
}

MOUNTED=()
cleanup() {
  local i
  for (( i=${#MOUNTED[@]}-1; i>=0; i-- )); do umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" || true; done
}
trap cleanup EXIT
mnt() {  # mnt TARGET mount-args...
  local target=$1; shift
  mkdir -p "$target"
  if ! mountpoint -q "$target"; then mount "$@" "$target"; MOUNTED+=("$target"); fi
}

# --- 1. A minimal Debian 13 root --------------------------------------------------------------
mkdir -p "$FT" "$SRC"
if [ ! -e "$R/.ft-debootstrap-done" ]; then
  command -v debootstrap >/dev/null || { timeout 300 apt-get update -q; timeout 300 apt-get install -y -q debootstrap; }
  stamp "debootstrap trixie -> $R"
  if grep -q " $R/" /proc/mounts; then echo "something is still mounted under $R; not deleting it" >&2; exit 1; fi
  rm -rf --one-file-system "$R"
  timeout 900 debootstrap --variant=minbase trixie "$R" > "$FT/debootstrap.log" 2>&1
  touch "$R/.ft-debootstrap-done"
fi

mnt "$R/proc" -t proc proc
mnt "$R/dev" --bind /dev
mnt "$R/dev/pts" --bind /dev/pts
mnt "$R$SRC" --bind "$SRC"

cp /etc/resolv.conf "$R/etc/resolv.conf"
# The archive debootstrap used (its default unless DEBOOTSTRAP_MIRROR says otherwise).
MIRROR=$(awk '$1 == "deb" {print $2; exit}' "$R/etc/apt/sources.list" 2>/dev/null || true)
[ -n "$MIRROR" ] || { echo "cannot tell which Debian archive debootstrap used" >&2; exit 1; }
# The host's own apt settings (e.g. tolerances for a dated snapshot).
for f in /etc/apt/apt.conf.d/99*; do
  [ -e "$f" ] && cp "$f" "$R/etc/apt/apt.conf.d/"
done
# The host's extra CA certificates (TLS to PyPI goes through them here).
mkdir -p "$R/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$R/usr/local/share/ca-certificates/" 2>/dev/null || true
cat > "$R/etc/apt/sources.list" <<EOF
deb $MIRROR trixie main
deb-src $MIRROR trixie main
deb $MIRROR sid main
deb-src $MIRROR sid main
EOF
rm -f "$R/etc/apt/sources.list.d/"*.list
cat > "$R/etc/apt/preferences.d/sid" <<'EOF'
Package: *
Pin: release n=sid
Pin-Priority: 100
EOF
# No service starts inside the root, and PostgreSQL makes no cluster there (the host's server on
# 127.0.0.1:5432 is used; initdb/postgres binaries are only for tests' throwaway clusters).
printf '#!/bin/sh\nexit 101\n' > "$R/usr/sbin/policy-rc.d"; chmod +x "$R/usr/sbin/policy-rc.d"
mkdir -p "$R/etc/postgresql-common/createcluster.d"
echo 'create_main_cluster = false' > "$R/etc/postgresql-common/createcluster.d/00-no-main.conf"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\ndefault-timeout = 180\ndisable-pip-version-check = true\n' > "$R/etc/pip.conf"

# --- 2. Debian packages ---------------------------------------------------------------------------
if [ ! -e "$R/.ft-apt-done" ]; then
  stamp "apt-get install (trixie: toolchain, libpq5, PostgreSQL 17; sid: Rust crates)"
  in_root apt-get update -q > "$FT/apt.log" 2>&1
  in_root apt-get install -y -q --no-install-recommends \
    build-essential pkg-config libssl-dev zlib1g-dev libffi-dev libbz2-dev liblzma-dev \
    libsqlite3-dev libreadline-dev uuid-dev libgdbm-dev libzstd-dev xz-utils ca-certificates \
    libpq5 postgresql-17 postgresql-client-17 >> "$FT/apt.log" 2>&1
  in_root update-ca-certificates >> "$FT/apt.log" 2>&1
  # cryptography's Rust dependencies, as Debian packages them. Trixie's versions first: sid alone
  # cannot resolve them in a fresh root (librust-pyo3-dev's optional-feature closure runs into
  # uninstallable sid packages); with trixie's closure in place, -t sid upgrades only what it must.
  in_root apt-get install -y -q --no-install-recommends \
    librust-pyo3-dev librust-pyo3-build-config-dev librust-asn1-dev librust-base64-dev \
    librust-cc-dev librust-cfg-if-dev librust-foreign-types-dev librust-foreign-types-shared-dev \
    librust-once-cell-dev librust-openssl-dev librust-openssl-sys-dev librust-pem-dev \
    librust-self-cell-dev >> "$FT/apt.log" 2>&1
  # Then sid's: pyo3 0.28 (free-threading support), asn1 0.24, cc 1.2.60, rustc/cargo 1.97.
  in_root apt-get install -y -q --no-install-recommends -t sid cargo rustc \
    librust-pyo3-dev librust-pyo3-build-config-dev librust-asn1-dev librust-base64-dev \
    librust-cc-dev librust-cfg-if-dev librust-foreign-types-0.3-dev \
    librust-foreign-types-shared-0.1-dev librust-once-cell-dev librust-openssl-dev \
    librust-openssl-sys-dev librust-pem-dev librust-self-cell-dev >> "$FT/apt.log" 2>&1
  touch "$R/.ft-apt-done"
fi

# --- 3. CPython 3.13 built with --disable-gil from Debian's source package ------------------
PY=/opt/python3.13t/bin/python3.13t
if ! in_root "$PY" -c 'import sysconfig,sys; sys.exit(0 if sysconfig.get_config_var("Py_GIL_DISABLED") else 1)' 2>/dev/null; then
  mkdir -p "$R/build"
  got=""
  for v in $PYVERS_TRY; do
    if in_root bash -c "cd /build && apt-get source --download-only python3.13=$v" >> "$FT/pybuild.log" 2>&1; then got=${v%%-*}; break; fi
  done
  [ -n "$got" ] || { echo "no python3.13 source package could be downloaded" >&2; exit 1; }
  stamp "building CPython $got --disable-gil"
  TMO=3000 in_root bash -c "set -e; cd /build && rm -rf Python-$got && tar xJf python3.13_$got.orig.tar.xz \
    && cd Python-$got && ./configure --disable-gil --prefix=/opt/python3.13t --with-ensurepip=install \
    && make -j\$(nproc) && make altinstall" >> "$FT/pybuild.log" 2>&1
fi

# --- 4. The project and a venv ------------------------------------------------------------------
if [ ! -d "$SRC/iampg/.git" ]; then
  timeout 300 git clone -q "$REPO" "$SRC/iampg"
else
  timeout 300 git -C "$SRC/iampg" fetch -q origin HEAD && git -C "$SRC/iampg" checkout -q --detach FETCH_HEAD
fi
stamp "iampg at $(git -C "$SRC/iampg" log --oneline -1)"

VPY=$SRC/venv/bin/python
if [ ! -x "$VPY" ]; then
  in_root "$PY" -m venv "$SRC/venv"
fi

if ! in_root "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('cryptography') != '$CRYPTO_VERSION')" 2>/dev/null; then
  stamp "building cryptography $CRYPTO_VERSION for cp313t (offline, Debian crates)"
  in_root "$VPY" -m pip install -q "cffi==1.17.1" setuptools "maturin>=1.9.4,<2,!=1.12.0" > "$FT/crypto-build.log" 2>&1
  mkdir -p "$R/build"
  # The sdist from the index pip uses, checked against its sha256. Not `pip download`: that
  # would prepare the sdist's metadata, which needs crates the offline build cannot fetch.
  in_root "$VPY" - "$CRYPTO_VERSION" >> "$FT/crypto-build.log" 2>&1 <<'EOF'
import hashlib, re, subprocess, sys, urllib.parse, urllib.request
version = sys.argv[1]
name = f"cryptography-{version}.tar.gz"
index = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                       capture_output=True, text=True).stdout.strip()
if not index:
    from pip._internal.models.index import PyPI
    index = PyPI.simple_url
page = urllib.parse.urljoin(index.rstrip("/") + "/", "cryptography/")
html = urllib.request.urlopen(page, timeout=60).read().decode()
links = dict((n, u) for u, n in re.findall(r'href="([^"]+)"[^>]*>([^<]+)<', html))
url = urllib.parse.urljoin(page, links[name])
data = urllib.request.urlopen(url.split("#")[0], timeout=120).read()
assert hashlib.sha256(data).hexdigest() == url.split("sha256=")[1], "sha256 mismatch"
open(f"/build/{name}", "wb").write(data)
print("downloaded", name)
EOF
  TMO=2400 in_root bash -s "$CRYPTO_VERSION" "$VPY" >> "$FT/crypto-build.log" 2>&1 <<'EOF'
set -euo pipefail
version=$1 vpy=$2
cd /build && rm -rf crypt-ft && mkdir crypt-ft
tar xzf "cryptography-$version.tar.gz" -C crypt-ft --strip-components=1 && cd crypt-ft
export CARGO_HOME=$PWD/.cargo_home
mkdir -p "$CARGO_HOME"
cat > "$CARGO_HOME/config.toml" <<'CFG'
[source.crates-io]
replace-with = "debian"
[source.debian]
directory = "/usr/share/cargo/registry"
[net]
offline = true
CFG
# Free-threaded CPython has no limited API: no abi3, and cffi's generated C must not ask for it.
sed -i 's/, features = \["abi3"\]//' Cargo.toml
sed -i 's/^\( *\)if !(python_impl == "PyPy" || is_free_threaded) {/\1build.define("_CFFI_NO_LIMITED_API", None);\n&/' src/rust/cryptography-cffi/build.rs
grep -q _CFFI_NO_LIMITED_API src/rust/cryptography-cffi/build.rs
# cffi>=2 refuses 3.13t; 1.17.1 is what can be had.
sed -i "s/\"cffi>=2.0.0; platform_python_implementation/\"cffi>=1.17; platform_python_implementation/" pyproject.toml
rm -f Cargo.lock
cargo generate-lockfile --offline
export CARGO_NET_OFFLINE=true CARGO_BUILD_JOBS=$(nproc) PYO3_BUILD_EXTENSION_MODULE=1
export PATH="$(dirname "$vpy"):$PATH"   # maturin's binary lives in the venv
"$vpy" -m pip install --no-build-isolation --no-deps .
EOF
fi

if ! in_root "$VPY" -c "import iampg, pytest, hypothesis, sqlalchemy, asyncpg, django, boto3" 2>/dev/null; then
  stamp "pip install -e iampg[emulator] + test dependencies"
  printf 'cffi==1.17.1\ncryptography==%s\n' "$CRYPTO_VERSION" > "$SRC/constraints-313t.txt"
  # --prefer-binary: the newest hypothesis and greenlet are sdists that cannot build here
  # (hypothesis needs crates.io; greenlet would be compiled) while older wheels fit cp313t.
  in_root env PIP_CONSTRAINT="$SRC/constraints-313t.txt" "$VPY" -m pip install --prefer-binary \
    -e "$SRC/iampg[emulator]" pytest hypothesis "boto3>=1.35" "sqlalchemy[asyncio]>=2.0" \
    "asyncpg>=0.30" "django>=5.1" > "$FT/pip.log" 2>&1
fi

# --- 5. Report the interpreter and which imports turn the GIL on ----------------------------------
mkdir -p "$SRC/ftcheck"
cat > "$SRC/ftcheck/gilcheck.py" <<'EOF'
"""Import each module in a fresh interpreter; say whether the GIL is on afterwards."""
import subprocess, sys
print(sys.version, "| gil enabled at start:", sys._is_gil_enabled())
for name in sys.argv[1:]:
    out = subprocess.run([sys.executable, "-W", "ignore", "-c",
                          f"import sys, {name}; print(sys._is_gil_enabled())"],
                         capture_output=True, text=True)
    state = out.stdout.strip() or ("import failed: " + out.stderr.strip().splitlines()[-1])
    print(f"  import {name:30} -> gil_enabled={state}")
EOF
cat > "$SRC/ftcheck/ftcheck_plugin.py" <<'EOF'
"""pytest plugin: report whether the GIL was on at the start and end of the session."""
import sys, sysconfig
_start = None
def pytest_sessionstart(session):
    global _start
    _start = sys._is_gil_enabled()
def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"[ftcheck] {sys.version.split()[0]} Py_GIL_DISABLED={sysconfig.get_config_var('Py_GIL_DISABLED')} "
        f"gil_enabled: session start={_start}, end={sys._is_gil_enabled()}")
EOF
for mode in $GIL_MODES; do
  echo "== PYTHON_GIL=$mode: imports"
  in_root $( [ "$mode" = default ] || echo PYTHON_GIL="$mode" ) "$VPY" "$SRC/ftcheck/gilcheck.py" \
    iampg psycopg psycopg_pool botocore iampg.emulator cryptography cryptography.x509 _cffi_backend asyncpg sqlalchemy greenlet hypothesis 2>&1 || true
done
in_root "$VPY" -c "import psycopg; print('psycopg', psycopg.__version__, 'impl', psycopg.pq.__impl__, 'libpq', psycopg.pq.version())"
stamp "setup done"

# --- 6. The tests --------------------------------------------------------------------------------
status=0
for mode in $GIL_MODES; do
  echo "== PYTHON_GIL=$mode: pytest $*"
  # The project's filterwarnings=error would turn cffi's "GIL has been enabled" RuntimeWarning into
  # a conftest import error in default mode; it is reported above instead.
  TMO=${FT_TEST_TIMEOUT:-1800} in_root PYTHONPATH="$SRC/ftcheck" $( [ "$mode" = default ] || echo PYTHON_GIL="$mode" ) \
    bash -c 'cd "$0" && exec "$1" -m pytest -p ftcheck_plugin -p no:cacheprovider \
      -W "ignore:The global interpreter lock (GIL) has been enabled:RuntimeWarning" "${@:2}"' \
    "$SRC/iampg" "$VPY" -q "$@" || status=$?
done
stamp "done, exit $status"
exit $status
