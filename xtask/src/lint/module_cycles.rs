//! `cargo xtask lint`'s import-cycle check: in every crate of the workspace, the top-level modules
//! (the children of `lib.rs`/`main.rs`) must use each other without a cycle, so that each one can
//! be read knowing only the modules below it. A parent may use its own children; a module's
//! `#[cfg(test)]` items are left out (test fixtures reach across the crate without shaping it).
//!
//! The graph comes from the source: `mod` declarations give the module tree, and every `crate::`
//! and `super::` path (in `use` declarations, in code and inside macro calls) that leads from one
//! top-level module into another is an edge. A name the crate root re-exports (`pub use
//! config::Config;` used as `crate::Config`) counts as its module. Parsed with `syn` rather than
//! with the compiler (`rustc -Z unpretty`, cargo-modules) so that the check runs on stable in a
//! second, without building anything.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Where one module refers to another: the first place seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub file: PathBuf,
    pub line: usize,
    pub path: String,
}

/// The top-level modules of one crate and which of them refer to which.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    /// Every top-level module, even those that use nothing.
    pub modules: BTreeSet<String>,
    /// `from → to → first site and the number of references`.
    pub edges: BTreeMap<String, BTreeMap<String, (Site, usize)>>,
}

/// One cycle, with the place each of its edges comes from.
#[derive(Debug)]
pub struct Cycle {
    /// `a, b, c` for `a → b → c → a`.
    pub path: Vec<String>,
    pub sites: Vec<Site>,
    /// The other modules caught in the same knot (its strongly connected component).
    pub also: Vec<String>,
    /// Every use between two modules of the knot: one of them must go for the knot to untie.
    pub knot_edges: Vec<(String, String, Site)>,
}

impl Cycle {
    /// `a → b → c → a`.
    pub fn arrows(&self) -> String {
        let mut names = self.path.clone();
        names.extend(self.path.first().cloned());
        names.join(" → ")
    }
}

