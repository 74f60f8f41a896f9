#!/usr/bin/env python3
"""Offline checks of what deploy/ ships.

  validate-manifests.py manifests [--kube-version V] [--crd FILE ...] [FILE ...]
      Validates every document of the rendered manifests (default: deploy/rendered/*.yaml).
      Built-in kinds are checked with kubernetes_validate (strict: unknown fields are errors);
      custom resources against the openAPIV3Schema of a CustomResourceDefinition (default: the
      CRDs in deploy/testdata/), made strict the same way. A custom resource whose CRD is not
      given is an error. Prints one line per document.

  validate-manifests.py dashboards --metrics FILE [--metrics FILE ...] DASHBOARD.json ...
      Checks Grafana dashboards: the `datasource` variable exists, no datasource is hard-coded,
      panel ids are unique, and every metric name in every PromQL expression (panel targets,
      templating queries) is in the union of the metric-name files. A metric-name file is either
      a Prometheus/OpenMetrics text exposition (a /metrics page) or a list of one name per line
      (lines starting with # are comments).

Needs PyYAML, jsonschema and kubernetes-validate (pip install kubernetes-validate jsonschema
pyyaml). Exits 0 when everything passed, 1 when a check failed, 2 on a usage error.
"""

import argparse
import copy
import glob
import importlib.util
import json
import os
import re
import sys

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def rel(path):
    """A path relative to the repository root when it is inside it, for shorter messages."""
    p = os.path.abspath(path)
    return os.path.relpath(p, ROOT) if p.startswith(ROOT + os.sep) else path


# ----------------------------------------------------------------------------------------------
# manifests


def load_documents(path):
    """The non-empty YAML documents of a multi-document file, with their 1-based index."""
    import yaml

    with open(path, encoding="utf-8") as f:
        text = f.read()
    docs = []
    for i, doc in enumerate(yaml.safe_load_all(text), start=1):
        if doc is None:
            continue
        docs.append((i, doc))
    return docs


def strict_schema(schema):
    """A copy of a CRD's structural schema that rejects unknown fields and accepts `nullable`.

    The API server prunes (or, with strict field validation, rejects) fields a structural schema
    does not declare; JSON Schema allows them unless `additionalProperties` is false, so every
    object that declares `properties` and does not preserve unknown fields gets it.
    """
    s = copy.deepcopy(schema)

    def visit(node):
        if isinstance(node, dict):
            if node.get("nullable") is True and isinstance(node.get("type"), str):
                node["type"] = [node["type"], "null"]
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(s)
    return s


def load_crds(paths):
    """{(group, version, kind): (schema, source)} from the CRDs in the given files."""
    crds = {}
    for path in paths:
        for _, doc in load_documents(path):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc.get("spec") or {}
            group = spec.get("group")
            kind = (spec.get("names") or {}).get("kind")
            for v in spec.get("versions") or []:
                schema = (v.get("schema") or {}).get("openAPIV3Schema")
                if group and kind and schema and v.get("served", True):
                    crds[(group, v["name"], kind)] = (strict_schema(schema), rel(path))
    return crds


def describe(doc):
    meta = doc.get("metadata") or {}
    name = meta.get("name", "<no name>")
    ns = meta.get("namespace")
    return f"{doc.get('apiVersion', '?')} {doc.get('kind', '?')} {ns + '/' if ns else ''}{name}"


def error_path(err):
    path = ".".join(str(p) for p in err.absolute_path)
    return path or "(root)"


