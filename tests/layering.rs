//! The import layering written in `docs/architecture.md`, checked against the code: every path
//! into another room (`use crate::…`, `crate::…` in code, `super::…`, a child module's path)
//! must lead to a lower layer, and the rooms' import graph must have no cycle. The layers are
//! parsed from the doc, so the doc and this test cannot drift apart.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path, e.g. `["cluster", "changes"]`; the crate root is empty.
type ModPath = Vec<String>;

/// One import found in the source.
#[derive(Debug, Clone)]
struct Import {
    file: String,
    line: usize,
    /// The path as resolved from the crate root (`cluster::metalog::Entry`).
    target: ModPath,
    /// The source line, for the failure message.
    text: String,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The numbered list under `## Layers`: room → layer (1 = lowest).
fn layers_from_doc(doc: &str) -> BTreeMap<String, usize> {
    let mut rooms = BTreeMap::new();
    let mut in_section = false;
    for line in doc.lines() {
        if line.starts_with("## ") {
            in_section = line.trim() == "## Layers";
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((num, rest)) = line.split_once(". ") else { continue };
        let Ok(layer) = num.trim().parse::<usize>() else { continue };
        let names = rest.split(" — ").next().unwrap_or("");
        for name in names.split('`').skip(1).step_by(2) {
            let before = rooms.insert(name.to_string(), layer);
            assert!(before.is_none(), "docs/architecture.md lists `{name}` in two layers");
        }
    }
    assert!(!rooms.is_empty(), "docs/architecture.md has no numbered list under `## Layers`");
    rooms
}

/// Every `.rs` file of the library (`main.rs` is the binary on top of it).
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") && p != repo().join("src/main.rs") {
            out.push(p);
        }
    }
}

/// `src/cluster/changes/mod.rs` → `cluster::changes`.
fn module_of(file: &Path) -> ModPath {
    let rel = file.strip_prefix(repo().join("src")).unwrap().with_extension("");
    let mut m: ModPath = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    if matches!(m.last().map(String::as_str), Some("mod" | "lib")) {
        m.pop();
    }
    m
}

