#!/usr/bin/env python3
"""Structure check for src/: python3 standard library only, never runs cargo.

`scripts/check-structure.py` prints every violation as `path:line: message` and exits 1 if
there is any; `--self-test` runs the rules on inline snippets. No file list is hard-coded:
the module tree is read from src/ on every run.

Module model: src/lib.rs is the crate root, src/a/b.rs or src/a/b/mod.rs is module `a::b`;
src/main.rs (src/bin/x.rs) is a binary, a node of its own (`main`) that may import anything.
Comments (//, ///, //!, nested /* */) and string/char literals ("..", r#".."#, b"..", 'x')
are blanked before any rule reads the code, so text in docs and messages never counts.

1. Import cycles. X depends on Y when X names a path `crate::Y..` or `$crate::Y..`, or a
   `super::..`/`self::..` path resolved from X (and from inline `mod x { }` blocks), in a
   `use` tree (braces expanded, `pub use` too) or anywhere in code; a binary through
   `<crate_name>::Y..`. A path maps to the deepest existing module it names. Edges to the
   module itself, to its ancestors (using a parent's re-exports) and to its descendants are
   dropped. Every other edge is lifted to the two sibling subtrees it joins (the children of
   the common ancestor that hold X and Y), and each strongly connected component of more
   than one sibling is reported with a cycle and one `path:line` per hop. That finds module
   cycles (`execution::launcher <-> execution::runner`) and the ones a parent's re-exports
   would hide (`x::engine -> y -> x`, where `x` merely re-exports `x::limits`).
2. String errors: `Result<T, String>` (T may nest generics: brackets are parsed), and
   `Err(format!(..))` used as is (not followed by `?` or `.`, which convert the String).
3. API error codes: a string literal exactly equal to a code anywhere but the file that
   defines `enum ErrorCode` (src/api/errors.rs while none does). Literals in `#[oai(..)]` and
   `#[serde(..)]` attributes, and byte strings (b".."), do not count.
"""
import pathlib
import re
import sys

CODES = {"bad_request", "payload_too_large", "request_timeout", "unknown_runtime",
         "version_mismatch", "runtime_unavailable", "limit_exceeded", "invalid_request",
         "busy", "not_found", "method_not_allowed", "unauthorized", "internal_error"}
ERRORS_FILE = "src/api/errors.rs"
STRING_ERRORS = ("String", "std::string::String", "alloc::string::String")
STRING_START = re.compile(r"(b|c)?(r(#*))?\"")


def lex(text):
    """(text with comments and literals blanked, [(kind, value, offset)] of its strings)."""
    out, lits, i, n = list(text), [], 0, len(text)
    while i < n:
        prev = text[i - 1] if i else " "
        m = None if prev.isalnum() or prev == "_" else STRING_START.match(text, i)
        if text.startswith("//", i):
            j = text.find("\n", i) % (n + 1)
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                step = text.startswith(("/*", "*/"), j)
                depth += text.startswith("/*", j) - text.startswith("*/", j)
                j += 2 if step else 1
        elif m:
            if m.group(2) is not None:  # raw string: no escapes, ends at `"` + the same #s
                end = text.find('"' + m.group(3), m.end()) % (n + 1)
                j = min(n, end + 1 + len(m.group(3)))
            else:
                end = m.end()
                while end < n and text[end] != '"':
                    end += 2 if text[end] == "\\" else 1
                j = end + 1
            lits.append(("bytes" if m.group(1) == "b" else "str", text[m.end():end], i))
        elif text[i] == "'" and (text[i + 1:i + 2] == "\\" or text[i + 2:i + 3] == "'"):
            j = (text.find("'", i + 3 if text[i + 1] == "\\" else i + 2) + 1) or n
        else:  # code, or a lifetime's quote
            i += 1
            continue
        out[i:j] = [c if c == "\n" else " " for c in text[i:j]]
        i = j
    return "".join(out), lits


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def match_close(code, i, opening="([{", closing=")]}"):
    """Offset just past the bracket that closes the one at code[i] (len(code) if none)."""
    depth = 0
    for j in range(i, len(code)):
        depth += (code[j] in opening) - (code[j] in closing and code[j - 1] not in "-=")
        if depth == 0:
            return j + 1
    return len(code)


