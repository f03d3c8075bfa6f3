#!/usr/bin/env bash
# Runs Bazel on this workspace without network access, e.g.
#
#   . .venv/bin/activate
#   .ci/bazel.sh build //...
#   .ci/bazel.sh test //tests:losses_test
#
# Two things differ from a plain `bazel` call; WORKSPACE and BUILD stay free of
# both:
#
# 1. Debian's bazel-bootstrap (Bazel 4.2.3) wants rules_cc, rules_java and
#    remote_coverage_tools from GitHub as soon as a py_test is analysed,
#    although Python rules use none of their code. This script writes tiny
#    stand-ins under $BAZEL_CI_DIR and points Bazel at them with
#    --override_repository (through a generated --bazelrc).
# 2. py_test runs the first `python3` on PATH. An activated venv with an
#    editable install of supcon_tf would let a test import a module its
#    target never declared, so the tests run under a bare venv whose .pth
#    file adds the active environment's site-packages directories as plain
#    paths: third-party packages import, the editable-install hook (itself a
#    .pth file there) does not run, and supcon_tf comes only from runfiles.
#
# The generated bazelrc also undoes the --sandbox_debug that Debian's
# /etc/bazel/bazelrc sets, and gives matplotlib a writable cache directory.
#
# Needs `bazel` (apt-get install bazel-bootstrap) and the project's Python
# environment active. BAZEL_CI_DIR defaults to a directory under $TMPDIR (or
# /tmp) named after this checkout, so two checkouts do not share it.
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v bazel >/dev/null; then
  echo "bazel not found; install it with: apt-get install bazel-bootstrap" >&2
  exit 1
fi

checkout_id="$(pwd | cksum | cut -d' ' -f1)"
ci_dir="${BAZEL_CI_DIR:-${TMPDIR:-/tmp}/supcon_tf_bazel_ci_$checkout_id}"
stubs="$ci_dir/repos"

# write FILE < TEXT: leaves an identical file untouched, so Bazel sees no
# change and a concurrent run never reads half a file.
write() {
  mkdir -p "$(dirname "$1")"
  local tmp
  tmp="$(mktemp "$1.XXXXXX")"
  cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm "$tmp"; else mv "$tmp" "$1"; fi
}

# rules_cc and rules_java: the load()ed names forward to the native rules;
# @bazel_tools only loads them, and Python targets never instantiate them.
for empty in rules_cc/WORKSPACE rules_cc/BUILD rules_java/WORKSPACE \
  rules_java/BUILD rules_java/java/BUILD remote_coverage_tools/WORKSPACE; do
  write "$stubs/$empty" < /dev/null
done
write "$stubs/rules_cc/cc/BUILD" <<'EOF'
package(default_visibility = ["//visibility:public"])

toolchain_type(name = "toolchain_type")
EOF
write "$stubs/rules_cc/cc/defs.bzl" <<'EOF'
cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
objc_library = native.objc_library
EOF
write "$stubs/rules_java/java/defs.bzl" <<'EOF'
java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_proto_library = native.java_proto_library
java_runtime = native.java_runtime
java_toolchain = native.java_toolchain
EOF
# Only `bazel coverage` runs these; `bazel test` just needs the labels.
write "$stubs/remote_coverage_tools/BUILD" <<'EOF'
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator")

filegroup(name = "lcov_merger")
EOF

rc="$ci_dir/bazelrc"
{
  for cmd in build query fetch; do
    for repo in rules_cc rules_java remote_coverage_tools; do
      echo "$cmd --override_repository=$repo=$stubs/$repo"
    done
  done
  # Debian's /etc/bazel/bazelrc turns on --sandbox_debug, which fills every
  # test log with sandbox traces and keeps each sandbox on disk.
  echo "build --nosandbox_debug"
  # $HOME is read-only inside the sandbox; give matplotlib a cache it keeps.
  echo "test --test_env=MPLCONFIGDIR=$ci_dir/matplotlib"
} | write "$rc"
mkdir -p "$ci_dir/matplotlib"

# The Python that py_test finds first on PATH: see point 2 above. Rebuilt
# only when the active interpreter changes, as a running test may use it.
python="$ci_dir/python"
version() { "$1" -c 'import sys; print(sys.version)' 2>/dev/null || true; }
if [ "$(version "$python/bin/python3")" != "$(version python3)" ]; then
  python3 -m venv --clear --without-pip "$python"
fi
python3 - "$python/bin/python3" <<'EOF'
import os, site, subprocess, sys, sysconfig
paths = site.getsitepackages() + [sysconfig.get_path("purelib"),
                                  sysconfig.get_path("platlib")]
target = subprocess.check_output(
    [sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    text=True).strip()
pth = os.path.join(target, "project_env.pth")
with open(pth + ".tmp", "w") as f:
  f.write("".join(f"{p}\n" for p in dict.fromkeys(paths)))
os.replace(pth + ".tmp", pth)
EOF
export PATH="$python/bin:$PATH"

exec bazel --bazelrc="$rc" "$@"