/// The source with comments and the contents of string and char literals blanked (kept as
/// spaces, so lines and columns stay where they were).
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && (i == 0 || !is_ident(c[i - 1])) {
            // A raw string: r"…", r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let rest: String = c[j + 1..].iter().collect();
            let end = rest.find(&close).map_or(c.len(), |e| j + 1 + rest[..e].chars().count() + close.len());
            for &ch in &c[i..end] {
                out.push(blank(ch));
            }
            i = end;
        } else if c[i] == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\''), or a lifetime ('a), which is kept.
            let len = if next == Some('\\') {
                c[i + 2..].iter().position(|&ch| ch == '\'').map(|p| p + 3)
            } else if c.get(i + 2) == Some(&'\'') {
                Some(3)
            } else {
                None
            };
            match len {
                Some(n) => {
                    out.extend(std::iter::repeat_n(' ', n));
                    i += n;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The paths of a use tree (`a::{b, c::{d, e as f}, self}`), each as its segments.
fn expand_use_tree(tree: &str) -> Vec<Vec<String>> {
    fn split_top(s: &str) -> Vec<&str> {
        let (mut depth, mut start, mut parts) = (0, 0, vec![]);
        for (i, ch) in s.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
    }
    let tree: String = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    let tree = tree.trim();
    match tree.find('{') {
        Some(open) => {
            let prefix: Vec<String> =
                tree[..open].split("::").map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
            let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
            let mut out = vec![];
            for part in split_top(inner) {
                for rest in expand_use_tree(part) {
                    let mut p = prefix.clone();
                    p.extend(rest.into_iter().filter(|s| s != "self"));
                    out.push(p);
                }
            }
            out
        }
        None => {
            let path = tree.split(" as ").next().unwrap_or(tree);
            vec![path.split("::").map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()]
        }
    }
}

/// Every module of the crate (from the file tree and inline `mod x {` blocks), for resolving
/// paths that start with a child module's name.
fn all_modules(files: &[(PathBuf, String)]) -> BTreeSet<ModPath> {
    let mut mods = BTreeSet::new();
    for (f, code) in files {
        let m = module_of(f);
        mods.insert(m.clone());
        for (_, inline) in inline_modules(code) {
            let mut p = m.clone();
            p.extend(inline);
            mods.insert(p);
        }
    }
    mods
}

/// Inline modules (`mod tests {`) by the byte range of their body, with their nesting.
fn inline_modules(code: &str) -> Vec<(std::ops::Range<usize>, Vec<String>)> {
    let bytes = code.as_bytes();
    let mut out = vec![];
    let mut stack: Vec<(usize, Vec<String>, usize)> = vec![]; // (depth at open, path, start)
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !is_ident(bytes[i - 1] as char);
        if word_start && code[i..].starts_with("mod ") {
            let rest = &code[i + 4..];
            let name: String = rest.trim_start().chars().take_while(|c| is_ident(*c)).collect();
            let after = rest.trim_start()[name.len()..].trim_start();
            if !name.is_empty() && after.starts_with('{') {
                let open = code.len() - after.len();
                let mut path = stack.last().map(|s| s.1.clone()).unwrap_or_default();
                path.push(name);
                depth += 1;
                stack.push((depth, path, open + 1));
                i = open + 1;
                continue;
            }
        }
        match bytes[i] {
            b'{' => depth += 1,
            b'}' => {
                if stack.last().is_some_and(|s| s.0 == depth) {
                    let (_, path, start) = stack.pop().unwrap();
                    out.push((start..i, path));
                }
                depth = depth.saturating_sub(1);
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// `#[macro_export]` macros live at the crate root by name but belong to the file defining them.
fn exported_macros(files: &[(PathBuf, String)]) -> BTreeMap<String, ModPath> {
    let mut out = BTreeMap::new();
    for (f, code) in files {
        let mut rest = code.as_str();
        while let Some(at) = rest.find("#[macro_export]") {
            rest = &rest[at + 15..];
            if let Some(m) = rest.trim_start().strip_prefix("macro_rules!") {
                let name: String = m.trim_start().chars().take_while(|c| is_ident(*c)).collect();
                out.insert(name, module_of(f));
            }
        }
    }
    out
}

/// Resolves a path written in module `here` to a path from the crate root; None for paths
/// outside the crate (std, dependencies).
fn resolve(path: &[String], here: &ModPath, mods: &BTreeSet<ModPath>) -> Option<ModPath> {
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "super" | "self" => {
            let mut base = here.clone();
            let mut rest = path;
            while let Some(s) = rest.first() {
                match s.as_str() {
                    "super" => {
                        base.pop()?;
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            Some(base)
        }
        _ => {
            let mut child = here.clone();
            child.push(first.clone());
            mods.contains(&child).then(|| {
                let mut p = here.clone();
                p.extend(path.iter().cloned());
                p
            })
        }
    }
}

/// The room a module path belongs to: the longest listed prefix.
fn room_of(path: &[String], rooms: &BTreeMap<String, usize>) -> Option<String> {
    (1..=path.len()).rev().map(|n| path[..n].join("::")).find(|r| rooms.contains_key(r))
}

/// Every import in one file, resolved from the crate root.
fn imports_of(
    file: &Path,
    src: &str,
    code: &str,
    mods: &BTreeSet<ModPath>,
    macros: &BTreeMap<String, ModPath>,
) -> Vec<Import> {
    let module = module_of(file);
    let inline = inline_modules(code);
    let here_at = |pos: usize| -> ModPath {
        let mut m = module.clone();
        if let Some((_, p)) = inline.iter().filter(|(r, _)| r.contains(&pos)).max_by_key(|(_, p)| p.len()) {
            m.extend(p.iter().cloned());
        }
        m
    };
    let line_at = |pos: usize| code[..pos].matches('\n').count() + 1;
    let src_lines: Vec<&str> = src.lines().collect();
    let rel = file.strip_prefix(repo()).unwrap().display().to_string();
    let mut out = vec![];
    let mut push = |pos: usize, target: ModPath| {
        let line = line_at(pos);
        let text = src_lines.get(line - 1).map(|l| l.trim().to_string()).unwrap_or_default();
        out.push(Import { file: rel.clone(), line, target, text });
    };
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(is_ident(bytes[i - 1] as char) || bytes[i - 1] == b':');
        if word_start && code[i..].starts_with("use ") {
            let end = code[i..].find(';').map_or(code.len(), |e| i + e);
            for path in expand_use_tree(&code[i + 4..end]) {
                let path: Vec<String> = path.into_iter().filter(|s| s != "*").collect();
                let here = here_at(i);
                let mut target = resolve(&path, &here, mods);
                if let (Some(t), true) = (&target, path.first().is_some_and(|f| f == "crate")) {
                    if let Some(m) = t.first().and_then(|n| macros.get(n)).filter(|_| t.len() == 1) {
                        target = Some(m.clone());
                    }
                }
                if let Some(t) = target {
                    push(i, t);
                }
            }
            i = end;
            continue;
        }
        // Paths in code: `crate::a::b`, `super::x`, `child_module::item`.
        if word_start && is_ident(bytes[i] as char) {
            let len = code[i..].find(|c: char| !(is_ident(c) || c == ':')).unwrap_or(code.len() - i);
            let token = code[i..i + len].trim_end_matches(':');
            if token.contains("::") {
                let path: Vec<String> = token.split("::").map(String::from).collect();
                if let Some(t) = resolve(&path, &here_at(i), mods) {
                    let t = match t.first().and_then(|n| macros.get(n)) {
                        Some(m) if t.len() <= 2 && path[0] == "crate" && !mods.contains(&t[..1]) => m.clone(),
                        _ => t,
                    };
                    push(i, t);
                }
            }
            i += len.max(1);
            continue;
        }
        i += 1;
    }
    out
}

struct Graph {
    /// Room → room it imports → one import that does it.
    edges: BTreeMap<String, BTreeMap<String, Import>>,
}

/// Each cycle of the room graph (strongly connected components of more than one room, or a
/// room importing itself through another name), as one concrete loop.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = g.edges.keys().chain(g.edges.values().flat_map(|m| m.keys())).collect();
    let next = |n: &String| -> Vec<String> { g.edges.get(n).map(|m| m.keys().cloned().collect()).unwrap_or_default() };
    let mut out = vec![];
    let mut seen_in_cycle: BTreeSet<String> = BTreeSet::new();
    for start in nodes {
        if seen_in_cycle.contains(start) {
            continue;
        }
        // Shortest path back to `start` (breadth first): a readable loop.
        let mut prev: BTreeMap<String, String> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.clone()]);
        let mut found = false;
        while let Some(n) = queue.pop_front() {
            for m in next(&n) {
                if m == *start {
                    let mut path = vec![n.clone()];
                    let mut cur = n.clone();
                    while cur != *start {
                        cur = prev[&cur].clone();
                        path.push(cur.clone());
                    }
                    path.reverse();
                    seen_in_cycle.extend(path.iter().cloned());
                    out.push(path);
                    found = true;
                    break;
                }
                if !prev.contains_key(&m) && m != *start {
                    prev.insert(m.clone(), n.clone());
                    queue.push_back(m);
                }
            }
            if found {
                break;
            }
        }
    }
    out
}

#[test]
fn imports_follow_the_layers_in_docs_architecture_md() {
    let doc = std::fs::read_to_string(repo().join("docs/architecture.md")).expect("docs/architecture.md");
    let rooms = layers_from_doc(&doc);
    let mut paths = vec![];
    sources(&repo().join("src"), &mut paths);
    let files: Vec<(PathBuf, String)> = paths
        .into_iter()
        .map(|p| {
            let src = std::fs::read_to_string(&p).unwrap();
            (p, src)
        })
        .collect();
    let codes: Vec<(PathBuf, String)> = files.iter().map(|(p, s)| (p.clone(), code_only(s))).collect();
    let mods = all_modules(&codes);
    let macros = exported_macros(&files);
    let mut problems = vec![];

    for room in rooms.keys() {
        let path: ModPath = room.split("::").map(String::from).collect();
        if !mods.contains(&path) {
            problems.push(format!("docs/architecture.md lists `{room}`, which is no module of src/"));
        }
    }
    let mut graph = Graph { edges: BTreeMap::new() };
    // One message per line and room it reaches (`use crate::x::{A, B}` is one import of `x`).
    let mut reported = BTreeSet::new();
    for ((file, src), (_, code)) in files.iter().zip(&codes) {
        let module = module_of(file);
        if module.is_empty() {
            continue; // lib.rs declares the rooms
        }
        let rel = file.strip_prefix(repo()).unwrap().display();
        let Some(from) = room_of(&module, &rooms) else {
            problems.push(format!("{rel}: module `{}` is in no layer of docs/architecture.md", module.join("::")));
            continue;
        };
        for imp in imports_of(file, src, code, &mods, &macros) {
            let Some(to) = room_of(&imp.target, &rooms) else {
                if mods.contains(&imp.target[..1]) {
                    problems.push(format!(
                        "{}:{}: `{}` imports `{}`, which is in no layer of docs/architecture.md",
                        imp.file,
                        imp.line,
                        imp.text,
                        imp.target.join("::")
                    ));
                }
                continue;
            };
            if to == from {
                continue;
            }
            let (lf, lt) = (rooms[&from], rooms[&to]);
            if lt >= lf && reported.insert((imp.file.clone(), imp.line, to.clone())) {
                let how = if lt == lf { "its own layer" } else { "a higher layer" };
                problems.push(format!(
                    "{}:{}: `{}` — `{from}` (layer {lf}) imports `{to}` (layer {lt}), {how}",
                    imp.file, imp.line, imp.text
                ));
            }
            graph.edges.entry(from.clone()).or_default().entry(to).or_insert(imp);
        }
    }
    for cycle in cycles(&graph) {
        let mut steps = vec![];
        for (i, a) in cycle.iter().enumerate() {
            let b = &cycle[(i + 1) % cycle.len()];
            let imp = &graph.edges[a][b];
            steps.push(format!("    {a} → {b}  ({}:{}: `{}`)", imp.file, imp.line, imp.text));
        }
        problems.push(format!("import cycle: {}\n{}", cycle.join(" → "), steps.join("\n")));
    }
    assert!(
        problems.is_empty(),
        "{} layering problem(s) against docs/architecture.md:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_parser_sees_every_kind_of_import() {
    let mods: BTreeSet<ModPath> = [vec!["a"], vec!["a", "child"], vec!["b"]]
        .into_iter()
        .map(|m| m.into_iter().map(String::from).collect())
        .collect();
    let src = r#"
use crate::{b::{X, Y as Z}, a};
use super::Sibling; // crate::b::q in a comment is no import
use child::Thing;
fn f() { let s = "crate::b::in_a_string"; crate::b::call(); let c = '"'; }
mod tests {
    use super::super::b::T;
}
"#;
    let code = code_only(src);
    let file = repo().join("src/a/mod.rs");
    let got: Vec<String> =
        imports_of(&file, src, &code, &mods, &BTreeMap::new()).iter().map(|i| i.target.join("::")).collect();
    assert_eq!(got, ["b::X", "b::Y", "a", "Sibling", "a::child::Thing", "b::call", "b::T"]);
}
