//! The transition log file: every transition as a JSON line (the schema of `tail --json`),
//! rotated by size. Rotation renames `file` → `file.1` → … → `file.<keep>` (the oldest is
//! deleted) and starts a new `file`, so `tail -F file` follows it across rotations.
//!
//! Writes go through a 64 KiB buffer flushed once per drained batch, never per line.
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// An open, rotating JSON-lines log.
pub struct TransitionLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    mode: u32,
    out: BufWriter<File>,
    size: u64,
}

impl TransitionLog {
    /// Opens (appends to) `path`, creating it with `mode` (the umask can only narrow it).
    pub fn open(path: &Path, max_bytes: u64, keep: u32, mode: u32) -> io::Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(mode)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.into(),
            max_bytes,
            keep,
            mode,
            out: BufWriter::with_capacity(64 * 1024, file),
            size,
        })
    }

    /// Appends one line (without its newline), rotating first if it would not fit.
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    /// Flushes the buffer to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(self.mode)
            .open(&self.path)?;
        self.out = BufWriter::with_capacity(64 * 1024, file);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("t.jsonl");
        let mut log = TransitionLog::open(&path, 20, 2, 0o600).expect("open");
        for i in 0..7 {
            // 10 bytes per line with its newline: two lines per file.
            log.write_line(format!("{{\"n\":{i:03}}}").as_bytes())
                .expect("write");
        }
        log.flush().expect("flush");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&path), "{\"n\":006}\n");
        assert_eq!(
            read(&d.path().join("t.jsonl.1")),
            "{\"n\":004}\n{\"n\":005}\n"
        );
        assert_eq!(
            read(&d.path().join("t.jsonl.2")),
            "{\"n\":002}\n{\"n\":003}\n"
        );
        assert!(
            !d.path().join("t.jsonl.3").exists(),
            "only `keep` rotated files"
        );
    }
}
