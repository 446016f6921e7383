"""Installing and importing: the source checkout, the import cost, setup.py's messages, the torch floor,
and building beside Hugging Face's ``kernels`` package (a dependency of transformers, pinned in
requirements.txt), whose setuptools entry point runs inside every build of this package."""

import importlib.machinery
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Drop the editable install's import hook: what a source checkout does on its own.
NO_EDITABLE_FINDER = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"


def _python(code, cwd=ROOT, env=None, timeout=180, no_site=False):
    """Run ``code`` in a fresh interpreter; ``no_site`` (-S) hides site-packages and the copy installed there."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_LORA_")}
    environment.pop("PYTHONPATH", None)
    environment.update(env or {})
    return subprocess.run([sys.executable] + (["-S"] if no_site else []) + ["-c", code], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def test_source_checkout_imports_cheaply_and_runs_the_triton_kernels_without_the_editable_finder():
    from fused_lora.ops.backends import triton_interpreter_problem

    if triton_interpreter_problem():  # (on a GPU machine's own stack; the pinned one has none)
        pytest.skip(triton_interpreter_problem())
    result = _python(
        NO_EDITABLE_FINDER +
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import fused_lora\n"
        "assert 'torch' not in sys.modules, 'import fused_lora imported torch'\n"
        "assert set(fused_lora.__all__) <= set(dir(fused_lora))\n"
        f"assert fused_lora.kernels.__file__ == {os.path.join(ROOT, 'kernels', 'triton', '__init__.py')!r}, "
        "fused_lora.kernels.__file__\n"
        "from fused_lora import *\n"
        "missing = [n for n in fused_lora.__all__ if n not in globals()]\n"
        "assert not missing, missing\n"
        "assert 'fused_lora.ops.custom_ops' in sys.modules  # loading the names registers the custom ops\n"
        "import torch\n"
        "assert 'triton' in fused_lora.available_backends()\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, W, A, B = (torch.randn(*s, generator=g) for s in ((5, 16), (8, 16), (2, 16), (8, 2)))\n"
        "y = fused_lora.fused_lora_linear(x, W, None, A, B, 2.0, backend='triton')\n"
        "torch.testing.assert_close(y, fused_lora.lora_linear_reference(x, W, None, A, B, 2.0), "
        "atol=1e-5, rtol=1e-5)\n"
        "print('ok')\n", timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.fixture
def checkout_and_installed_copy(tmp_path):
    """A source checkout without its extension, and a site directory with an installed copy that has one."""
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.join(ROOT, "fused_lora"), checkout / "fused_lora",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), checkout / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(ROOT, "setup.py"), checkout / "setup.py")
    site = tmp_path / "site"
    extension = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    (site / "fused_lora").mkdir(parents=True)
    (site / "fused_lora" / "__init__.py").write_text("")
    (site / "fused_lora" / extension).write_bytes(b"")
    info = site / "fused_lora-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fused_lora\nVersion: 0.1.0\n")
    (info / "RECORD").write_text(f"fused_lora/__init__.py,,\nfused_lora/{extension},,\n"
                                 "fused_lora-0.1.0.dist-info/METADATA,,\nfused_lora-0.1.0.dist-info/RECORD,,\n")
    return checkout, site, extension


def test_a_checkout_that_hides_an_installed_extension_fails_with_one_line(checkout_and_installed_copy):
    checkout, site, extension = checkout_and_installed_copy
    code = NO_EDITABLE_FINDER + "import fused_lora; print('imported', fused_lora.__file__)"
    result = _python(code, cwd=checkout, env={"PYTHONPATH": str(site)})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: fused_lora: imported the source checkout {checkout / 'fused_lora'}, "
                           f"which has no built C++ extension, instead of the installed package in "
                           f"{site / 'fused_lora'}"), last
    assert "run from outside the checkout" in last and "build_ext --inplace" in last

    # Deliberately without the extension, or with it built in place: imports.
    result = _python(code, cwd=checkout, env={"PYTHONPATH": str(site), "FUSED_LORA_SKIP_EXT": "1"})
    assert result.returncode == 0 and f"imported {checkout / 'fused_lora'}" in result.stdout, result.stderr
    (checkout / "fused_lora" / extension).write_bytes(b"")
    result = _python(code, cwd=checkout, env={"PYTHONPATH": str(site)})
    assert result.returncode == 0 and f"imported {checkout / 'fused_lora'}" in result.stdout, result.stderr


def test_the_egg_info_pip_install_leaves_in_the_checkout_does_not_hide_the_installed_extension(
        checkout_and_installed_copy):
    # `pip install --no-build-isolation .` runs egg_info in the checkout and leaves fused_lora.egg-info/
    # there, listing no extension; from the checkout's root the metadata lookup meets it first.
    checkout, site, extension = checkout_and_installed_copy
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info"], cwd=checkout, capture_output=True,
                            text=True, timeout=180, env={**os.environ, "FUSED_LORA_SKIP_EXT": "1"})
    assert result.returncode == 0 and (checkout / "fused_lora.egg-info" / "SOURCES.txt").is_file(), result.stderr
    code = NO_EDITABLE_FINDER + "import fused_lora; print('imported', fused_lora.__file__)"
    result = _python(code, cwd=checkout, env={"PYTHONPATH": str(site)}, no_site=True)
    assert result.returncode != 0, result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"ImportError: fused_lora: imported the source checkout {checkout / 'fused_lora'}, which has no built C++ "
        f"extension, instead of the installed package in {site / 'fused_lora'}"), result.stderr[-2000:]


def test_an_editable_install_of_another_checkout_with_the_extension_is_not_hidden(checkout_and_installed_copy,
                                                                                    tmp_path):
    # `pip install -e` elsewhere: the installed copy is another checkout, known by direct_url.json.
    checkout, _, extension = checkout_and_installed_copy
    other = tmp_path / "other"
    (other / "fused_lora").mkdir(parents=True)
    (other / "fused_lora" / extension).write_bytes(b"")
    code = NO_EDITABLE_FINDER + "import fused_lora; print('imported', fused_lora.__file__)"
    for target, fails in ((other, True), (checkout, False)):
        site = tmp_path / f"site-{target.name}"
        info = site / "fused_lora-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fused_lora\nVersion: 0.1.0\n")
        (info / "RECORD").write_text("fused_lora-0.1.0.dist-info/METADATA,,\nfused_lora-0.1.0.dist-info/RECORD,,\n"
                                     "fused_lora-0.1.0.dist-info/direct_url.json,,\n")
        (info / "direct_url.json").write_text(f'{{"dir_info": {{"editable": true}}, "url": "{target.as_uri()}"}}')
        result = _python(code, cwd=checkout, env={"PYTHONPATH": str(site)}, no_site=True)
        if fails:  # another checkout, built: this one would hide it
            assert result.returncode != 0
            assert (f"which has no built C++ extension, instead of the installed package in {other / 'fused_lora'}"
                    in result.stderr.strip().splitlines()[-1]), result.stderr[-2000:]
        else:  # this very checkout installed in editable mode: nothing is hidden
            assert result.returncode == 0 and f"imported {checkout / 'fused_lora'}" in result.stdout, result.stderr


def _setup_py(args, env=None, block_torch=False, prelude=""):
    """Run setup.py with ``args``; ``block_torch`` makes ``import torch`` fail, as in pip's isolated build."""
    code = ("import sys\n" + ("sys.modules['torch'] = None\n" if block_torch else "") + prelude
            + f"sys.argv = ['setup.py'] + {list(args)!r}\n"
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), "
            "{'__file__': __import__('os').path.abspath('setup.py'), '__name__': '__main__'})\n")
    return _python(code, env=env)