def split_top(text):
    """Split at the commas outside brackets (the `>` of `->` and `=>` is not a bracket)."""
    text, parts, depth, start = text.replace("->", "  ").replace("=>", "  ") + ",", [], 0, 0
    for k, ch in enumerate(text):
        depth += (ch in "([{<") - (ch in ")]}>")
        if ch == "," and depth == 0:
            parts, start = parts + [text[start:k].strip()], k + 1
    return [part for part in parts if part]


def module_of(rel):
    parts = rel[len("src/"):-len(".rs")].split("/")
    if parts == ["main"] or parts[0] == "bin":  # binaries
        return "main" if parts == ["main"] else "bin::" + parts[1]
    return "" if parts == ["lib"] else "::".join(parts[:-1] if parts[-1] == "mod" else parts)


def expand_use(tree, prefix=()):
    """`a::{b as c, d::{self, e}}` -> [[a, b], [a, d, self], [a, d, e]]."""
    head, _, rest = tree.partition("{")
    segs = list(prefix) + [s.split()[0] for s in head.split("::") if s.strip()]
    if not rest:
        return [segs]
    return [p for part in split_top(rest[:rest.rfind("}")]) for p in expand_use(part, segs)]


def paths_in(code, roots):
    """(offset, segments) of every path in blanked code that starts with one of roots."""
    uses = [(m.span(), m.start(1), m.group(1).lstrip(": \n"))
            for m in re.finditer(r"(?<![\w:])use\s+([^;]*);", code)]
    for _, off, tree in uses:
        for segs in expand_use(tree):
            if segs and segs[0] in roots:
                yield off, segs
    for m in re.finditer(r"(?<![\w:$])(\$?\w+)((?:\s*::\s*\w+)+)", code):
        if m.group(1) in roots and not any(a <= m.start() < b for (a, b), _, _ in uses):
            yield m.start(), [m.group(1)] + re.findall(r"\w+", m.group(2))


def resolve(segs, here, modules):
    """Deepest existing module named by path segs, written in module `here` (a list)."""
    path, segs = (list(here), segs) if segs[0] in ("self", "super") else ([], segs[1:])
    for s in segs:
        path = path[:-1] if s == "super" else path if s in ("self", "*") else path + [s]
    while path and "::".join(path) not in modules:
        path.pop()
    return path


def check_cycles(files, crate_name):
    modules = {module_of(rel) for rel in files}
    edges = {}  # (common ancestor, sibling holding X, sibling holding Y) -> [(X, Y, path, line)]
    for rel, (code, _) in sorted(files.items()):
        me = module_of(rel)
        binary, mine = me == "main" or me.startswith("bin::"), me.split("::") if me else []
        mods = [(m.start(), match_close(code, m.end() - 1), m.group(1))
                for m in re.finditer(r"\bmod\s+(?:r#)?(\w+)\s*\{", code)]
        roots = (crate_name,) if binary else ("crate", "$crate", "super", "self")
        for off, segs in paths_in(code, roots):
            here = mine + [name for start, end, name in mods if start <= off < end]
            a, b = [me] if binary else mine, resolve(segs, here, modules)
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            if k < len(a) and k < len(b):  # else: itself, an ancestor or a descendant
                edges.setdefault(("::".join(a[:k]), a[k], b[k]), []).append(
                    (me, "::".join(b), rel, line_of(code, off)))
    found = []
    for parent in sorted({p for p, _, _ in edges}):
        graph = {}
        for p, x, y in edges:
            if p == parent:
                graph.setdefault(x, set()).add(y)
        for scc, walk in cycles(graph):
            name = lambda sibling: f"{parent}::{sibling}" if parent else sibling
            hops, where = [edges[parent, x, y] for x, y in zip(walk, walk[1:])], []
            for sites in hops:
                more = f" (+{len(sites) - 1} more)" if len(sites) > 1 else ""
                where.append("{} -> {} at {}:{}".format(*sites[0]) + more)
            if len(scc) + 1 < len(walk):
                where.append("component: " + ", ".join(map(name, scc)))
            found.append((hops[0][0][2], hops[0][0][3], "import cycle "
                          + " -> ".join(map(name, walk)) + " [" + "; ".join(where) + "]"))
    return found