def validate_builtin(doc, kube_version):
    """None when valid, else the reason. Raises LookupError when no schema exists for the kind."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        raise LookupError(e.message)
    except kubernetes_validate.ValidationError as e:
        return f"{error_path(e)}: {e.message}"
    return None


def validate_custom(doc, schema):
    import jsonschema

    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    return "; ".join(f"{error_path(e)}: {e.message}" for e in errors[:5]) + (
        f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    )


def cmd_manifests(args):
    missing = [m for m in ("jsonschema", "kubernetes_validate", "yaml") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: missing Python modules {', '.join(missing)}; "
              "pip install kubernetes-validate jsonschema pyyaml", file=sys.stderr)
        return 2
    import kubernetes_validate
    import kubernetes_validate.utils

    files = args.files or sorted(glob.glob(os.path.join(ROOT, "deploy", "rendered", "*.yaml")))
    if not files:
        print("error: no manifests to validate (deploy/rendered/*.yaml is empty)", file=sys.stderr)
        return 2
    crd_files = args.crd or sorted(glob.glob(os.path.join(ROOT, "deploy", "testdata", "*.yaml")))
    crds = load_crds(crd_files)
    # Fail early, and once, on a Kubernetes version the installed kubernetes-validate lacks.
    try:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
                                     args.kube_version, strict=True)
    except kubernetes_validate.utils.VersionNotSupportedError:
        print(f"error: kubernetes-validate does not support Kubernetes {args.kube_version}", file=sys.stderr)
        return 2

    failed = 0
    total = 0
    for path in files:
        seen = {}
        try:
            docs = load_documents(path)
        except Exception as e:  # a YAML error names its own position
            reason = " ".join(str(e).split())
            print(f"FAIL {rel(path)}: not valid YAML: {reason}")
            total += 1
            failed += 1
            continue
        if not docs:
            print(f"FAIL {rel(path)}: no documents")
            total += 1
            failed += 1
            continue
        for index, doc in docs:
            total += 1
            where = f"{rel(path)}#{index}"
            if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
                print(f"FAIL {where}: not a Kubernetes object (apiVersion and kind are required)")
                failed += 1
                continue
            what = describe(doc)
            meta = doc.get("metadata") or {}
            key = (doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "", doc["kind"],
                   meta.get("namespace"), meta.get("name"))
            if key in seen:
                print(f"FAIL {where} {what}: duplicate of document #{seen[key]}")
                failed += 1
                continue
            seen[key] = index
            api = doc["apiVersion"]
            group, _, version = api.rpartition("/")
            crd = crds.get((group, version, doc["kind"]))
            try:
                if crd is not None:
                    schema, source = crd
                    reason = validate_custom(doc, schema)
                    against = f"CRD {source}"
                else:
                    reason = validate_builtin(doc, args.kube_version)
                    against = f"Kubernetes {args.kube_version} (strict)"
            except LookupError:
                kind = "custom resource" if "." in group else "kind"
                print(f"FAIL {where} {what}: no schema for this {kind} "
                      f"(not a Kubernetes {args.kube_version} kind, and no CRD given for it)")
                failed += 1
                continue
            if reason:
                print(f"FAIL {where} {what}: {reason}")
                failed += 1
            else:
                print(f"ok   {where} {what}: valid against {against}")
    print(f"{total - failed} passed, {failed} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# metric names

NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names_from_file(path):
    """Metric names from an exposition (the names of its sample lines, plus the series each
    `# TYPE` line declares) or from a plain list of names."""
    with open(path, encoding="utf-8") as f:
        lines = [raw.strip() for raw in f]
    # OpenMetrics ends with `# EOF` and names families without the _total of their counters.
    openmetrics = "# EOF" in lines
    names = set()
    for line in lines:
        if not line:
            continue
        if line.startswith("#"):
            # `# TYPE name type`: a family without samples yet (a counter nothing incremented, a
            # labelled family with no label values yet) is still exported. Plain lists have no
            # such lines: there every line starting with # is a comment.
            parts = line.split()
            if len(parts) >= 4 and parts[1] == "TYPE" and NAME_RE.fullmatch(parts[2]):
                names.update(series_of_family(parts[2], parts[3], openmetrics))
            continue
        m = NAME_RE.match(line)
        if m and (m.end() == len(line) or line[m.end()] in " \t{"):
            names.add(m.group(0))
    return names


def series_of_family(name, typ, openmetrics):
    """The sample names a metric family of a type has, in OpenMetrics or in the text format."""
    typ = typ.lower()
    created = {name + "_created"} if openmetrics else set()
    if typ == "counter":
        return ({name + "_total"} | created) if openmetrics else {name}
    if typ == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"} | created
    if typ == "gaugehistogram":
        return {name + "_bucket", name + "_gsum", name + "_gcount"}
    if typ == "summary":
        return {name, name + "_sum", name + "_count"} | created
    if typ == "info":
        return {name + "_info"} if openmetrics else {name}
    return {name}


# ----------------------------------------------------------------------------------------------
# PromQL: the metric names an expression reads

PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "avg_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh",
    "count_over_time", "day_of_month", "day_of_week", "day_of_year", "days_in_month", "deg",
    "delta", "deriv", "double_exponential_smoothing", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta", "increase", "info",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi",
    "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc",
    "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh",
    "time", "timestamp", "vector", "year", "start", "end",
}
PROMQL_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "limitk", "limit_ratio",
}
# Binary operators and modifiers spelled as words.
PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "offset", "bool"}
# Keywords whose parenthesised list holds label names, not metrics.
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_LITERALS = {"inf", "nan"}

TOKEN_RE = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]*\]\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[a-zA-Z0-9_]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<open>[({\[])
  | (?P<close>[)}\]])
  | (?P<other>==|!=|>=|<=|=~|!~|[-+*/%^<>=,@!~:])
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    pass


def tokenize(expr):
    """(kind, text) tokens; strings, comments and Grafana variables are dropped."""
    tokens = []
    pos = 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        if not m:
            raise PromQLError(f"unexpected character {expr[pos]!r} at offset {pos}")
        kind = m.lastgroup
        if kind not in ("space", "comment", "string", "var"):
            tokens.append((kind, m.group(0)))
        pos = m.end()
    return tokens


def metric_names_in_promql(expr):
    """The metric names an expression selects: identifiers left after removing label matchers,
    ranges and subqueries, grouping label lists, functions, aggregations, keywords and numbers."""
    tokens = tokenize(expr)
    names = []
    stack = []  # open brackets
    skip_until = None  # depth at which a dropped `{...}`, `[...]` or label list ends
    i = 0
    pending_label_list = False
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "open":
            stack.append(text)
            if skip_until is None and (text in "{[" or pending_label_list):
                skip_until = len(stack)
            pending_label_list = False
        elif kind == "close":
            if not stack or {"(": ")", "{": "}", "[": "]"}[stack[-1]] != text:
                raise PromQLError(f"unbalanced {text!r}")
            if skip_until == len(stack):
                skip_until = None
            stack.pop()
        elif skip_until is not None:
            pass
        elif kind == "ident":
            low = text.lower()
            if low in LABEL_LIST_KEYWORDS:
                # by (...) / without (...) / on (...) / group_left (...): label names follow.
                pending_label_list = nxt == ("open", "(")
            elif low in PROMQL_KEYWORDS or low in PROMQL_LITERALS:
                pass
            elif text in PROMQL_AGGREGATIONS and (nxt == ("open", "(") or (nxt[1] or "").lower() in ("by", "without")):
                pass
            elif text in PROMQL_FUNCTIONS and nxt == ("open", "("):
                pass
            else:
                names.append(text)
        i += 1
    if stack:
        raise PromQLError(f"unclosed {stack[-1]!r}")
    return names


def split_top_level(s):
    """Splits at commas outside brackets and strings."""
    parts, depth, cur, quote = [], 0, [], None
    i = 0
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
            cur.append(c)
        elif c in "([{":
            depth += 1
            cur.append(c)
        elif c in ")]}":
            depth -= 1
            cur.append(c)
        elif c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def metric_names_in_variable_query(query):
    """Metric names read by a Grafana Prometheus variable query."""
    q = query.strip()
    m = re.fullmatch(r"(\w+)\s*\((.*)\)", q, re.S)
    if m and m.group(1) in ("label_values", "label_names", "query_result", "metrics"):
        fn, inner = m.group(1), m.group(2)
        if fn == "metrics":  # metrics(regex): a regex over names, no metric read
            return []
        if fn == "query_result":
            return metric_names_in_promql(inner)
        args = split_top_level(inner) if inner.strip() else []
        if fn == "label_values":
            # label_values(label) or label_values(series_selector, label)
            return metric_names_in_promql(args[0]) if len(args) >= 2 else []
        return metric_names_in_promql(args[0]) if args else []  # label_names([selector])
    return metric_names_in_promql(q)


# ----------------------------------------------------------------------------------------------
# dashboards

DATASOURCE_REFS = {"${datasource}", "$datasource"}


def walk(node, path="$"):
    """(path, key, value) for every key of every object in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{path}.{k}"
            yield path, k, v
            yield from walk(v, p)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def all_panels(panels):
    for p in panels or []:
        yield p
        yield from all_panels(p.get("panels"))


