"""Checks a GitLab CI/CD template that has a `spec:` header (two YAML documents).

GitLab's CI schema (the copy check-jsonschema vendors as `vendor.gitlab-ci`)
describes one document at a time, and the `$[[ inputs.NAME ]]` placeholders of
the second document are only meaningful after GitLab interpolates them. So:
both documents must parse; every placeholder must name an input the header
declares (GitLab refuses the include otherwise); the placeholders are replaced
by each input's default (or a stand-in for a required input) as GitLab would;
then both documents are written as JSON for check-jsonschema to validate, and
each job's before_script, script and after_script as one bash file for
shellcheck (GitLab runs them in one shell on the images these templates use).

usage: python gitlab_check.py TEMPLATE OUTDIR   (prints the files written, one a line)
"""

import json
import re
import sys
from pathlib import Path

from ruamel.yaml import YAML

PLACEHOLDER = re.compile(r"\$\[\[\s*inputs\.([A-Za-z0-9_-]+)\s*\]\]")


def fail(message):
    print(f"gitlab_check: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        fail("usage: gitlab_check.py TEMPLATE OUTDIR")
    template, outdir = Path(sys.argv[1]), Path(sys.argv[2])
    text = template.read_text(encoding="utf-8")
    parts = re.split(r"^---[ \t]*$", text, flags=re.MULTILINE)
    if len(parts) != 2:
        fail(f"{template}: expected a spec: header, a --- line and the configuration ({len(parts)} documents)")
    yaml = YAML(typ="safe", pure=True)
    try:
        header = yaml.load(parts[0])
    except Exception as e:  # ruamel's errors have no common base worth naming
        fail(f"{template}: the spec: header does not parse: {e}")
    if not isinstance(header, dict) or not isinstance(header.get("spec"), dict):
        fail(f"{template}: the first document is not a spec: header")
    inputs = header["spec"].get("inputs") or {}
    if not isinstance(inputs, dict):
        fail(f"{template}: spec.inputs is not a mapping")

    def value_of(name):
        spec = inputs[name] or {}
        if "default" in spec:
            value = spec["default"]
        else:
            value = {"boolean": True, "number": 1, "array": []}.get(spec.get("type", "string"), f"required-{name}")
        return json.dumps(value) if isinstance(value, (bool, list)) else str(value)

    unknown = sorted({m.group(1) for m in PLACEHOLDER.finditer(parts[1]) if m.group(1) not in inputs})
    if unknown:
        fail(f"{template}: placeholders name undeclared inputs: {', '.join(unknown)}")
    unused = sorted(set(inputs) - {m.group(1) for m in PLACEHOLDER.finditer(parts[1])})
    if unused:
        fail(f"{template}: declared inputs never used: {', '.join(unused)}")
    interpolated = PLACEHOLDER.sub(lambda m: value_of(m.group(1)), parts[1])
    try:
        config = yaml.load(interpolated)
    except Exception as e:
        fail(f"{template}: the configuration does not parse once interpolated: {e}")
    if not isinstance(config, dict) or not config:
        fail(f"{template}: the configuration is empty or not a mapping")

    outdir.mkdir(parents=True, exist_ok=True)
    for name, doc in (("header", header), ("config", config)):
        path = outdir / f"{template.stem}.{name}.json"
        path.write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
        print(path)
    for job, spec in config.items():
        if not isinstance(spec, dict) or job.startswith("."):
            continue
        lines = []
        for key in ("before_script", "script", "after_script"):
            part = spec.get(key, [])
            lines += [part] if isinstance(part, str) else [str(line) for line in part]
        if lines:
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", job)
            path = outdir / f"{template.stem}.{safe}.sh"
            path.write_text("#!/usr/bin/env bash\n" + "\n".join(lines) + "\n", encoding="utf-8")
            print(path)


if __name__ == "__main__":
    main()