def bfs(graph, v):
    """{w: predecessor} for every w reachable from v."""
    prev, queue = {}, [v]
    for u in queue:
        for w in sorted(graph.get(u, ())):
            if w not in prev:
                prev[w] = u
                queue.append(w)
    return prev


def cycles(graph):
    """(members, shortest cycle through the first member) per SCC of more than one node."""
    reach, found, done = {v: bfs(graph, v) for v in graph}, [], set()
    for v in sorted(graph):
        if v in reach[v] and v not in done:
            scc = sorted(w for w in reach[v] if v in reach.get(w, {}))
            walk = [v, reach[v][v]]
            while walk[-1] != v:
                walk.append(reach[v][walk[-1]])
            found.append((scc, walk[::-1]))
            done |= set(scc)
    return found


def check_string_errors(files):
    found = []
    for rel, (code, _) in sorted(files.items()):
        for m in re.finditer(r"(?<!\w)Result\s*(?:::\s*)?<", code):
            end = match_close(code, m.end() - 1, "<([", ">)]")
            args = [re.sub(r"\s+", "", a) for a in split_top(code[m.end():end - 1])]
            if code[end - 1] == ">" and len(args) == 2 and args[1].lstrip(":") in STRING_ERRORS:
                found.append((rel, line_of(code, m.start()),
                              "Result with a String error; use a typed error"))
        for m in re.finditer(r"(?<!\w)Err\s*\(\s*format\s*!\s*(?=[(\[{])", code):
            rest = code[match_close(code, m.end()):].lstrip()
            if rest.startswith(")") and not rest[1:].lstrip().startswith(("?", ".")):
                found.append((rel, line_of(code, m.start()),
                              "Err(format!(..)) makes a String error; use a typed error"))
    return found


# Literals that spell a code but mean something else, with the reason.
NOT_CODES = {
    ("src/execution/report.rs", "internal_error"):
        "StageStatus::InternalError, a stage status that shares the API code's name",
}


def check_codes(files):
    owners = sorted(r for r, (code, _) in files.items() if re.search(r"\benum\s+ErrorCode\b", code))
    found = [(r, 1, f"a second `enum ErrorCode` (the first is in {owners[0]})") for r in owners[1:]]
    home = owners[0] if owners else ERRORS_FILE
    for rel, (code, lits) in sorted(files.items()):
        attrs = [(m.start(), match_close(code, m.end() - 1)) for m in
                 re.finditer(r"#\s*!?\s*\[(?=\s*(?:oai|serde)\b)", code)]
        for kind, value, off in lits:
            if (rel != home and kind == "str" and value in CODES
                    and (rel, value) not in NOT_CODES
                    and not any(a <= off < b for a, b in attrs)):
                found.append((rel, line_of(code, off),
                              f'error code "{value}" as a string literal; use ErrorCode ({home})'))
    return found


def check(sources, crate_name):
    """Every rule on {"src/...rs": text}; sorted [(path, line, message)]."""
    files = {rel: lex(text) for rel, text in sources.items()}
    found = check_cycles(files, crate_name) + check_string_errors(files) + check_codes(files)
    return sorted(found, key=lambda f: (f[0], f[1], f[2]))


