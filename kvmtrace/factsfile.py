"""The --dump-facts file's schema: what each field of kvmtrace.facts.HostFacts' JSON form
must be, checked before a file's facts are trusted (doctor --facts, the tests' kernels).
Pure."""

from __future__ import annotations


def _str(v) -> bool:
    return isinstance(v, str)


def _opt(check):
    return lambda v: v is None or check(v)


def _list_of(check):
    return lambda v: isinstance(v, list) and all(map(check, v))


def _dict_of(check):
    return lambda v: isinstance(v, dict) and all(map(_str, v)) and all(map(check, v.values()))


def _record(**fields):
    """A JSON object whose keys are among ``fields`` (each checked)."""
    return lambda v: (isinstance(v, dict) and set(v) <= set(fields)
                      and all(fields[k](x) for k, x in v.items()))


def _bool(v) -> bool:
    return isinstance(v, bool)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


FIELD_KINDS = {
    "kernel_release": "a string", "arch": "a string", "kprobes_detail": "a string",
    "symbols": "an object of {name, module}", "clones": "an object of string lists",
    "traceable": "a list of strings or null", "kprobe_blacklist": "a list of strings",
    "tracepoints": "a list of strings", "vendor_modules": "a list of strings",
    "kprobes": "true or false", "btf": "true or false", "ringbuf": "true or false",
    "task_storage": "true or false", "is_root": "true or false",
    "fentry": "a string or null", "tracefs": "a string or null",
    "tracefs_error": "a string or null", "bcc_version": "a string or null",
    "headers": "an object of {path, release, error}",
    "kvm": "an object of {present, api_version, vm_types_mask, error}",
    "stderr_offsets": "an object of integers or null", "stderr_offsets_error": "a string or null",
}
FIELD_CHECKS = {
    "kernel_release": _str, "arch": _str, "kprobes_detail": _str,
    "symbols": _dict_of(_record(name=_str, module=_opt(_str))),
    "clones": _dict_of(_list_of(_str)), "traceable": _opt(_list_of(_str)),
    "kprobe_blacklist": _list_of(_str), "tracepoints": _list_of(_str),
    "vendor_modules": _list_of(_str),
    "kprobes": _bool, "btf": _bool, "ringbuf": _bool, "task_storage": _bool,
    "is_root": _bool,
    "fentry": _opt(_str), "tracefs": _opt(_str), "tracefs_error": _opt(_str),
    "bcc_version": _opt(_str),
    "headers": _record(path=_opt(_str), release=_opt(_str), error=_opt(_str)),
    "kvm": _record(present=_bool, api_version=_opt(_int), vm_types_mask=_opt(_int),
                   error=_opt(_str)),
    "stderr_offsets": _opt(_dict_of(_int)), "stderr_offsets_error": _opt(_str),
}


def check(data) -> None:
    """ValueError naming the first field of ``data`` that is not what --dump-facts writes
    (fields it does not know are left to the dataclass: TypeError there)."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for name, value in data.items():
        ok = FIELD_CHECKS.get(name)
        if ok is not None and not ok(value):
            raise ValueError(f"field {name!r} is not {FIELD_KINDS[name]}: {value!r:.60}")
