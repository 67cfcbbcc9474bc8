//! The transition log file: every transition as a JSON line (the schema of `tail --json`),
//! rotated by size. Rotation renames `file` → `file.1` → … → `file.<keep>` (the oldest is
//! deleted) and starts a new `file`, so `tail -F file` follows it across rotations.
//!
//! The sink thread hands it whole batches (one per drain), written with one `write` call per
//! batch (per rotation), never per line. A failed write (a full disk) loses only whole lines:
//! the file is cut back to the end of the last complete line, and the lines not written are
//! counted, so lines in the files + lines failed + lines dropped = transitions, exactly.
//!
//! Not a rotation crate: `file-rotate` (the maintained one that rotates by size to `.1`, `.2`,
//! …) cuts either at the exact byte count (`ContentLimit::Bytes`, mid-line) or after a write
//! that went past it (`BytesSurpassed`, files over `max_bytes`), and its `Write` hides how
//! many lines reached which file when a write fails part-way, which the exact accounting
//! above needs; `tracing-appender` and `rolling-file` rotate by time. SIGHUP reopens the file
//! ([`TransitionLog::reopen`]) for logrotate users.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

/// An open, rotating JSON-lines log.
pub struct TransitionLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    mode: u32,
    out: File,
    size: u64,
}

/// What became of a batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Written {
    /// Lines written whole.
    pub lines: u64,
    /// Lines not written.
    pub failed: u64,
}

impl TransitionLog {
    /// Opens (appends to) `path`, creating it with `mode` (the umask can only narrow it).
    pub fn open(path: &Path, max_bytes: u64, keep: u32, mode: u32) -> io::Result<Self> {
        let out = Self::create(path, mode)?;
        let size = out.metadata()?.len();
        Ok(Self {
            path: path.into(),
            max_bytes,
            keep,
            mode,
            out,
            size,
        })
    }

    /// Opens `path` again (a new file if it was renamed or removed, as logrotate does), and
    /// goes on appending there; on an error the open file stays.
    pub fn reopen(&mut self) -> io::Result<()> {
        let out = Self::create(&self.path, self.mode)?;
        self.size = out.metadata()?.len();
        self.out = out;
        Ok(())
    }

    /// The path it writes to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn create(path: &Path, mode: u32) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(mode)
            .open(path)
    }

    /// Appends newline-terminated `lines`, rotating before a line that would not fit. On an
    /// error the rest of the batch is counted as failed, and the error returned.
    pub fn write_batch(&mut self, lines: &[u8]) -> (Written, Option<io::Error>) {
        let mut done = Written::default();
        let mut chunk_start = 0;
        let mut chunk_lines = 0u64;
        let mut pos = 0;
        let total = lines.iter().filter(|b| **b == b'\n').count() as u64;
        while pos < lines.len() {
            let end = lines[pos..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(lines.len(), |i| pos + i + 1);
            let chunk_len = (pos - chunk_start) as u64;
            let len = (end - pos) as u64;
            if self.size + chunk_len > 0 && self.size + chunk_len + len > self.max_bytes {
                if let Err((whole, e)) = self.write_chunk(&lines[chunk_start..pos]) {
                    done.lines += whole;
                    done.failed = total - done.lines;
                    return (done, Some(e));
                }
                done.lines += chunk_lines;
                if let Err((_, e)) = self.rotate() {
                    done.failed = total - done.lines;
                    return (done, Some(e));
                }
                (chunk_start, chunk_lines) = (pos, 0);
            }
            chunk_lines += 1;
            pos = end;
        }
        match self.write_chunk(&lines[chunk_start..]) {
            Ok(()) => {
                done.lines += chunk_lines;
                (done, None)
            }
            Err((whole, e)) => {
                done.lines += whole;
                done.failed = total - done.lines;
                (done, Some(e))
            }
        }
    }

    /// Writes `chunk` (whole lines); on an error, cuts the file back to the last whole line
    /// written and returns how many were.
    fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), (u64, io::Error)> {
        let mut off = 0;
        while off < chunk.len() {
            match self.out.write(&chunk[off..]) {
                Ok(0) => {
                    return Err(self.cut(chunk, off, io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.cut(chunk, off, e)),
            }
        }
        self.size += chunk.len() as u64;
        Ok(())
    }

    fn cut(&mut self, chunk: &[u8], written: usize, e: io::Error) -> (u64, io::Error) {
        let whole_end = chunk[..written]
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        let whole = chunk[..whole_end].iter().filter(|b| **b == b'\n').count() as u64;
        self.size += whole_end as u64;
        // A partial line would break the JSON-lines file: cut it off.
        let _ = self.out.set_len(self.size);
        (whole, e)
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        p.into()
    }

    fn rotate(&mut self) -> Result<(), (u64, io::Error)> {
        let fail = |e| (0, e);
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1)).map_err(fail)?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1)).map_err(fail)?;
        self.out = Self::create(&self.path, self.mode).map_err(fail)?;
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
        // 10 bytes per line with its newline: two lines per file; batches of 3 and 4.
        let lines: Vec<u8> = (0..7)
            .flat_map(|i| format!("{{\"n\":{i:03}}}\n").into_bytes())
            .collect();
        let (a, e) = log.write_batch(&lines[..30]);
        assert!(e.is_none());
        let (b, e) = log.write_batch(&lines[30..]);
        assert!(e.is_none());
        assert_eq!((a.lines + b.lines, a.failed + b.failed), (7, 0));
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

    #[test]
    fn reopen_follows_a_rename_and_counts_the_new_file_from_zero() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("t.jsonl");
        let mut log = TransitionLog::open(&path, 20, 2, 0o600).expect("open");
        assert!(log.write_batch(b"{\"n\":001}\n").1.is_none());
        // logrotate: rename, then SIGHUP.
        std::fs::rename(&path, d.path().join("t.jsonl.old")).expect("rename");
        log.reopen().expect("reopen");
        // 10 + 10 bytes fit the new file's 20: no rotation counted against the old size.
        assert!(log.write_batch(b"{\"n\":002}\n{\"n\":003}\n").1.is_none());
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&path), "{\"n\":002}\n{\"n\":003}\n");
        assert_eq!(read(&d.path().join("t.jsonl.old")), "{\"n\":001}\n");
        assert!(!d.path().join("t.jsonl.1").exists());
    }

    #[test]
    fn a_full_disk_fails_whole_lines_and_says_how_many() {
        // /dev/full: every write fails with ENOSPC.
        let mut log = TransitionLog::open(Path::new("/dev/full"), 1 << 20, 2, 0o600).expect("open");
        let (w, e) = log.write_batch(b"{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n");
        assert_eq!(
            w,
            Written {
                lines: 0,
                failed: 3
            }
        );
        assert_eq!(e.expect("error").raw_os_error(), Some(libc::ENOSPC));
    }
}