SELF_TESTS = [  # (what, {file under src/: text}, expected [(path, line)])
    ("a <-> b, one edge in a (macro) fn body", {"lib": "", "a": "use crate::b::X;",
     "b": "fn f() {\n $crate::a::g(); }"}, [("src/a.rs", 1)]),
    ("x::p <-> x::q: super from an inline mod, nested use braces", {"lib": "", "x/mod": "",
     "x/p": "mod tests { use self::super::super::q::A; }",
     "x/q": "\nuse crate::{x::{r::A, p::{B as C}}};"}, [("src/x/p.rs", 1)]),
    ("x <-> y hidden behind x's re-export of x::l", {"lib": "", "x/mod": "pub use self::l::L;",
     "x/l": "", "x/e": "use crate::y::Y;", "y": "use crate::x::L;"}, [("src/x/e.rs", 1)]),
    ("no cycle: re-exports, child -> parent, tests mod, comments, strings, binary",
     {"lib": "pub mod a;", "a/mod": "pub use c::Z;\nuse crate::b::{self, Q};",
      "a/c": "use super::Z;\nmod tests { use super::*; use self::super::Z; }",
      "b": '// use crate::a::Z;\n/* crate::a::Z /* nested */ */ const S: &str = "crate::a::Z";'
           '\nconst R: &str = r#"super::a " crate::a::Z "#; const C: char = \'"\'; use crate::x;',
      "main": "use demo::a::Z; use demo::b::Q;"}, []),
    ("String errors: plain, nested, fn-pointer Ok, multi-line, turbofish; not the others",
     {"lib": "fn a() -> Result<u8, String> {}\nfn b() -> Result<Vec<Option<(u8, i8)>>, String> {}"
             "\nfn c() -> Result<Box<dyn Fn(u8) -> u8>, std::string::String> {}"
             "\nfn d() -> io::Result<String> {}\nfn e() -> Result<String, E> {}"
             "\nfn f() -> Result<u8, StringError> {}\n// fn g() -> Result<u8, String>"
             '\nconst H: &str = "Result<u8, String>";\nlet i = Result::<u8,\n String,\n>::Ok(1);'},
     [("src/lib.rs", n) for n in (1, 2, 3, 9)]),
    ("Err(format!) as is, not converted", {"lib": 'fn a() { Err(format!("x{}", 1)) }'
     '\nfn b() { Err(format!("x").into()) }\nfn c() { Err(format!("x"))?; Err(format!("y")).ok() }'
     '\nfn d() { Err(format!["{}", f(1)]) }'}, [("src/lib.rs", 1), ("src/lib.rs", 4)]),
    ("code literals in code (also raw), not in docs, attributes, bytes, errors.rs",
     {"lib": '/// Answers "busy" when full.\n// "not_found"\nlet q = \'"\';\nlet c = "busy";'
             '\n#[oai(rename = "busy")]\n#[serde(rename = "not_found")] struct S;'
             '\nconst B: &[u8] = b"busy";\nlet d = "busy_x";\nlet e = r"unauthorized";'
             "\nfn f<'a>(x: &'a str) -> char { '{' }", "api/errors": 'let c = "busy";'},
     [("src/lib.rs", 4), ("src/lib.rs", 9)]),
    ("the enum moved: its new file may hold codes, the old one may not",
     {"lib": "", "x": 'enum ErrorCode { A }\nconst C: &str = "busy";',
      "api/errors": 'let c = "busy";'}, [("src/api/errors.rs", 1)]),
]


def self_test():
    for what, files, expected in SELF_TESTS:
        found = check({f"src/{k}.rs": v for k, v in files.items()}, "demo")
        got = [(path, line) for path, line, _ in found]
        assert got == expected, f"self-test '{what}': expected {expected}, got {found}"
    print(f"check-structure self-test: {len(SELF_TESTS)} cases ok")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    root = pathlib.Path(__file__).resolve().parent.parent
    cargo = (root / "Cargo.toml").read_text(encoding="utf-8")
    crate_name = re.search(r'(?m)^name\s*=\s*"([^"]+)"', cargo).group(1).replace("-", "_")
    found = check({path.relative_to(root).as_posix(): path.read_text(encoding="utf-8")
                   for path in sorted((root / "src").rglob("*.rs"))}, crate_name)
    for path, line, message in found:
        print(f"{path}:{line}: {message}")
    if found:
        print(f"check-structure: {len(found)} violation(s)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
