"""pytest plugin (``-p from_peft_plugin``) for PEFT's own test suite: with FL_WRAP=1, every
``peft.get_peft_model`` / ``PeftModel.from_pretrained`` result goes through
``fused_lora.from_peft(model)`` (strict=False) before it is returned, and one JSON line per built
model (fused and kept module counts, the reasons, the "none fused" warning, any exception) is
appended to ``$FL_LOG.<xdist worker>.jsonl`` (default ``./fl_models``). With FL_COUNT=1 as well,
the fused calls and PEFT fallbacks (by reason) of the converted modules are counted into
``$FL_LOG.<worker>.calls.json``. See docs/testing.md ("PEFT's own tests through from_peft")."""

import functools
import json
import os
import re
import sys
import time
import traceback
import warnings

ENABLED = os.environ.get("FL_WRAP") == "1"
_LOG = None


def _log_path():
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    base = os.environ.get("FL_LOG", "fl_models")
    return f"{base}.{worker}.jsonl"


def _record(entry):
    global _LOG
    if _LOG is None:
        _LOG = open(_log_path(), "a", buffering=1)
    _LOG.write(json.dumps(entry) + "\n")


def _convert(model, via):
    from peft.tuners.lora import LoraLayer

    entry = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0], "via": via,
             "model_type": type(model).__name__}
    lora_modules = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)] if hasattr(model, "named_modules") else []
    entry["lora_layers"] = len(lora_modules)
    if not lora_modules:
        entry["status"] = "no_lora_layer"  # not a LoRA model (another tuner): from_peft not called
        _record(entry)
        return model
    import fused_lora
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fused_lora.from_peft(model)
        except Exception as error:  # recorded, not raised: the model is returned as PEFT built it
            entry["status"] = "from_peft_exception"
            entry["exception"] = f"{type(error).__name__}: {error}"[:2000]
            entry["traceback"] = traceback.format_exc()[-3000:]
    fl_warnings = [w for w in caught if "from_peft" in str(w.message)]
    entry["warned_none_fused"] = any("no module could be fused" in str(w.message) for w in fl_warnings)
    # re-emit everything caught, so the tests see the warnings as they would have
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    summary = getattr(model, "fused_lora_summary", None)
    if "status" not in entry:
        if summary is None:
            entry["status"] = "no_summary"
        else:
            entry["status"] = "ok"
            entry["fused"] = len(summary.fused)
            entry["not_fused"] = {reason: len(names) for reason, names in summary.not_fused.items()}
    _record(entry)
    return model


def _wrap_get_peft_model(original):
    @functools.wraps(original)
    def get_peft_model(*args, **kwargs):
        return _convert(original(*args, **kwargs), "get_peft_model")
    get_peft_model._fl_wrapped = True
    return get_peft_model


def _install():
    import peft
    import peft.mapping_func
    from peft import PeftModel

    original = peft.mapping_func.get_peft_model
    wrapped = _wrap_get_peft_model(original)
    # every already-imported module that holds the function by name (peft, peft.mapping_func, the tests)
    for name, module in list(sys.modules.items()):
        try:
            if getattr(module, "get_peft_model", None) is original:
                setattr(module, "get_peft_model", wrapped)
        except Exception:
            pass

    original_fp = PeftModel.__dict__["from_pretrained"].__func__

    @functools.wraps(original_fp)
    def from_pretrained(cls, *args, **kwargs):
        return _convert(original_fp(cls, *args, **kwargs), "from_pretrained")

    PeftModel.from_pretrained = classmethod(from_pretrained)
    # subclasses that define their own from_pretrained (none expected) are reported, not wrapped
    overriding = [c.__name__ for c in _subclasses(PeftModel) if "from_pretrained" in c.__dict__]
    if overriding:
        sys.stderr.write(f"fl_wrap_plugin: subclasses overriding from_pretrained (not wrapped): {overriding}\n")


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def pytest_collection_finish(session):
    # after collection, so the test modules (which import get_peft_model by name) are in sys.modules
    if ENABLED:
        _install()
        sys.stderr.write(f"fl_wrap_plugin: wrapping active, log {_log_path()}\n")


# FL_COUNT=1 (with FL_WRAP=1): count, per forward call of a converted module, the fused path vs PEFT's fallback
# (and the fallback reasons); written at session end to $FL_LOG.<worker>.calls.json
COUNT = os.environ.get("FL_COUNT") == "1"
_CALLS = {"fused": 0, "fallback_args_kwargs": 0, "fallback": {}}


def _install_counter():
    import fused_lora.integrations.peft as flp
    original = flp.fused_adapter

    def counting_fused_adapter(module, x=None):
        adapter, reason = original(module, x)
        if x is not None:
            if adapter is not None:
                _CALLS["fused"] += 1
            else:
                key = re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", reason))
                _CALLS["fallback"][key] = _CALLS["fallback"].get(key, 0) + 1
        return adapter, reason

    flp.fused_adapter = counting_fused_adapter


def pytest_sessionstart(session):
    if ENABLED and COUNT:
        _install_counter()


def pytest_sessionfinish(session):
    if ENABLED and COUNT:
        with open(_log_path().replace(".jsonl", ".calls.json"), "w") as f:
            json.dump(_CALLS, f, indent=1)
