use super::*;

/// A crate in a temporary directory: `(path under src/, text)` pairs, `lib.rs` among them.
fn crate_with(files: &[(&str, &str)]) -> (tempfile::TempDir, ModuleGraph) {
    let dir = tempfile::tempdir().expect("temporary directory");
    for (path, text) in files {
        let file = dir.path().join("src").join(path);
        fs::create_dir_all(file.parent().expect("a parent")).expect("directories");
        fs::write(&file, text).expect("a source file");
    }
    let graph = ModuleGraph::read(&dir.path().join("src/lib.rs")).expect("the crate parses");
    (dir, graph)
}

fn arrows(graph: &ModuleGraph) -> Vec<String> {
    graph.cycles().iter().map(Cycle::arrows).collect()
}

#[test]
fn a_cycle_through_three_modules_is_named_in_order() {
    let (_dir, graph) = crate_with(&[
        (
            "lib.rs",
            "pub mod config;\npub mod cli;\npub mod upstream;\npub mod admin;\n",
        ),
        ("config.rs", "use crate::cli::Args;\npub struct Config;\n"),
        ("cli.rs", "pub struct Args(crate::upstream::Mode);\n"),
        ("upstream/mod.rs", "mod pool;\npub enum Mode {}\n"),
        // A grandchild reaching back up with `super::super` is its top-level module's edge.
        (
            "upstream/pool.rs",
            "fn f() { let _ = super::super::config::Config; }\n",
        ),
        ("admin.rs", "use crate::config::Config;\n"),
    ]);
    let cycles = graph.cycles();
    assert_eq!(arrows(&graph), ["cli → upstream → config → cli"]);
    let sites: Vec<String> = cycles[0]
        .sites
        .iter()
        .map(|s| {
            format!(
                "{}:{} {}",
                s.file
                    .file_name()
                    .map_or(String::new(), |f| f.to_string_lossy().into_owned()),
                s.line,
                s.path
            )
        })
        .collect();
    assert_eq!(
        sites,
        [
            "cli.rs:1 crate::upstream::Mode",
            "pool.rs:1 super::super::config::Config",
            "config.rs:1 crate::cli::Args",
        ]
    );
    assert!(cycles[0].also.is_empty(), "admin only uses the knot");
}

#[test]
fn parents_using_children_and_one_way_uses_are_no_cycle() {
    let (_dir, graph) = crate_with(&[
        ("lib.rs", "mod proxy;\nmod kernel;\n"),
        (
            "proxy/mod.rs",
            "mod listener;\nuse self::listener::Listener;\nuse crate::kernel::Maps;\n",
        ),
        (
            "proxy/listener.rs",
            "use super::super::kernel::Maps;\npub struct Listener;\n",
        ),
        ("kernel.rs", "pub struct Maps;\n"),
    ]);
    assert!(graph.cycles().is_empty(), "{:?}", arrows(&graph));
    assert_eq!(graph.edges["proxy"]["kernel"].1, 2);
}

#[test]
fn grouped_uses_macros_and_root_reexports_count_test_code_does_not() {
    let (_dir, graph) = crate_with(&[
        (
            "lib.rs",
            "pub mod a;\npub mod b;\npub mod c;\npub use c::Exported;\n",
        ),
        // A grouped use, and a path only a macro's tokens carry.
        (
            "a.rs",
            "use crate::{b::X, c::Y};\nfn f() { tracing::info!(\"{}\", crate::c::NAME); }\n",
        ),
        // A name the root re-exports leads to the module that defines it.
        ("b.rs", "pub struct X(crate::Exported);\n"),
        (
            "c.rs",
            "pub struct Y;\npub struct Exported;\npub const NAME: &str = \"\";\n\
             #[cfg(test)]\nmod tests { use crate::a::f; }\n\
             #[cfg(test)]\nfn helper() { crate::b::X; }\n",
        ),
    ]);
    assert!(graph.cycles().is_empty(), "{:?}", arrows(&graph));
    assert_eq!(graph.edges["a"]["c"].1, 2, "the grouped use and the macro");
    assert!(graph.edges["b"].contains_key("c"), "crate::Exported is c's");
    assert!(!graph.edges.contains_key("c"), "c's test code is left out");
}

#[test]
fn a_knot_larger_than_its_shortest_cycle_names_the_rest() {
    let (_dir, graph) = crate_with(&[
        ("lib.rs", "mod a;\nmod b;\nmod c;\n"),
        ("a.rs", "use crate::b::B;\n"),
        ("b.rs", "use crate::a::A;\nuse crate::c::C;\n"),
        ("c.rs", "use crate::a::A;\n"),
    ]);
    let cycles = graph.cycles();
    assert_eq!(arrows(&graph), ["a → b → a"]);
    assert_eq!(cycles[0].also, ["c"]);
}
