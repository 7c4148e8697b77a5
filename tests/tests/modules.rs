//! The module graph of every crate in the workspace has no cycle: a lower layer never imports a
//! higher one.
//!
//! The check reads the sources, not the compiler's view: each file is a module (`a/b.rs` and
//! `a/b/mod.rs` are `a::b`), and every path that starts with `crate::`, `super::` or `self::`
//! (in `use` trees, nested braces included, and in expressions) is an edge to the longest module
//! that names a prefix of it. Test modules (`#[cfg(test)] mod …`) are left out: a test may reach
//! anywhere. A module's use of its own ancestors is not an edge (a child sees its parent's items;
//! the parent declares the child), so the check is about siblings and cousins, which is where a
//! layer can import a higher one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules are checked, by source directory.
const CRATES: &[&str] = &["api/src", "proxy/src", "controller/src", "cli/src", "tests/src"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace").to_path_buf()
}

/// Module path (`["outbound", "balance"]`) of a source file relative to its crate's `src/`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let file = parts.pop().expect("a file name");
    let stem = file.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    if rel.parent().is_some_and(|p| p.as_os_str().is_empty()) && stem == "main" {
        // A binary's main.rs is the root of another crate, which the library is a dependency of.
        return vec!["<main>".into()];
    }
    parts
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            // `src/bin/*` are separate crates.
            if path.file_name().is_some_and(|n| n != "bin") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text with comments, string and char literals blanked, and `#[cfg(test)]` items cut.
