"""README.md: every snippet runs as written and prints what the README shows; the README stays short.

The convention (docs/testing.md says the same):

* A ```python block is followed by a ```text block (only blank lines between): what the
  block prints on stdout, line for line. Each python block runs with fresh globals (so a
  missing import is a NameError, as for a reader who pastes it) in an empty directory of
  its own, all blocks in one CPU subprocess: CUDA hidden, TRITON_INTERPRET and
  FUSED_LORA_BACKEND unset, Hugging Face offline.
* A ```console block holds ``$ command`` lines, each followed by its output. Commands
  starting with ``python`` or ``fused-lora-memory`` run (the latter as ``python -m
  fused_lora.memory``, so the checkout is what runs); the others (git, pip) are shown
  only, and may show no output.
* In shown output, a line ``...`` stands for any number of lines; trailing spaces are
  ignored. Snippets print only what is exact on every CPU (counts, shapes, the booleans of
  ``torch.allclose``), never a timing or a loss value.
"""

import functools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 250
QUICK_START_BY_LINE = 50  # a newcomer reaches the PEFT quick start within this many lines (now at 44)
RUN_COMMANDS = ("python", "fused-lora-memory")


def fenced_blocks(text: str) -> list[dict]:
    """Every fenced block: its language, the (1-based) line of its opening fence, its lines,
    and the index of the line after its closing fence."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md line {start + 1}: a ``` block that never closes")
        blocks.append({"lang": opening.group(1), "line": start + 1, "body": lines[start + 1:i], "end": i + 1})
        i += 1
    return blocks


def python_examples(text: str) -> list[dict]:
    """Each python block with the text block that shows its output (``expected`` None when it has none)."""
    lines = text.splitlines()
    blocks = fenced_blocks(text)
    examples = []
    for index, block in enumerate(blocks):
        if block["lang"] != "python":
            continue
        expected = None
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        if following is not None and following["lang"] == "text" \
                and all(not line.strip() for line in lines[block["end"]:following["line"] - 1]):
            expected = following["body"]
        examples.append({"line": block["line"], "code": "\n".join(block["body"]) + "\n", "expected": expected})
    return examples


def console_commands(text: str) -> list[dict]:
    """Each ``$ command`` of the console blocks, with the output lines shown under it."""
    commands = []
    for block in fenced_blocks(text):
        if block["lang"] != "console":
            continue
        for offset, line in enumerate(block["body"]):
            if line.startswith("$ "):
                commands.append({"line": block["line"] + 1 + offset, "command": line[2:], "expected": []})
            elif not commands or commands[-1]["line"] < block["line"]:
                raise ValueError(f"README.md line {block['line'] + 1 + offset}: output before any $ command")
            else:
                commands[-1]["expected"].append(line)
    return commands


def lines_match(expected: list[str], actual: list[str]) -> bool:
    """``expected`` equals ``actual`` line for line (trailing spaces and blank lines at the end
    ignored), where an expected line ``...`` stands for any number of lines."""

    def clean(lines):
        lines = [line.rstrip() for line in lines]
        while lines and not lines[-1]:
            lines.pop()
        return tuple(lines)

    expected, actual = clean(expected), clean(actual)

    @functools.lru_cache(maxsize=None)
    def match(i: int, j: int) -> bool:
        if i == len(expected):
            return j == len(actual)
        if expected[i] == "...":
            return any(match(i + 1, k) for k in range(j, len(actual) + 1))
        return j < len(actual) and expected[i] == actual[j] and match(i + 1, j + 1)

    return match(0, 0)


TEXT = README.read_text(encoding="utf-8")
EXAMPLES = python_examples(TEXT)
COMMANDS = console_commands(TEXT)


def snippet_env() -> dict:
    env = dict(os.environ)
    for name in ("TRITON_INTERPRET", "FUSED_LORA_BACKEND", "FUSED_LORA_FORCE_TMA"):
        env.pop(name, None)
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


# One process runs every python block: exec with fresh globals, in its own directory, stdout
# captured. The code is padded with blank lines so a traceback names the README's own line.
RUNNER = r"""
import contextlib, io, json, os, sys, traceback
examples, base, result_path = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
results = []
for index, example in enumerate(examples):
    directory = os.path.join(base, f"block-{index}")
    os.makedirs(directory)
    os.chdir(directory)
    out, error = io.StringIO(), None
    try:
        code = compile("\n" * example["line"] + example["code"], "README.md", "exec")
        with contextlib.redirect_stdout(out):
            exec(code, {"__name__": "__main__"})
    except BaseException:
        error = traceback.format_exc()
    results.append({"stdout": out.getvalue(), "error": error})
with open(result_path, "w") as handle:
    json.dump(results, handle)
