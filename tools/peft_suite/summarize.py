"""Summarise a plain and a wrapped run of PEFT's tests (tools/peft_suite/run.sh).

python summarize.py outcomes BASE.xml WRAPPED.xml   the two runs' outcomes and every test that differs
python summarize.py models [FL_LOG]                 what from_peft did to the models the tests built
"""
import json, glob, collections, sys
import xml.etree.ElementTree as ET

def outcomes(path):
    res = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        tid = f"{tc.get('classname')}::{tc.get('name')}"
        kind, msg = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                kind, msg = child.tag, (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                kind, msg = "skipped", child.get("message") or ""
        res[tid] = (kind, msg)
    return res

if len(sys.argv) > 1 and sys.argv[1] == "outcomes":
    base, wrap = outcomes(sys.argv[2]), outcomes(sys.argv[3])
    for name, r in (("base", base), ("wrap", wrap)):
        print(name, len(r), collections.Counter(k for k, _ in r.values()))
    diff = [t for t in sorted(set(base) | set(wrap)) if base.get(t, ("missing",))[0] != wrap.get(t, ("missing",))[0]]
    print("differing:", len(diff))
    for t in diff:
        print("==", t, base.get(t, ("missing",))[0], "->", wrap.get(t, ("missing",))[0])
        print("   ", "\n    ".join((wrap.get(t) or base.get(t))[1].splitlines()[:6]))
    fails = collections.Counter(m.splitlines()[0][:150] for k, m in base.values() if k in ("failure", "error"))
    print("base failures by message:", fails.most_common(10))
    sys.exit()

log = sys.argv[2] if len(sys.argv) > 2 else "fl_models"
entries = [json.loads(l) for f in sorted(glob.glob(f"{log}.*.jsonl")) for l in open(f)]
st = collections.Counter(e["status"] for e in entries)
print("calls recorded:", len(entries), dict(st), "via:", dict(collections.Counter(e["via"] for e in entries)))
lora = [e for e in entries if e["status"] != "no_lora_layer"]
ok = [e for e in lora if e["status"] == "ok"]
some = [e for e in ok if e["fused"] > 0]
none = [e for e in ok if e["fused"] == 0]
mixed = [e for e in some if e["not_fused"]]
print(f"LoRA models built: {len(lora)}; >=1 fused: {len(some)} (of which also some kept: {len(mixed)}); none fused: {len(none)}"
      f" (warned: {sum(e['warned_none_fused'] for e in none)}); warned while some fused: {sum(e['warned_none_fused'] for e in some)}")
print("modules fused:", sum(e["fused"] for e in ok), "kept:", sum(sum(e["not_fused"].values()) for e in ok))
r_mod, r_models = collections.Counter(), collections.Counter()
for e in ok:
    for reason, n in e["not_fused"].items():
        r_mod[reason] += n; r_models[reason] += 1
print("reasons (modules, models):")
for reason, n in r_mod.most_common():
    print(f"  {n:6d} {r_models[reason]:6d}  {reason}")
exc = [e for e in lora if e["status"] != "ok"]
print("from_peft exceptions / no summary:", len(exc))
for m, n in collections.Counter(e.get("exception", e["status"])[:200] for e in exc).most_common():
    print(f"  {n}  {m}")
print("model types:", collections.Counter(e["model_type"] for e in lora).most_common())
print("distinct tests building LoRA models:", len({e['test'] for e in lora}))