fn code_of(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if rest.starts_with("r#\"") || rest.starts_with("r\"") {
            let hashes = rest[1..].bytes().take_while(|b| *b == b'#').count();
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += rest[body..].find(&close).map_or(rest.len(), |e| body + e + close.len());
            out.push_str("\"\"");
        } else if rest.starts_with('"') || (rest.starts_with("b\"") && !prev_is_ident(&out)) {
            let start = if rest.starts_with('"') { 1 } else { 2 };
            let mut j = start;
            let rb = rest.as_bytes();
            while j < rb.len() && rb[j] != b'"' {
                j += if rb[j] == b'\\' { 2 } else { 1 };
            }
            i += (j + 1).min(rest.len());
            out.push_str("\"\"");
        } else if rest.starts_with('\'') && is_char_literal(rest) {
            let rb = rest.as_bytes();
            let mut j = 1;
            while j < rb.len() && rb[j] != b'\'' {
                j += if rb[j] == b'\\' { 2 } else { 1 };
            }
            i += j + 1;
            out.push_str("' '");
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    cut_test_items(&out)
}

fn prev_is_ident(out: &str) -> bool {
    out.chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// `'a'`, `'\n'`, `'\u{1F600}'` (a literal) as opposed to `'a` (a lifetime).
fn is_char_literal(rest: &str) -> bool {
    let mut chars = rest.chars().skip(1);
    match chars.next() {
        Some('\\') => true,
        Some(_) => chars.next() == Some('\''),
        None => false,
    }
}

/// Removes every item that follows a `#[cfg(test)]` attribute (a module or function body,
/// matched by braces; a `use` or `mod x;` to its semicolon).
fn cut_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let brace = item.find('{');
        let semi = item.find(';');
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = item.len();
                for (k, c) in item[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => s + 1,
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Every path the code names from `crate::`, `super::` or `self::`, resolved to absolute
/// segment lists (brace groups in `use` trees expanded).
fn paths_in(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let word_start =
            i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_' || bytes[i - 1] == b':');
        let head = ["crate::", "super::", "self::"].into_iter().find(|h| rest.starts_with(h));
        match head {
            Some(h) if word_start => {
                // The module a relative path starts from: a `mod.rs`/root file is its own
                // directory; `super` from `a/b.rs` is `a`.
                let base: Vec<String> = match h {
                    "crate::" => Vec::new(),
                    _ => here.to_vec(),
                };
                let (tree, used) = use_tree(&rest[h.len()..]);
                let mut prefix = base;
                if h == "super::" {
                    prefix.pop();
                }
                for tail in tree {
                    let mut path = prefix.clone();
                    let mut segs = tail.into_iter().peekable();
                    while segs.peek().is_some_and(|s| s == "super") {
                        segs.next();
                        path.pop();
                    }
                    path.extend(segs);
                    found.push(path);
                }
                i += h.len() + used;
            }
            _ => i += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    found
}

/// Parses a path tail (`a::b::{c, d::e}`) into the list of paths it names; returns them with the
/// number of bytes read.
fn use_tree(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut segs = Vec::new();
    let mut i = 0;
    let b = text.as_bytes();
    loop {
        let start = i;
        while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
            i += 1;
        }
        if i > start {
            segs.push(text[start..i].to_string());
        }
        let group = text[i..].starts_with('{');
        if group || text[i..].starts_with("::") {
            if !group {
                i += 2;
            }
            if text[i..].starts_with('{') {
                i += 1;
                let mut all = Vec::new();
                loop {
                    while i < b.len() && (b[i] as char).is_whitespace() {
                        i += 1;
                    }
                    if i >= b.len() || b[i] == b'}' {
                        i += 1;
                        break;
                    }
                    let (inner, used) = use_tree(&text[i..]);
                    i += used.max(1);
                    for p in inner {
                        let mut full = segs.clone();
                        full.extend(p.into_iter().filter(|s| s != "self"));
                        all.push(full);
                    }
                    while i < b.len() && (b[i] as char).is_whitespace() {
                        i += 1;
                    }
                    if i < b.len() && b[i] == b',' {
                        i += 1;
                    }
                }
                return (all, i);
            }
            continue;
        }
        return (vec![segs], i);
    }
}

/// The module graph of one crate: module → the modules it uses.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> =
        files.iter().map(|f| (module_of(f.strip_prefix(src).expect("under src")), f.clone())).collect();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &modules {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        // `super` in `a/b.rs` is `a`; in `a/b/mod.rs` it is also `a` (the file is `a::b`).
        let here = if module.first().is_some_and(|m| m == "<main>") { Vec::new() } else { module.clone() };
        let entry = edges.entry(module.clone()).or_default();
        for path in paths_in(&code_of(&text), &here) {
            // The longest module naming a prefix of the path.
            let target = (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains_key(p));
            let Some(target) = target else { continue };
            let ancestor = module.starts_with(&target);
            if !ancestor && &target != module {
                entry.insert(target);
            }
        }
    }
    edges
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let Some((w, _)) = graph.get_key_value(w) else { continue };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[w].min(s.low[v]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.index[w].min(s.low[v]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn name(m: &[String]) -> String {
    if m.is_empty() { "crate".into() } else { m.join("::") }
}

/// Within a cycle, the edges that close it (a → b where b also reaches a), for the message.
fn describe(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>, component: &[Vec<String>]) -> String {
    let inside: BTreeSet<&Vec<String>> = component.iter().collect();
    let mut lines = Vec::new();
    for m in component {
        let to: Vec<String> = graph[m].iter().filter(|t| inside.contains(t)).map(|t| name(t)).collect();
        lines.push(format!("    {} → {}", name(m), to.join(", ")));
    }
    lines.join("\n")
}

#[test]
fn no_crate_has_a_module_cycle() {
    let mut failures = Vec::new();
    for krate in CRATES {
        let graph = graph(&root().join(krate));
        for component in cycles(&graph) {
            failures.push(format!(
                "  {krate}: {}\n{}",
                component.iter().map(|m| name(m)).collect::<Vec<_>>().join(" ↔ "),
                describe(&graph, &component)
            ));
        }
    }
    assert!(failures.is_empty(), "module cycles (a lower layer importing a higher one):\n{}", failures.join("\n"));
}

/// The checker itself finds what it must: a cycle through nested `use` braces, `super::`
/// and an expression path, and none where a child only uses its parent.
#[test]
fn the_checker_sees_cycles_through_every_kind_of_path() {
    let dir = std::env::temp_dir().join(format!("weir-modules-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let write = |rel: &str, text: &str| {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write(
        "a/mod.rs",
        "pub mod inner;\nuse crate::{b::{self, Thing}};\n// use crate::c; (a comment)\nconst S: &str = \"crate::c\";\n",
    );
    write("a/inner.rs", "use super::Parent;\n");
    write("b.rs", "fn f() { super::c::g(); }\n#[cfg(test)]\nmod tests { use crate::a; }\n");
    write("c.rs", "pub fn g() { let _ = crate::a::inner::X; }\n");
    let graph = graph(&dir);
    let found = cycles(&graph);
    std::fs::remove_dir_all(&dir).unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // a → b (nested braces), b → c (super:: in an expression), c → a::inner (expression path),
    // a::inner → a is its parent (no edge); b's test module and a's comment and string do not count.
    assert_eq!(graph[&s(&["a"])], BTreeSet::from([s(&["b"])]), "{graph:?}");
    assert_eq!(graph[&s(&["b"])], BTreeSet::from([s(&["c"])]), "{graph:?}");
    assert_eq!(graph[&s(&["c"])], BTreeSet::from([s(&["a", "inner"])]), "{graph:?}");
    assert!(graph[&s(&["a", "inner"])].is_empty(), "{graph:?}");
    // No cycle yet: a::inner does not reach back. Close it through the parent-to-child edge.
    assert!(found.is_empty(), "{found:?}");
    let mut closed = graph.clone();
    closed.get_mut(&s(&["a", "inner"])).unwrap().insert(s(&["b"]));
    closed.get_mut(&s(&["b"])).unwrap().insert(s(&["a", "inner"]));
    assert_eq!(cycles(&closed), vec![vec![s(&["a", "inner"]), s(&["b"]), s(&["c"])]]);
}
