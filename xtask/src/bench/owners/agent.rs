//! The agent under measurement: started and stopped, its `status --json`, its /metrics, its
//! CPU time (the whole process's and its owner resolver thread's) from /proc.
use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::owners_load;

/// The running agent.
pub(super) struct Agent {
    child: Child,
}

impl Agent {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn start(bin: &Path, sock: &str, port: u16) -> Result<Self> {
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--socket", sock, "--metrics-listen", &listen])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SIGINT, as on Ctrl-C: the agent detaches its programs and exits.
        owners_load::die_with_parent(&mut cmd, 2);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let err = child.stderr.take().context("agent stderr")?;
        let mut lines = std::io::BufReader::new(err).lines();
        let ready = lines.next().transpose()?.unwrap_or_default();
        let agent = Agent { child };
        if !ready.contains("agent running") {
            bail!("tcpwait run did not start: {ready}");
        }
        // Drained so that the agent never blocks on a full pipe.
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        Ok(agent)
    }

    /// SIGINT, then SIGKILL if it has not exited 10 s later.
    pub(super) fn stop(&mut self) {
        owners_load::signal(self.child.id(), 2);
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn status(bin: &Path, sock: &str) -> Value {
    Command::new(bin)
        .args(["status", "--json", "--socket", sock])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null)
}

pub(super) fn counter(status: &Value, key: &str) -> u64 {
    status["counters"][key].as_u64().unwrap_or(0)
}

/// The agent's /metrics text, or None if it does not answer.
pub(super) fn metrics(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// (namespaces, seconds) of the last owner snapshot, from /metrics text (NaN if absent).
pub(super) fn last_snapshot(m: &str) -> (f64, f64) {
    let get = |k| metric(m, k).unwrap_or(f64::NAN);
    (
        get("tcpwait_owner_snapshot_namespaces"),
        get("tcpwait_owner_snapshot_duration_seconds"),
    )
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub(super) fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// (comm, utime + stime in ticks) from the text of /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat.
pub(super) fn stat_cpu(stat: &str) -> Option<(&str, u64)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some((
        comm,
        f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?,
    ))
}

/// (the whole agent's CPU ticks, its owner resolver thread's).
pub(super) fn agent_cpu(pid: u32) -> Result<(u64, u64)> {
    let read = |p: PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let stat = read(PathBuf::from(format!("/proc/{pid}/stat")));
    let total = stat_cpu(&stat).context("the agent has exited")?.1;
    let mut owners = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Some(("tcpwait-owners", ticks)) = stat_cpu(&read(t.path().join("stat"))) {
                owners += ticks;
            }
        }
    }
    Ok((total, owners))
}
