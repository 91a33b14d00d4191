//! The offline bundle `gitfleet-<fleet>-linux-<arch>.tar.gz`: the install files and, when
//! the server has them, the verified release files with a `SHA256SUMS` for `install.sh`.
//!
//! A small ustar writer: regular files only, short names, streamed (release archives are
//! copied through, never held in memory).

use std::io::{Read, Write};

use flate2::Compression;
use flate2::write::GzEncoder;

use crate::install::artifacts::Artifact;
use crate::install::files::TextFile;

const BLOCK: usize = 512;

/// Writes the bundle for `arch` to `out`.
pub fn write(
    out: &mut impl Write,
    fleet: &str,
    arch: &str,
    files: &[TextFile],
    artifacts: &[Artifact],
    mtime: u64,
) -> std::io::Result<()> {
    // Release archives are compressed already: do not spend CPU on them.
    let level = if artifacts.is_empty() { Compression::default() } else { Compression::fast() };
    let mut gz = GzEncoder::new(out, level);
    let root = format!("gitfleet-{fleet}-linux-{arch}");
    for file in files {
        entry(
            &mut gz,
            &format!("{root}/{}", file.name),
            file.mode,
            mtime,
            file.body.len() as u64,
            file.body.as_bytes(),
        )?;
    }
    if !artifacts.is_empty() {
        let sums: String = artifacts.iter().map(|a| format!("{}  {}\n", a.sha256, a.name)).collect();
        entry(&mut gz, &format!("{root}/SHA256SUMS"), 0o644, mtime, sums.len() as u64, sums.as_bytes())?;
    }
    for artifact in artifacts {
        let file = std::fs::File::open(&artifact.path)?;
        let size = file.metadata()?.len();
        let mode = if artifact.name.ends_with(".tar.gz") { 0o644 } else { 0o755 };
        entry(&mut gz, &format!("{root}/{}", artifact.name), mode, mtime, size, file)?;
    }
    gz.write_all(&[0; 2 * BLOCK])?;
    gz.finish()?.flush()
}

/// One regular file: a header block, then `size` bytes of `content` padded to a block.
fn entry(
    out: &mut impl Write,
    path: &str,
    mode: u32,
    mtime: u64,
    size: u64,
    content: impl Read,
) -> std::io::Result<()> {
    out.write_all(&header(path, mode, mtime, size)?)?;
    let copied = std::io::copy(&mut content.take(size), out)?;
    if copied != size {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{path} changed while it was packed"),
        ));
    }
    let padding = (BLOCK - (size % BLOCK as u64) as usize) % BLOCK;
    out.write_all(&[0; BLOCK][..padding])
}

fn header(path: &str, mode: u32, mtime: u64, size: u64) -> std::io::Result<[u8; BLOCK]> {
    let mut block = [0u8; BLOCK];
    if path.len() > 100 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{path} is too long for a tar entry"),
        ));
    }
    block[..path.len()].copy_from_slice(path.as_bytes());
    octal(&mut block[100..108], u64::from(mode));
    octal(&mut block[108..116], 0); // uid
    octal(&mut block[116..124], 0); // gid
    octal(&mut block[124..136], size);
    octal(&mut block[136..148], mtime);
    block[156] = b'0'; // a regular file
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block[265..269].copy_from_slice(b"root");
    block[297..301].copy_from_slice(b"root");
    // The checksum counts its own field as spaces.
    block[148..156].fill(b' ');
    let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
    octal(&mut block[148..155], sum);
    Ok(block)
}

/// `value` in octal, zero-padded, NUL-terminated, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_ustar() {
        let block = header("dir/file.txt", 0o644, 1_700_000_000, 1234).expect("a header");
        assert_eq!(&block[..12], b"dir/file.txt");
        assert_eq!(&block[100..108], b"0000644\0");
        assert_eq!(&block[124..136], b"00000002322\0");
        assert_eq!(&block[257..263], b"ustar\0");
        let stored = std::str::from_utf8(&block[148..154]).expect("octal");
        let mut blank = block;
        blank[148..156].fill(b' ');
        let sum: u64 = blank.iter().map(|&b| u64::from(b)).sum();
        assert_eq!(u64::from_str_radix(stored, 8).expect("octal"), sum);
        assert!(header(&"x".repeat(101), 0o644, 0, 0).is_err());
    }
}
