//! The house's shape, as `docs/architecture.md` states it: each crate imports only what its
//! row of the table allows (read from every `Cargo.toml`), the table names exactly the
//! workspace's crates, no module of a crate imports one that imports it back, and no source file
//! of logic is longer than about 650 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `spiderpool-core` → `core`, `spiderpoolctl` stays.
fn short(name: &str) -> String {
    name.strip_prefix("spiderpool-").unwrap_or(name).to_string()
}

/// The table of docs/architecture.md: crate → the workspace crates it may import.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let mut out = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | layer | `crate` | what | may import |
        if cells.len() != 6 || !cells[2].starts_with('`') {
            continue;
        }
        let name = cells[2].trim_matches('`');
        let allowed = cells[4]
            .split(',')
            .map(|c| c.trim().split(' ').next().unwrap_or_default().to_string())
            .filter(|c| !c.is_empty() && c != "none")
            .collect();
        out.insert(name.to_string(), allowed);
    }
    out
}

/// The workspace crates `crate_dir`'s `[dependencies]` name.
fn dependencies(crate_dir: &Path) -> BTreeSet<String> {
    let toml = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line.to_string();
            continue;
        }
        if section == "[dependencies]" {
            let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
            if name.starts_with("spiderpool") {
                out.insert(short(name));
            }
        }
    }
    out
}

fn crates() -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), p))
        .collect();
    out.sort();
    out
}

#[test]
fn each_crate_imports_only_what_docs_architecture_allows() {
    let table = documented();
    let names: BTreeSet<String> = crates().into_iter().map(|(n, _)| n).collect();
    let listed: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(
        names, listed,
        "docs/architecture.md's table must name exactly the workspace's crates"
    );
    for (name, dir) in crates() {
        let allowed = &table[&name];
        if allowed.contains("any") {
            continue;
        }
        let deps = dependencies(&dir);
        let extra: Vec<&String> = deps.difference(allowed).collect();
        assert!(
            extra.is_empty(),
            "{name} imports {extra:?}, which docs/architecture.md does not allow (allowed: {allowed:?})"
        );
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_source_file_of_logic_is_longer_than_about_650_lines() {
    let mut long = Vec::new();
    for (_, dir) in crates() {
        let mut files = Vec::new();
        rust_files(&dir.join("src"), &mut files);
        for f in files {
            if f.file_name().is_some_and(|n| n == "tests.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap();
            // Inline unit tests at the end of a file do not count.
            let logic = text
                .split("\n#[cfg(test)]\nmod tests {")
                .next()
                .unwrap_or("");
            let lines = logic.lines().count();
            if lines > 650 {
                long.push(format!("{} ({lines} lines)", f.display()));
            }
        }
    }
    assert!(long.is_empty(), "split these into folder modules: {long:?}");
}

/// The top-level modules of a crate (`src/foo.rs` or `src/foo/`), each with the top-level
/// modules its files name as `crate::x` (tests left out).
fn module_imports(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let top = |f: &Path| -> Option<String> {
        let rel = f.strip_prefix(src).ok()?;
        let first = rel
            .components()
            .next()?
            .as_os_str()
            .to_string_lossy()
            .to_string();
        let m = first.trim_end_matches(".rs").to_string();
        (m != "lib" && m != "main" && m != "bin").then_some(m)
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top(f)).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = top(f) else { continue };
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let logic = text.split("#[cfg(test)]").next().unwrap_or("");
        let entry = out.entry(m.clone()).or_default();
        for (i, _) in logic.match_indices("crate::") {
            let rest = &logic[i + 7..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")]
            };
            for n in names {
                if modules.contains(n) && n != m {
                    entry.insert(n.to_string());
                }
            }
        }
    }
    out
}

fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if !done.insert(n.to_string()) {
            return None;
        }
        path.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut BTreeSet::new()))
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    for (name, dir) in crates() {
        let graph = module_imports(&dir.join("src"));
        if let Some(c) = cycle(&graph) {
            panic!(
                "{name}: modules import each other in a circle: {}",
                c.join(" → ")
            );
        }
    }
}

#[test]
fn the_circle_finder_finds_a_circle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
    let mut g = g;
    g.get_mut("c").unwrap().clear();
    assert_eq!(cycle(&g), None);
}