def test_setup_py_never_drops_the_extension_silently():
    result = _setup_py(["--name"], block_torch=True)
    assert result.returncode != 0
    assert ("fused_lora: cannot build the C++ CPU backend: torch is not importable here" in result.stderr
            and "--no-build-isolation" in result.stderr and "FUSED_LORA_SKIP_EXT=1" in result.stderr), result.stderr
    result = _setup_py(["--name"], env={"FUSED_LORA_SKIP_EXT": "1"}, block_torch=True)
    assert result.returncode == 0 and result.stdout.strip() == "fused_lora", result.stderr
    assert "installing without the C++ CPU backend" in result.stderr


def test_setup_py_says_when_setuptools_cannot_build_a_wheel():
    # A fresh Python 3.11 venv: setuptools 65 and no `wheel` package ("invalid command 'bdist_wheel'").
    old_setuptools_without_wheel = "import setuptools; setuptools.__version__ = '65.5.0'; sys.modules['wheel'] = None\n"
    for command in ("bdist_wheel", "editable_wheel", "dist_info"):
        result = _setup_py([command, "--help"], env={"FUSED_LORA_SKIP_EXT": "1"}, prelude=old_setuptools_without_wheel)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1] == (
            "fused_lora: building a wheel with setuptools 65.5.0 needs the `wheel` package, which is not installed "
            "(pip's --no-build-isolation uses what is installed). Run `pip install --upgrade setuptools wheel "
            "ninja`, then install again."), result.stderr[-2000:]
    # setuptools >= 70.1 has its own bdist_wheel (and wheel vendored): the installed one passes.
    result = _setup_py(["bdist_wheel", "--help"], env={"FUSED_LORA_SKIP_EXT": "1"})
    assert result.returncode == 0 and "--dist-dir" in result.stdout, result.stderr[-2000:]


