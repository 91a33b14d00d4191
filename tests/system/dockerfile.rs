//! The Dockerfile cannot be built here (no Docker engine), so its build stage is checked
//! against the sources: everything the compiler reads must be copied into the image.

use std::path::{Component, Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The paths the build stage copies, relative to the context.
fn copied() -> Vec<PathBuf> {
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("Dockerfile")).expect("Dockerfile");
    let build_stage = dockerfile.split("\nFROM ").nth(1).expect("a build stage");
    build_stage
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from"))
        .flat_map(|args| {
            let parts: Vec<&str> = args.split_whitespace().collect();
            parts[..parts.len() - 1].iter().map(PathBuf::from).collect::<Vec<_>>()
        })
        .collect()
}

/// Every file named by `include_str!`/`include_bytes!` under `src/`, relative to the root.
fn included(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            included(&path, found);
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read");
        for macro_name in ["include_str!(\"", "include_bytes!(\""] {
            for piece in text.split(macro_name).skip(1) {
                let relative = piece.split('"').next().expect("a path");
                let mut resolved = path.parent().expect("a directory").to_path_buf();
                for component in Path::new(relative).components() {
                    match component {
                        Component::ParentDir => {
                            resolved.pop();
                        }
                        Component::Normal(part) => resolved.push(part),
                        _ => {}
                    }
                }
                found.push(resolved.strip_prefix(ROOT).expect("inside the project").to_path_buf());
            }
        }
    }
}

#[test]
fn the_image_build_copies_everything_the_compiler_reads() {
    let copied = copied();
    for needed in ["Cargo.toml", "Cargo.lock", "src"] {
        assert!(copied.iter().any(|c| c == Path::new(needed)), "the build stage copies {needed}: {copied:?}");
    }
    let mut files = Vec::new();
    included(&Path::new(ROOT).join("src"), &mut files);
    assert!(files.iter().any(|f| f.starts_with("assets")), "the page's assets are found: {files:?}");
    for file in &files {
        assert!(
            copied.iter().any(|c| file.starts_with(c)),
            "{} is built into the binary but the Dockerfile's build stage does not copy it",
            file.display()
        );
    }
}