def check_dashboard(path, known):
    """A list of problems of one dashboard file."""
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        return [f"cannot read: {e}"]
    if not isinstance(dash, dict):
        return ["not a dashboard object"]
    if not dash.get("uid"):
        problems.append("no uid")
    if not dash.get("title"):
        problems.append("no title")

    variables = (dash.get("templating") or {}).get("list") or []
    ds_var = [v for v in variables if v.get("name") == "datasource"]
    if not ds_var:
        problems.append("no `datasource` templating variable")
    elif ds_var[0].get("type") != "datasource" or ds_var[0].get("query") != "prometheus":
        problems.append("the `datasource` variable must be of type datasource with query prometheus")

    for where, key, value in walk(dash):
        if key != "datasource":
            continue
        if isinstance(value, dict):
            uid = value.get("uid")
            if uid not in DATASOURCE_REFS:
                problems.append(f"{where}.datasource: hard-coded datasource uid {uid!r} (use ${{datasource}})")
        elif isinstance(value, str):
            if value not in DATASOURCE_REFS:
                problems.append(f"{where}.datasource: hard-coded datasource {value!r} (use ${{datasource}})")
        elif value is not None:
            problems.append(f"{where}.datasource: unexpected value {value!r}")

    ids = {}
    for p in all_panels(dash.get("panels")):
        pid = p.get("id")
        title = p.get("title", "")
        if pid is None:
            problems.append(f"panel {title!r} has no id")
        elif pid in ids:
            problems.append(f"panel id {pid} used by {ids[pid]!r} and {title!r}")
        else:
            ids[pid] = title
        if p.get("type") != "row" and p.get("targets") and not isinstance(p.get("datasource"), dict):
            problems.append(f"panel {title!r} has no datasource object")

    def check_names(label, names):
        for n in names:
            if n not in known:
                problems.append(f"{label}: metric {n!r} is not in the metric lists")

    for p in all_panels(dash.get("panels")):
        for t in p.get("targets") or []:
            expr = t.get("expr")
            if expr is None:
                continue
            label = f"panel {p.get('id')} {p.get('title', '')!r} target {t.get('refId', '?')}"
            try:
                check_names(label, metric_names_in_promql(expr))
            except PromQLError as e:
                problems.append(f"{label}: cannot read the expression: {e}")
    for v in variables:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if not isinstance(q, str) or not q.strip():
            problems.append(f"variable {v.get('name')!r}: no query")
            continue
        label = f"variable {v.get('name')!r}"
        try:
            check_names(label, metric_names_in_variable_query(q))
        except PromQLError as e:
            problems.append(f"{label}: cannot read the query: {e}")
    # Expressions outside panels (annotations) count too.
    for where, key, value in walk(dash.get("annotations") or {}, "$.annotations"):
        if key == "expr" and isinstance(value, str):
            try:
                check_names(where, metric_names_in_promql(value))
            except PromQLError as e:
                problems.append(f"{where}: cannot read the expression: {e}")
    return problems