"""


@pytest.fixture(scope="module")
def python_results(tmp_path_factory):
    if not EXAMPLES:
        return []
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("readme")
    examples_path, result_path = base / "examples.json", base / "results.json"
    examples_path.write_text(json.dumps(EXAMPLES), encoding="utf-8")
    done = subprocess.run([sys.executable, "-c", RUNNER, str(examples_path), str(base), str(result_path)],
                          capture_output=True, text=True, env=snippet_env(), cwd=base, timeout=600)
    assert done.returncode == 0 and result_path.exists(), f"the snippet runner failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(result_path.read_text(encoding="utf-8"))


def test_readme_is_at_most_250_lines():
    count = len(TEXT.splitlines())
    assert count <= MAX_LINES, f"README.md has {count} lines; at most {MAX_LINES} (move the rest to docs/)"


def test_peft_quick_start_is_near_the_top():
    headings = [number for number, line in enumerate(TEXT.splitlines(), 1) if line.startswith("## Quick start")]
    assert headings, "README.md has no '## Quick start' section"
    assert headings[0] <= QUICK_START_BY_LINE, \
        f"the quick start begins at line {headings[0]}; keep it within the first {QUICK_START_BY_LINE} lines"


def test_every_python_block_shows_its_output():
    assert len(EXAMPLES) >= 3, f"expected the README's python snippets, found {len(EXAMPLES)}"
    missing = [example["line"] for example in EXAMPLES if example["expected"] is None]
    assert not missing, f"README.md: the python blocks at lines {missing} have no ```text block after them"


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=[f"line{e['line']}" for e in EXAMPLES])
def test_python_block_prints_what_the_readme_shows(python_results, index):
    example, result = EXAMPLES[index], python_results[index]
    assert result["error"] is None, f"README.md block at line {example['line']} raised:\n{result['error']}"
    actual = result["stdout"].splitlines()
    assert lines_match(example["expected"] or [], actual), (
        f"README.md block at line {example['line']}: it printed\n" + "\n".join(actual)
        + "\n\nbut the README shows\n" + "\n".join(example["expected"] or []))


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[f"line{c['line']}" for c in COMMANDS])
def test_console_command_prints_what_the_readme_shows(tmp_path, index):
    entry = COMMANDS[index]
    program = entry["command"].split()[0]
    compound = False
    if program in RUN_COMMANDS:  # a shell line (`python -m venv .venv && ...`) is not one command to run
        lexer = shlex.shlex(entry["command"], posix=True, punctuation_chars=True)
        lexer.commenters = "#"
        compound = any(token in ("&&", "||", ";", "|", "&") for token in lexer)
    if program not in RUN_COMMANDS or compound:
        assert not entry["expected"], (f"README.md line {entry['line']}: `{program}` is not run by this test, "
                                       f"so it may show no output")
        return
    words = shlex.split(entry["command"], comments=True)
    if "available_backends" in entry["command"] and os.environ.get("FUSED_LORA_SKIP_EXT") == "1":
        pytest.skip("FUSED_LORA_SKIP_EXT=1: no C++ backend here; the README shows a built install")
    # NOTE: fused-lora-memory as the module it runs: the installed script may belong to another checkout.
    program = [sys.executable] if words[0] == "python" else [sys.executable, "-m", "fused_lora.memory"]
    argv = program + words[1:]
    done = subprocess.run(argv, capture_output=True, text=True, env=snippet_env(), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, f"README.md line {entry['line']}: `{entry['command']}` failed:\n{done.stderr}"
    assert lines_match(entry["expected"], done.stdout.splitlines()), (
        f"README.md line {entry['line']}: `{entry['command']}` printed\n{done.stdout}\nbut the README shows\n"
        + "\n".join(entry["expected"]))


def test_lines_match_convention():
    assert lines_match(["a", "b"], ["a", "b  ", ""])
    assert not lines_match(["a", "b"], ["a", "c"])
    assert not lines_match(["a"], ["a", "b"])
    assert lines_match(["a", "...", "d"], ["a", "b", "c", "d"])
    assert lines_match(["...", "d"], ["d"])
    assert not lines_match(["a", "...", "d"], ["a", "b", "c"])


DOCUMENTS = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_cited_files_and_links_exist(path):
    """Each results file the document names (`name.csv` / .json / .png) is in bench/results/, and
    each relative link points at a file of the repository."""
    text = path.read_text(encoding="utf-8")
    missing = []
    for prefix, name in re.findall(r"`(bench/results/)?([\w*][\w.*-]*\.(?:csv|json|png))`", text):
        # A results file: named with its directory, or a dated / ISA-named file such as cpu-avx2-2026-11-30.csv.
        if (prefix or re.search(r"[0-9*]", name)) and not list((ROOT / "bench" / "results").glob(name)):
            missing.append(f"bench/results/{name}")
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"\w+://", target) and not (path.parent / target).exists():
            missing.append(target)
    assert not missing, f"{path.name} cites files that do not exist: {missing}"


def test_readme_names_no_commit():
    hashes = [word for word in re.findall(r"\b[0-9a-f]{7,40}\b", TEXT)
              if re.search(r"[0-9]", word) and re.search(r"[a-f]", word)]
    assert not hashes, f"README.md names commits {hashes}; history belongs in CHANGELOG.md"
