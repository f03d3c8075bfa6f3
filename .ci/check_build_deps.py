#!/usr/bin/env python3
"""Checks that the Bazel BUILD files mirror the Python imports exactly.

`bazel query` accepts a BUILD file with a misspelled or missing dep, and a
test run from an editable install can import a module its target never
declared, so this reads the sources instead:

- every `.py` file under `supcon_tf/` and `tests/` belongs to exactly one
  target, in the BUILD file of its own directory;
- `supcon_tf` has one `py_library` per module, named after the module (a
  package's `__init__.py` after its directory; `__main__.py` is
  `py_binary(name = "main")`); `tests/` has one `py_test` per `*_test.py`
  file, named after the file, with `main` set to it, and a `py_library` per
  helper such as `conftest.py`. A helper script that a test runs as a
  subprocess may instead be an extra `srcs` entry of that test;
- a target's first-party `deps` are exactly the targets owning the modules
  its sources import (`import supcon_tf.x`, `from supcon_tf import x`,
  relative imports, and sibling imports inside `tests/` such as
  `import conftest`), plus `//tests:conftest` for every test. Missing and
  extra deps both fail; third-party packages come from the Python
  environment, so they never appear in `deps`;
- a target whose sources start `python -m supcon_tf...` in a subprocess
  (an argument list holding "-m", "supcon_tf...") has the module's target,
  e.g. //supcon_tf:main for the package's __main__.py, in `deps` or `data`;
- a `py_test` has `tags = ["slow"]` exactly when its file uses
  `@pytest.mark.slow`.

BUILD files are read with `ast`, so they must stay literal: one call per
target, string and list arguments, no variables or `glob`.

Usage: python3 .ci/check_build_deps.py [REPO_ROOT]. Exit status 1 on any
mismatch, with a suggested target for each missing one.
"""

import ast
import os
import sys

# Directories whose Python files must all have targets. A new subpackage
# (e.g. supcon_tf/foo/) needs its own BUILD file; the check says so.
PYTHON_ROOTS = ("supcon_tf", "tests")
# Directories where a test's helper script may be an extra source of the
# test target instead of a library of its own.
TEST_DIRS = ("tests",)
CONFTEST = "//tests:conftest"
PY_RULES = ("py_library", "py_test", "py_binary")


class Target:
  """One py_* rule read from a BUILD file."""

  def __init__(self, package, rule, kwargs, build_file, lineno):
    self.package = package
    self.rule = rule
    self.name = kwargs.get("name")
    self.srcs = list(kwargs.get("srcs", []))
    self.deps = list(kwargs.get("deps", []))
    self.data = list(kwargs.get("data", []))
    self.main = kwargs.get("main")
    self.tags = list(kwargs.get("tags", []))
    self.where = f"{build_file}:{lineno}"

  @property
  def label(self):
    return f"//{self.package}:{self.name}"


def canonical(label, package):
  """`:x`, `//a/b` and `//a/b:c` forms as `//a/b:c`."""
  if label.startswith(":"):
    return f"//{package}{label}"
  if label.startswith("//") and ":" not in label:
    return f"{label}:{label.rsplit('/', 1)[-1]}"
  return label


def short(label, package):
  """The label as it reads best inside `package`'s BUILD file."""
  pkg, name = label[2:].split(":")
  if pkg == package:
    return f":{name}"
  if pkg.rsplit("/", 1)[-1] == name:
    return f"//{pkg}"
  return label


def read_build(root, package, errors):
  """Returns the py_* targets declared in `package`'s BUILD file."""
  path = os.path.join(package, "BUILD")
  with open(os.path.join(root, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  targets = []
  for node in tree.body:
    if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)):
      errors.append(f"{path}:{node.lineno}: only rule calls are supported")
      continue
    call = node.value
    if call.func.id not in PY_RULES:
      continue
    try:
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except ValueError:
      errors.append(f"{path}:{node.lineno}: {call.func.id} arguments must be "
                    "literals (no variables, glob or concatenation)")
      continue
    targets.append(Target(package, call.func.id, kwargs, path, node.lineno))
  return targets


def walk(root):
  """Yields (repo-relative directory, file names) under PYTHON_ROOTS."""
  for top in PYTHON_ROOTS:
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
      dirnames[:] = sorted(d for d in dirnames
                           if d != "__pycache__" and not d.startswith("."))
      yield os.path.relpath(dirpath, root), sorted(filenames)


def build_packages(root):
  """Directories under PYTHON_ROOTS that have a BUILD file."""
  return [d for d, names in walk(root) if "BUILD" in names]


def python_files(root):
  """Repo-relative paths of every .py file under PYTHON_ROOTS."""
  return [os.path.join(d, n) for d, names in walk(root) for n in names
          if n.endswith(".py")]


def target_name(path):
  """The target name a file's target must have."""
  directory, src = os.path.split(path)
  if src == "__init__.py":
    return os.path.basename(directory)
  if src == "__main__.py":
    return "main"
  return src[:-len(".py")]