def cmd_dashboards(args):
    known = set()
    for path in args.metrics:
        try:
            names = metric_names_from_file(path)
        except OSError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not names:
            print(f"error: {path}: no metric names in it", file=sys.stderr)
            return 2
        known |= names
    failed = 0
    for path in args.dashboards:
        problems = check_dashboard(path, known)
        if problems:
            failed += 1
            print(f"FAIL {rel(path)}")
            for p in problems:
                print(f"     {p}")
        else:
            print(f"ok   {rel(path)}")
    print(f"{len(args.dashboards) - failed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("manifests", help="validate rendered manifests")
    m.add_argument("--kube-version", default="1.33.0", help="Kubernetes version of the schemas (default 1.33.0)")
    m.add_argument("--crd", action="append", default=[],
                   help="a file with CustomResourceDefinitions (repeatable; default deploy/testdata/*.yaml)")
    m.add_argument("files", nargs="*", help="multi-document YAML files (default deploy/rendered/*.yaml)")
    d = sub.add_parser("dashboards", help="check Grafana dashboards")
    d.add_argument("--metrics", action="append", required=True,
                   help="a metric-name file: a /metrics exposition or one name per line (repeatable)")
    d.add_argument("dashboards", nargs="+", help="dashboard JSON files")
    args = ap.parse_args(argv)
    if args.command == "manifests":
        return cmd_manifests(args)
    return cmd_dashboards(args)


if __name__ == "__main__":
    sys.exit(main())
