//! The layers of the crate, checked: each module imports only modules of a
//! lower layer (or its own), so data flows one way, from the Kafka message
//! to the Redis key. Test code (after `#[cfg(test)]`, `tests.rs` files) may
//! reach the `testing` builders.

/// Layer of each top-level module; a module may import any module of a
/// lower layer.
const LAYERS: &[(&str, u8)] = &[
    ("calendar", 0),
    ("clock", 0),
    ("fnv", 0),
    ("config", 1),
    ("progress", 0),
    ("shutdown", 0),
    ("telemetry", 0),
    ("retry", 1),
    ("domain", 1),
    ("testing", 2),
    ("wire", 2),
    ("kafka", 3),
    ("scenario", 3),
    ("store", 3),
    ("projection", 4),
    ("http", 5),
    ("ingest", 5),
    ("commands", 6),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// `crate::x` paths in the code of `text` (comments and test code left out).
fn imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("#[cfg(test)]") {
            break;
        }
        if line.starts_with("//") {
            continue;
        }
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.push(name);
            }
        }
    }
    found
}

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|c| c.trim_end_matches(".rs").to_owned())
            .expect("a module");
        if matches!(module.as_str(), "lib" | "main" | "layering") || relative.ends_with("tests.rs")
        {
            continue;
        }
        let own = layer(&module).unwrap_or_else(|| panic!("{module} has no layer in LAYERS"));
        let text = std::fs::read_to_string(&file).expect("readable source");
        for imported in imports(&text) {
            let theirs =
                layer(&imported).unwrap_or_else(|| panic!("{imported} has no layer in LAYERS"));
            if imported != module && theirs >= own {
                violations.push(format!("{} imports crate::{imported}", relative.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layers crossed upwards:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_check_sees_an_import_and_skips_comments_and_tests() {
    let text = "use crate::store::Store;\n// crate::commands in a comment\nfn f() { crate::clock::now_ms(); }\n#[cfg(test)]\nuse crate::testing;\n";
    assert_eq!(imports(text), vec!["store", "clock"]);
}