def module_name(path):
  """`supcon_tf/models/__init__.py` -> `supcon_tf.models`."""
  parts = path[:-len(".py")].split(os.sep)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imported_files(root, path, modules):
  """First-party files whose modules `path` imports (itself excluded).

  `modules` maps a dotted module name (`supcon_tf.losses`) to its file.
  Inside a test directory, `import conftest` finds the sibling file, as it
  does under pytest.
  """
  with open(os.path.join(root, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  directory = os.path.dirname(path)
  siblings = {}
  if directory in TEST_DIRS:
    for name in sorted(os.listdir(os.path.join(root, directory))):
      if name.endswith(".py"):
        siblings[name[:-len(".py")]] = os.path.join(directory, name)
  package = module_name(path)
  if not path.endswith("__init__.py"):
    package = package.rpartition(".")[0]
  found = set()

  def add(name):
    top = name.split(".")[0]
    if top in siblings:
      found.add(siblings[top])
    elif name in modules:
      found.add(modules[name])

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(alias.name)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        # `from pkg import mod` imports a module; `from pkg import Name`
        # imports from pkg/__init__.py.
        sub = f"{base}.{alias.name}" if base else alias.name
        add(sub if sub in modules or not base else base)
  found.discard(path)
  return found


def modules_run(root, path, modules):
  """Files that `path` runs as `python -m MODULE` (a literal "-m", "MODULE").

  A package runs its `__main__.py`.
  """
  with open(os.path.join(root, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  found = set()
  for node in ast.walk(tree):
    if not isinstance(node, (ast.List, ast.Tuple)):
      continue
    items = [e.value if isinstance(e, ast.Constant) else None
             for e in node.elts]
    for flag, name in zip(items, items[1:]):
      if flag == "-m" and name in modules:
        run = modules[name]
        if run.endswith("__init__.py"):
          run = os.path.join(os.path.dirname(run), "__main__.py")
        found.add(run)
  return found


def main(argv):
  root = os.path.abspath(argv[1] if len(argv) > 1 else
                         os.path.join(os.path.dirname(__file__), ".."))
  errors = []
  if not os.path.exists(os.path.join(root, "BUILD")):
    errors.append("BUILD: missing top-level BUILD file")

  files = python_files(root)
  modules = {module_name(p): p for p in files
             if os.path.dirname(p) not in TEST_DIRS}

  # Every directory holding Python files is a Bazel package of its own.
  targets = []
  for package in build_packages(root):
    targets.extend(read_build(root, package, errors))

  owner = {}  # file path -> Target
  for target in targets:
    if not target.name:
      errors.append(f"{target.where}: {target.rule} without a name")
      continue
    for src in target.srcs:
      path = os.path.join(target.package, src)
      if path not in files:
        errors.append(f"{target.where}: {target.label} lists {src!r}, which "
                      f"is not a .py file under {', '.join(PYTHON_ROOTS)}")
      elif path in owner:
        errors.append(f"{target.where}: {path} is in both "
                      f"{owner[path].label} and {target.label}")
      else:
        owner[path] = target

  for path in files:
    if path not in owner:
      errors.append(missing_target(root, path, modules))

  for target in targets:
    if not target.name:
      continue
    errors.extend(check_shape(target))
    want = set()
    for src in target.srcs:
      path = os.path.join(target.package, src)
      if path not in owner:
        continue
      for dep_path in imported_files(root, path, modules):
        dep = owner.get(dep_path)
        if dep is None:
          errors.append(f"{target.where}: {target.label} imports "
                        f"{dep_path}, which has no target yet")
        elif dep is not target:
          want.add(dep.label)
    if target.rule == "py_test":
      want.add(CONFTEST)
      errors.extend(check_slow_tag(root, target))
    have = [canonical(d, target.package) for d in target.deps]
    data = {canonical(d, target.package) for d in target.data}
    for src in target.srcs:
      for run in modules_run(root, os.path.join(target.package, src), modules):
        runner = owner.get(run)
        if runner is None:
          errors.append(f"{target.where}: {target.label} runs {run} with "
                        "python -m, which has no target")
        elif runner.label not in set(have) | data:
          errors.append(f"{target.where}: {target.label} runs {run} with "
                        f"python -m; add \"{short(runner.label, target.package)}"
                        "\" to its data")
    for dup in sorted({d for d in have if have.count(d) > 1}):
      errors.append(f"{target.where}: {target.label} lists {dup} twice")
    for dep in sorted(want - set(have)):
      errors.append(f"{target.where}: {target.label} is missing dep "
                    f"\"{short(dep, target.package)}\"")
    for dep in sorted(set(have) - want):
      if not dep.startswith("//"):
        errors.append(f"{target.where}: {target.label} has dep \"{dep}\"; "
                      "third-party packages come from the Python environment "
                      "on PATH, not from Bazel")
        continue
      errors.append(f"{target.where}: {target.label} has extra dep "
                    f"\"{short(dep, target.package)}\" (not imported by "
                    f"{', '.join(target.srcs)})")

  if errors:
    print("BUILD files do not mirror the imports:\n", file=sys.stderr)
    print("\n".join(errors), file=sys.stderr)
    return 1
  print(f"check_build_deps: {len(targets)} targets match the imports of "
        f"{len(files)} files.")
  return 0


def check_shape(target):
  """Naming rules that keep labels predictable from file names."""
  errors = []
  if target.package in TEST_DIRS:
    tests = [s for s in target.srcs if s.endswith("_test.py")]
    if target.rule == "py_test":
      expected = f"{target.name}.py"
      if target.main != expected or expected not in target.srcs:
        errors.append(f"{target.where}: py_test {target.label} needs "
                      f"srcs including and main = \"{expected}\"")
      if len(tests) > 1:
        errors.append(f"{target.where}: {target.label} holds several test "
                      f"files {tests}; give each its own py_test")
    elif tests:
      errors.append(f"{target.where}: {tests} must be py_test targets")
    elif target.srcs != [f"{target.name}.py"]:
      errors.append(f"{target.where}: {target.label} should have "
                    f"srcs = [\"{target.name}.py\"]")
  elif target.srcs == ["__main__.py"]:
    if target.rule != "py_binary" or target.name != "main":
      errors.append(f"{target.where}: __main__.py should be "
                    f"py_binary(name = \"main\", main = \"__main__.py\")")
  else:
    if target.rule != "py_library":
      errors.append(f"{target.where}: {target.label} should be a py_library")
    elif len(target.srcs) != 1:
      errors.append(f"{target.where}: {target.label} should hold exactly one "
                    f"module, has {target.srcs}")
    else:
      src = target.srcs[0]
      expected = target_name(os.path.join(target.package, src))
      if target.name != expected:
        errors.append(f"{target.where}: target for {src} should be named "
                      f"{expected!r}, not {target.name!r}")
  return errors


def dep_order(label):
  """Buildifier's order: local labels first, then by package and name."""
  return (not label.startswith(":"),) + tuple(label.split(":", 1))


def has_slow_tests(root, path):
  """Whether the file uses `pytest.mark.slow` anywhere."""
  with open(os.path.join(root, path)) as f:
    tree = ast.parse(f.read(), filename=path)
  return any(isinstance(node, ast.Attribute) and node.attr == "slow" and
             isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
             for node in ast.walk(tree))


def check_slow_tag(root, target):
  """A py_test is tagged "slow" exactly when its file has slow tests."""
  main = os.path.join(target.package, target.main or "")
  if not os.path.isfile(os.path.join(root, main)):
    return []
  slow = has_slow_tests(root, main)
  if slow and "slow" not in target.tags:
    return [f"{target.where}: {target.label} needs tags = [\"slow\"]: "
            f"{main} has @pytest.mark.slow tests"]
  if not slow and "slow" in target.tags:
    return [f"{target.where}: {target.label} is tagged \"slow\" but {main} "
            "has no @pytest.mark.slow test"]
  return []


def missing_target(root, path, modules):
  """An error for a file without a target, with a target to paste."""
  package, src = os.path.split(path)
  where = os.path.join(package, "BUILD")
  if not os.path.exists(os.path.join(root, where)):
    where += " (a new file; copy the header of a sibling BUILD file)"
  deps = set()
  for dep_path in imported_files(root, path, modules):
    dep_pkg, dep_src = os.path.split(dep_path)
    if dep_pkg in TEST_DIRS and dep_src.endswith("_test.py"):
      return (f"{path}: no target; it imports {dep_path}, so add "
              f"\"{src}\" to the srcs of //{dep_pkg}:{dep_src[:-3]}")
    deps.add(short(f"//{dep_pkg}:{target_name(dep_path)}", package))
  is_test = package in TEST_DIRS and src.endswith("_test.py")
  if is_test:
    deps.add(short(CONFTEST, package))
  rule = ("py_test" if is_test else
          "py_binary" if src == "__main__.py" else "py_library")
  lines = [f"{rule}(", f"    name = \"{target_name(path)}\","]
  if rule == "py_library" and package in TEST_DIRS:
    lines.append("    testonly = True,")
  if is_test:
    lines.append("    size = \"medium\",  # see the sizes in tests/BUILD")
  lines.append(f"    srcs = [\"{src}\"],")
  if rule != "py_library":
    lines.append(f"    main = \"{src}\",")
  if is_test and has_slow_tests(root, path):
    lines.append("    tags = [\"slow\"],")
  if deps:
    lines.append("    deps = [")
    lines.extend(f"        \"{d}\"," for d in sorted(deps, key=dep_order))
    lines.append("    ],")
  lines.append(")")
  return f"{path}: no target; add to {where}:\n" + "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main(sys.argv))
