#!/bin/bash
# PEFT's own LoRA tests (tests/test_custom_models.py -k "Lora or lora"), run once as PEFT alone and
# once with every PEFT model passed through fused_lora.from_peft (from_peft_plugin.py); then the
# outcomes side by side and what from_peft did to the models. Not part of `make test`: it downloads
# the installed peft's source distribution and PEFT's test-only dependencies (into WORKDIR/extra,
# never into the environment). Usage, from the repository root with the venv active:
#   bash tools/peft_suite/run.sh [WORKDIR]       (default: $TMPDIR/fused_lora_peft_suite)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
work=${1:-${TMPDIR:-/tmp}/fused_lora_peft_suite}
version=$("$py" -c "import peft; print(peft.__version__)")
mkdir -p "$work" && cd "$work"
if [ ! -d "peft-$version/tests" ]; then
  "$py" -m pip download -q --no-deps --no-binary :all: "peft==$version" -d sdist
  tar xzf "sdist/peft-$version.tar.gz" "peft-$version/tests"
  touch "peft-$version/tests/__init__.py"  # the sdist has none; the tests import tests.testing_common
fi
if [ ! -d extra ]; then
  "$py" -m pip install -q --target extra parameterized pytest-xdist datasets diffusers
  # keep the environment's own versions of everything it already has (torch, transformers, numpy, ...)
  "$py" - <<'PY'
import importlib.metadata as md, pathlib, re, shutil
extra = pathlib.Path("extra")
for info in extra.glob("*.dist-info"):
    name = re.sub(r"-[^-]+$", "", info.name[:-len(".dist-info")])
    try:
        md.distribution(name)
    except md.PackageNotFoundError:
        continue
    for line in (info / "RECORD").read_text().splitlines():
        path = extra / line.split(",")[0]
        if extra.resolve() in path.resolve().parents and path.is_file():
            path.unlink()
    shutil.rmtree(info, ignore_errors=True)
PY
fi
export PYTHONPATH="$work/extra:$work/peft-$version:$here" HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
run() {  # name, FL_WRAP
  FL_WRAP=$2 FL_LOG="$work/fl_models" "$py" -m pytest "peft-$version/tests/test_custom_models.py" -k "Lora or lora" \
    -p from_peft_plugin -n 2 -q -p no:cacheprovider --junitxml="$work/$1.xml" > "$work/$1.log" 2>&1 || true
  tail -n 1 "$work/$1.log"
}
rm -f "$work"/fl_models.*.jsonl
run plain ""
run wrapped 1
"$py" "$here/summarize.py" outcomes "$work/plain.xml" "$work/wrapped.xml"
"$py" "$here/summarize.py" models "$work/fl_models"