def test_setup_py_says_when_the_compiler_is_missing(tmp_path):
    result = _setup_py(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                       env={"CXX": "no-such-c++-compiler"})
    assert result.returncode != 0
    assert ("building the C++ CPU backend needs a C++ compiler, and 'no-such-c++-compiler' was not found"
            in result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "lib").exists()


def test_install_layout_has_the_kernels_configs_and_license(tmp_path):
    result = _setup_py(["build_py", "--build-lib", str(tmp_path)], env={"FUSED_LORA_SKIP_EXT": "1"})
    assert result.returncode == 0, result.stderr
    for name in ("lora_fwd.py", "lora_bwd.py", "lora_shrink.py", "dropout_mask.py", "common.py"):
        assert (tmp_path / "fused_lora" / "kernels" / name).is_file(), name
    configs = sorted(p.name for p in (tmp_path / "fused_lora" / "memory" / "configs").iterdir())
    assert configs == sorted(os.listdir(os.path.join(ROOT, "fused_lora", "memory", "configs"))) and len(configs) == 5
    with open(os.path.join(ROOT, "LICENSE")) as handle:
        text = handle.read()
    assert text.startswith("MIT License") and "fused_lora developers" in text


def test_torch_floor_is_the_same_in_setup_py_and_the_package_and_is_checked():
    import fused_lora

    with open(os.path.join(ROOT, "setup.py")) as handle:
        floor = re.search(r'^MIN_TORCH = "([0-9.]+)"$', handle.read(), re.M).group(1)
    assert tuple(int(v) for v in floor.split(".")) == fused_lora.MIN_TORCH == (2, 4)
    result = _python("import torch; torch.__version__ = '2.3.1'\n"
                     "import fused_lora\n"
                     "fused_lora.FusedLoRALinear\n")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "ImportError: fused_lora needs torch>=2.4 (torch.library.custom_op), found torch 2.3.1")


# Hugging Face's `kernels` (transformers >= 5.25 depends on it) registers a setuptools egg_info.writers
# entry point, kernels._internals.locking:write_egg_lockfile, so setuptools imports `kernels` in every
# build of this package, with the repository's root on sys.path. A top-level kernels/ package here
# would be imported instead, and the build would stop (ModuleNotFoundError: kernels._internals).

def _hugging_face_kernels(tmp_path):
    """The installed `kernels` package's __init__.py, found from outside the repository; its build hook must be there."""
    result = _python("import importlib.metadata, importlib.util\n"
                     "spec = importlib.util.find_spec('kernels')\n"
                     "print(spec.origin if spec else None)\n"
                     "print([e.value for e in importlib.metadata.entry_points(group='egg_info.writers')])\n",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    origin, hooks = result.stdout.splitlines()
    assert origin != "None" and not origin.startswith(os.path.join(ROOT, "kernels") + os.sep), (
        f"Hugging Face's kernels package is not installed ({origin}): requirements.txt pins kernels==0.19.1")
    assert "kernels._internals.locking:write_egg_lockfile" in hooks, hooks
    return origin


def _copy_repository(destination):
    """The repository as a fresh clone has it: no build outputs, no extension, no metadata."""
    shutil.copytree(ROOT, destination, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "_C.*", "__pycache__", ".pytest_cache", ".hypothesis"))
    return destination


def _environments_fused_lora():
    """What this environment has installed as fused_lora; a pip call into a target or prefix must not change it."""
    import importlib.metadata

    return sorted((d.read_text("direct_url.json") or "", d.read_text("RECORD") or d.read_text("SOURCES.txt") or "")
                  for d in importlib.metadata.distributions(name="fused_lora"))


def _run(command, cwd, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_LORA_")}
    environment.pop("PYTHONPATH", None)
    environment.update(env)
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)


