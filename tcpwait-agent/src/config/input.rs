//! What the configuration reads from outside itself: the file (a small regular file only), and
//! the URLs and paths it names, checked when the configuration is read so that `config
//! --check` refuses what `run` could not use.
use std::path::Path;

/// A file the agent appends to: "" (disabled), or a path that is not a directory and whose
/// directory exists. Checked when the configuration is read, so `config --check` refuses it.
pub(super) fn check_output_file(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    let p = Path::new(path);
    if p.is_dir() {
        return Err("is a directory: give the path of a file");
    }
    match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err("is in a directory that does not exist: create it first")
        }
        _ => Ok(()),
    }
}

/// Largest configuration file read (the documented default is under 3 KiB).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a configuration file: a regular file of at most [`MAX_CONFIG_BYTES`]. It is opened
/// non-blocking, so a FIFO cannot hang the open, and checked before it is read, so a device
/// (`/dev/zero`) cannot exhaust memory.
pub(super) fn read_capped(path: &Path) -> std::io::Result<String> {
    use std::{
        io::{Error, ErrorKind, Read as _},
        os::unix::fs::OpenOptionsExt as _,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file: give the path of a TOML file",
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{} bytes is over the {MAX_CONFIG_BYTES}-byte limit of a configuration file",
                meta.len()
            ),
        ));
    }
    let mut text = String::new();
    // The file may grow after the check: read no more than the limit all the same.
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("over the {MAX_CONFIG_BYTES}-byte limit of a configuration file"),
        ));
    }
    Ok(text)
}

/// An octal file mode within 0644 ("0600", "640"); `None` otherwise.
pub(super) fn parse_mode(mode: &str) -> Option<u32> {
    let digits = mode
        .strip_prefix('0')
        .filter(|d| d.len() == 3)
        .unwrap_or(mode);
    if digits.len() != 3 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    let m = u32::from_str_radix(digits, 8).ok()?;
    (m & !0o644 == 0).then_some(m)
}

/// Mode of the alert file and the transition log unless configured: they hold command lines.
pub(super) const DEFAULT_FILE_MODE: &str = "0600";

/// The mode of a validated `mode` key.
pub fn file_mode(mode: &str) -> u32 {
    parse_mode(mode).unwrap_or(0o600)
}
