//! `--artifacts-dir`: official release files kept on the server for offline bundles.
//!
//! The directory holds files under their release names (`otelcol-contrib_0.158.0_linux_amd64.tar.gz`,
//! `opampsupervisor_0.158.0_linux_amd64`) and the releases' checksums files (any file named
//! `SHA256SUMS` or ending in `checksums.txt`). A release file is bundled only when a
//! checksums file lists it and its SHA-256 matches.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// A release file whose checksum was verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    pub name: String,
    pub path: PathBuf,
    /// Lowercase hex.
    pub sha256: String,
}

/// Every checksum listed by the checksums files in `dir`, by file name.
pub fn checksums(dir: &Path) -> std::io::Result<HashMap<String, String>> {
    let mut sums = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name == "SHA256SUMS" || name.ends_with("checksums.txt")) || !entry.file_type()?.is_file() {
            continue;
        }
        for line in std::fs::read_to_string(entry.path())?.lines() {
            let mut fields = line.split_whitespace();
            if let (Some(sum), Some(file)) = (fields.next(), fields.next())
                && sum.len() == 64
                && sum.bytes().all(|b| b.is_ascii_hexdigit())
            {
                sums.insert(file.trim_start_matches('*').to_owned(), sum.to_ascii_lowercase());
            }
        }
    }
    Ok(sums)
}

/// The release files `names` from `dir`, verified. `Ok(None)` when any is absent (the
/// bundle then makes `install.sh` download them); an error when one fails verification.
pub fn verified(dir: &Path, names: &[String]) -> Result<Option<Vec<Artifact>>, String> {
    let paths: Vec<PathBuf> = names.iter().map(|name| dir.join(name)).collect();
    if !paths.iter().all(|path| path.is_file()) {
        return Ok(None);
    }
    let sums = checksums(dir).map_err(|error| format!("cannot read the checksums in {}: {error}", dir.display()))?;
    let mut artifacts = Vec::new();
    for (name, path) in names.iter().zip(paths) {
        let expected =
            sums.get(name).ok_or_else(|| format!("{name} is in {} but no checksums file lists it", dir.display()))?;
        let actual = sha256_file(&path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        if actual != *expected {
            return Err(format!(
                "{name} in {} does not match its checksum (expected {expected}, found {actual})",
                dir.display()
            ));
        }
        artifacts.push(Artifact { name: name.clone(), path, sha256: actual });
    }
    Ok(Some(artifacts))
}

/// Each architecture's verified release files for `spec`, leaving out architectures whose
/// files are absent, and why one was refused, if one was.
pub fn for_bundles(
    dir: &Path,
    spec: &crate::install::files::InstallSpec<'_>,
) -> (Vec<(&'static str, Vec<Artifact>)>, Option<String>) {
    let mut included = Vec::new();
    let mut refused = None;
    for arch in crate::install::files::ARCHES {
        match verified(dir, &crate::install::files::release_files(spec, arch)) {
            Ok(Some(found)) => included.push((arch, found)),
            Ok(None) => {}
            Err(message) => refused = Some(message),
        }
    }
    (included, refused)
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..read]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_files_are_bundled_only_with_a_matching_checksum() {
        let dir = tempfile::tempdir().expect("temp dir");
        let names = vec!["a_1_linux_amd64.tar.gz".to_owned(), "b_1_linux_amd64".to_owned()];
        assert_eq!(verified(dir.path(), &names), Ok(None), "nothing there");
        std::fs::write(dir.path().join(&names[0]), b"collector").expect("write");
        std::fs::write(dir.path().join(&names[1]), b"supervisor").expect("write");
        let sum = |text: &[u8]| hex::encode(Sha256::digest(text));
        std::fs::write(dir.path().join("x_checksums.txt"), format!("{}  {}\n", sum(b"collector"), names[0]))
            .expect("write");
        let missing = verified(dir.path(), &names).expect_err("b is not listed");
        assert!(missing.contains("no checksums file lists it"), "{missing}");
        std::fs::write(dir.path().join("SHA256SUMS"), format!("{} *{}\n", sum(b"tampered"), names[1])).expect("write");
        let mismatch = verified(dir.path(), &names).expect_err("b does not match");
        assert!(mismatch.contains("does not match its checksum"), "{mismatch}");
        std::fs::write(dir.path().join("SHA256SUMS"), format!("{} *{}\n", sum(b"supervisor"), names[1]))
            .expect("write");
        let artifacts = verified(dir.path(), &names).expect("verified").expect("present");
        assert_eq!(artifacts[1].sha256, sum(b"supervisor"));
    }
}