def test_import_kernels_from_the_repository_root_gives_hugging_faces_package(tmp_path):
    installed = _hugging_face_kernels(tmp_path)
    result = _python(NO_EDITABLE_FINDER + "import kernels, fused_lora\n"
                     "print(kernels.__file__); print(fused_lora.kernels.__file__)", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [installed, os.path.join(ROOT, "kernels", "triton", "__init__.py")]


def test_setup_py_and_pip_build_beside_hugging_faces_kernels_and_the_wheel_has_the_kernels_and_configs(tmp_path):
    installed = _hugging_face_kernels(tmp_path)
    repository = _copy_repository(tmp_path / "repository")
    # setup.py run directly: the repository's root is sys.path[0] when setuptools loads kernels' hook.
    result = _run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], repository,
                  FUSED_LORA_SKIP_EXT="1")
    assert result.returncode == 0, result.stderr[-3000:]
    # As pip builds it (pyproject.toml's backend), offline; FUSED_LORA_SKIP_EXT=1 leaves the C++ build out.
    result = _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                   "--wheel-dir", str(tmp_path / "dist"), str(repository)], tmp_path, FUSED_LORA_SKIP_EXT="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [wheel] = list((tmp_path / "dist").glob("fused_lora-*.whl"))
    kernel_files = sorted(name for name in os.listdir(os.path.join(ROOT, "kernels", "triton")) if name.endswith(".py"))
    config_files = sorted(os.listdir(os.path.join(ROOT, "fused_lora", "memory", "configs")))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert sorted(n.split("/")[-1] for n in names if n.startswith("fused_lora/kernels/")) == kernel_files
    assert sorted(n.split("/")[-1] for n in names if n.startswith("fused_lora/memory/configs/")) == config_files
    assert len(config_files) == 5 and "lora_fwd.py" in kernel_files
    assert not [n for n in names if n.startswith("kernels/")], "the wheel must not install a top-level kernels"
    assert "fused-lora-memory = fused_lora.memory:main" in entry_points, entry_points

    # The installed wheel: its own kernels and configs, beside Hugging Face's kernels.
    target = tmp_path / "target"
    before = _environments_fused_lora()
    result = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                   str(wheel)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _environments_fused_lora() == before
    result = _python(NO_EDITABLE_FINDER + "import fused_lora, fused_lora.kernels.lora_fwd, kernels, os\n"
                     "print(fused_lora.__file__); print(fused_lora.kernels.__file__); print(kernels.__file__)\n"
                     "print(sorted(os.listdir(os.path.join(os.path.dirname(fused_lora.__file__), 'memory', 'configs'))))",
                     cwd=tmp_path, env={"PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [str(target / "fused_lora" / "__init__.py"),
                                          str(target / "fused_lora" / "kernels" / "__init__.py"),
                                          installed, repr(config_files)]


def test_pip_install_editable_beside_hugging_faces_kernels_maps_the_checkout(tmp_path):
    installed = _hugging_face_kernels(tmp_path)
    repository = _copy_repository(tmp_path / "repository")
    prefix = tmp_path / "prefix"
    before = _environments_fused_lora()
    # --ignore-installed: without it pip would first uninstall this environment's own fused_lora.
    result = _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                   "--ignore-installed", "--prefix", str(prefix), "--editable", str(repository)], tmp_path,
                  FUSED_LORA_SKIP_EXT="1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert _environments_fused_lora() == before, "the install into a prefix changed this environment's fused_lora"
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    # From anywhere, and from the checkout's root: the checkout's package, Hugging Face's kernels.
    # The prefix's site directory first, as if it were this environment's; the environment's own editable
    # finder (a module of the same name as the prefix's) forgotten.
    code = (NO_EDITABLE_FINDER + "[sys.modules.pop(name) for name in list(sys.modules) if name.startswith('__editable__')]\n"
            f"import site; sys.path.insert(0, {site!r}); site.addsitedir({site!r})\n"
            "import fused_lora, fused_lora.kernels.lora_fwd, kernels\n"
            "print(fused_lora.__file__); print(fused_lora.kernels.__file__); print(kernels.__file__)")
    for cwd in (tmp_path, repository):
        result = _python(code, cwd=cwd, env={"FUSED_LORA_SKIP_EXT": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.splitlines() == [str(repository / "fused_lora" / "__init__.py"),
                                              str(repository / "kernels" / "triton" / "__init__.py"), installed]