impl ModuleGraph {
    /// Reads the crate whose root file (`src/lib.rs`, `src/main.rs`) is `root`.
    pub fn read(root: &Path) -> Result<ModuleGraph> {
        let file = parse(root)?;
        let dir = root.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut graph = ModuleGraph::default();
        let mut reexports = BTreeMap::new();
        let mut files = Vec::new();
        for item in file.items.iter().filter(|i| !is_test_only(i)) {
            match item {
                syn::Item::Mod(m) => {
                    let name = m.ident.to_string();
                    graph.modules.insert(name.clone());
                    collect_module(m, &dir, root, vec![name], &mut files)?;
                }
                syn::Item::Use(u) => {
                    for (path, alias) in use_paths(&u.tree, Vec::new()) {
                        let first = path.iter().find(|s| s.as_str() != "crate");
                        if let (Some(module), Some(alias)) = (first, alias) {
                            reexports.insert(alias, module.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        // Only names that lead into a module of this crate are re-exports worth following.
        reexports.retain(|_, module| graph.modules.contains(module));
        for (module, source) in files {
            let mut refs = References::default();
            match &source {
                Source::File(path) => refs.visit_file(&parse(path)?),
                Source::Inline(items, _) => items.iter().for_each(|i| refs.visit_item(i)),
            }
            for (path, line) in refs.paths {
                if let Some(target) = resolve(&module, &path, &graph.modules, &reexports) {
                    graph.add_edge(&module[0], &target, source.site(line, &path));
                }
            }
        }
        Ok(graph)
    }

    fn add_edge(&mut self, from: &str, to: &str, site: Site) {
        if from == to {
            return;
        }
        self.edges
            .entry(from.to_string())
            .or_default()
            .entry(to.to_string())
            .and_modify(|(_, n)| *n += 1)
            .or_insert((site, 1));
    }

    fn targets(&self, from: &str) -> impl Iterator<Item = &String> {
        self.edges.get(from).into_iter().flat_map(BTreeMap::keys)
    }

    /// One shortest cycle per knot of mutually dependent modules, smallest module name first.
    pub fn cycles(&self) -> Vec<Cycle> {
        self.knots()
            .into_iter()
            .filter_map(|knot| {
                let start = knot.iter().next()?.clone();
                let path = self.shortest_cycle(&start, &knot)?;
                let sites = path
                    .iter()
                    .zip(path.iter().cycle().skip(1))
                    .filter_map(|(a, b)| Some(self.edges.get(a)?.get(b)?.0.clone()))
                    .collect();
                let knot_edges = knot
                    .iter()
                    .flat_map(|from| {
                        self.edges
                            .get(from)
                            .into_iter()
                            .flatten()
                            .filter(|(to, _)| knot.contains(*to))
                            .map(|(to, (site, _))| (from.clone(), to.clone(), site.clone()))
                    })
                    .collect();
                let also = knot.into_iter().filter(|m| !path.contains(m)).collect();
                Some(Cycle {
                    path,
                    sites,
                    also,
                    knot_edges,
                })
            })
            .collect()
    }

    /// Strongly connected components of more than one module: a module reaches every other module
    /// of its knot and is reached by it.
    fn knots(&self) -> Vec<BTreeSet<String>> {
        let mut knots: Vec<BTreeSet<String>> = Vec::new();
        for m in &self.modules {
            if knots.iter().any(|k| k.contains(m)) {
                continue;
            }
            let knot: BTreeSet<String> = self
                .reachable(m)
                .into_iter()
                .filter(|other| self.reachable(other).contains(m))
                .collect();
            if knot.len() > 1 {
                knots.push(knot);
            }
        }
        knots
    }

    fn reachable(&self, from: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::from([from.to_string()]);
        let mut queue = VecDeque::from([from.to_string()]);
        while let Some(m) = queue.pop_front() {
            for t in self.targets(&m) {
                if seen.insert(t.clone()) {
                    queue.push_back(t.clone());
                }
            }
        }
        seen
    }

    /// Breadth-first from `start` back to it, within `knot`.
    fn shortest_cycle(&self, start: &str, knot: &BTreeSet<String>) -> Option<Vec<String>> {
        let mut came_from: BTreeMap<String, String> = BTreeMap::new();
        let mut queue = VecDeque::from([start.to_string()]);
        while let Some(m) = queue.pop_front() {
            for t in self.targets(&m).filter(|t| knot.contains(*t)) {
                if t == start {
                    let mut path = vec![m.clone()];
                    while let Some(prev) = came_from.get(path.last()?) {
                        path.push(prev.clone());
                    }
                    path.reverse();
                    return Some(path);
                }
                if !came_from.contains_key(t) && t != start {
                    came_from.insert(t.clone(), m.clone());
                    queue.push_back(t.clone());
                }
            }
        }
        None
    }
}

/// Where a module's items are: a file of its own, or inline in its parent's file.
enum Source {
    File(PathBuf),
    Inline(Vec<syn::Item>, PathBuf),
}

impl Source {
    fn site(&self, line: usize, path: &[String]) -> Site {
        let file = match self {
            Source::File(f) | Source::Inline(_, f) => f.clone(),
        };
        Site {
            file,
            line,
            path: path.join("::"),
        }
    }
}

fn parse(path: &Path) -> Result<syn::File> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    syn::parse_file(&text).with_context(|| format!("cannot parse {}", path.display()))
}

/// `#[cfg(test)]` (also inside `all(...)`): compiled for unit tests only.
fn is_test_only(item: &syn::Item) -> bool {
    let attrs = match item {
        syn::Item::Mod(m) => &m.attrs,
        syn::Item::Use(u) => &u.attrs,
        syn::Item::Fn(f) => &f.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Struct(s) => &s.attrs,
        syn::Item::Enum(e) => &e.attrs,
        syn::Item::Const(c) => &c.attrs,
        syn::Item::Static(s) => &s.attrs,
        syn::Item::Trait(t) => &t.attrs,
        syn::Item::Type(t) => &t.attrs,
        syn::Item::Macro(m) => &m.attrs,
        _ => return false,
    };
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta.require_list().is_ok_and(|l| {
                l.tokens
                    .to_string()
                    .split(|c: char| !c.is_alphanumeric())
                    .any(|w| w == "test")
            })
    })
}

/// The module `m` declared in `decl_file` (whose children live in `dir`), and its descendants.
fn collect_module(
    m: &syn::ItemMod,
    dir: &Path,
    decl_file: &Path,
    module: Vec<String>,
    out: &mut Vec<(Vec<String>, Source)>,
) -> Result<()> {
    let name = m.ident.to_string();
    let (items, file, child_dir) = match &m.content {
        Some((_, items)) => {
            out.push((
                module.clone(),
                Source::Inline(items.clone(), decl_file.to_path_buf()),
            ));
            (items.clone(), decl_file.to_path_buf(), dir.join(&name))
        }
        None => {
            let file = module_file(m, dir, &name)?;
            let parsed = parse(&file)?;
            out.push((module.clone(), Source::File(file.clone())));
            let child_dir =
                if file.file_name().is_some_and(|f| f == "mod.rs") || path_attr(m).is_some() {
                    file.parent().unwrap_or(dir).to_path_buf()
                } else {
                    dir.join(&name)
                };
            (parsed.items, file, child_dir)
        }
    };
    for item in items.iter().filter(|i| !is_test_only(i)) {
        if let syn::Item::Mod(child) = item {
            let mut path = module.clone();
            path.push(child.ident.to_string());
            collect_module(child, &child_dir, &file, path, out)?;
        }
    }
    Ok(())
}

fn path_attr(m: &syn::ItemMod) -> Option<String> {
    m.attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

/// `name.rs` or `name/mod.rs` in `dir`, or what `#[path]` says.
fn module_file(m: &syn::ItemMod, dir: &Path, name: &str) -> Result<PathBuf> {
    if let Some(p) = path_attr(m) {
        return Ok(dir.join(p));
    }
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .with_context(|| format!("no file for `mod {name};` in {}", dir.display()))
}

/// Flattens a use tree into its paths, each with the name it brings in (`None` for globs).
fn use_paths(tree: &syn::UseTree, prefix: Vec<String>) -> Vec<(Vec<String>, Option<String>)> {
    let with = |s: String| [prefix.clone(), vec![s]].concat();
    match tree {
        syn::UseTree::Path(p) => use_paths(&p.tree, with(p.ident.to_string())),
        syn::UseTree::Name(n) => vec![(with(n.ident.to_string()), Some(n.ident.to_string()))],
        syn::UseTree::Rename(r) => vec![(with(r.ident.to_string()), Some(r.rename.to_string()))],
        syn::UseTree::Glob(_) => vec![(prefix, None)],
        syn::UseTree::Group(g) => g
            .items
            .iter()
            .flat_map(|t| use_paths(t, prefix.clone()))
            .collect(),
    }
}

/// Every path of one file that starts at `crate`, `super` or `self`, with its line.
#[derive(Default)]
struct References {
    paths: Vec<(Vec<String>, usize)>,
}

impl References {
    fn push(&mut self, path: Vec<String>, line: usize) {
        if path
            .first()
            .is_some_and(|s| matches!(s.as_str(), "crate" | "super" | "self"))
        {
            self.paths.push((path, line));
        }
    }

    /// `crate :: name` and `super :: name` inside a macro call's tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, t) in trees.iter().enumerate() {
            match t {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id) if matches!(id.to_string().as_str(), "crate" | "super") => {
                    let mut path = vec![id.to_string()];
                    let mut at = i + 1;
                    while let (
                        Some(TokenTree::Punct(a)),
                        Some(TokenTree::Punct(b)),
                        Some(TokenTree::Ident(next)),
                    ) = (trees.get(at), trees.get(at + 1), trees.get(at + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        path.push(next.to_string());
                        at += 3;
                    }
                    if path.len() > 1 {
                        self.push(path, id.span().start().line);
                    }
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for References {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        // Child modules are read on their own, test-only items not at all.
        if matches!(item, syn::Item::Mod(_)) || is_test_only(item) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let line = u.use_token.span.start().line;
        for (path, _) in use_paths(&u.tree, Vec::new()) {
            self.push(path, line);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        let line = p
            .segments
            .first()
            .map_or(0, |s| s.ident.span().start().line);
        self.push(segments, line);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}

/// The top-level module `path` leads to from inside `module`, if it leads into one.
fn resolve(
    module: &[String],
    path: &[String],
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<String, String>,
) -> Option<String> {
    let mut base: Vec<String> = module.to_vec();
    let mut rest = path;
    match path.first()?.as_str() {
        "crate" => {
            base.clear();
            rest = &path[1..];
        }
        "self" => return None,
        _ => {
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
        }
    }
    if let Some(top) = base.first() {
        return Some(top.clone());
    }
    let name = rest.first()?;
    if modules.contains(name) {
        Some(name.clone())
    } else {
        reexports.get(name).cloned()
    }
}

#[cfg(test)]
mod tests;
