//! The load of `cargo xtask bench-owners`: helper processes that hold many fds, a server that
//! accepts and closes, and a leaker that never closes its side — each the xtask binary itself,
//! re-executed with a hidden `--role`, optionally inside a network namespace the bench created
//! (`ip netns add`). All of them live in one process group that [`Load`]'s `Drop` kills, and
//! each also exits when its stdin (a pipe from the bench) reaches EOF, so a bench killed with
//! SIGKILL leaves nothing running either. Traffic stays on 127.0.0.1 of each namespace.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// Prefix of the network namespaces the bench creates (and deletes, stale ones included).
pub(super) const NETNS_PREFIX: &str = "tcpwait-bench-owners-";

/// What a re-executed xtask does.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Role {
    /// Hold `--fds` fds until stdin closes.
    Holder,
    /// Accept on 127.0.0.1 and close at once; print the port.
    Server,
    /// Connect to `--port` `--rate` times per second for `--seconds`, never close.
    Leaker,
}

/// Runs a helper role: what the hidden `--role` of `bench-owners` asks for.
pub(super) fn helper(
    role: Role,
    netns: Option<&Path>,
    fds: usize,
    port: u16,
    rate: u32,
    secs: u64,
) -> Result<()> {
    raise_nofile();
    if let Some(ns) = netns {
        let f = File::open(ns).with_context(|| format!("open {}", ns.display()))?;
        // SAFETY: plain syscall on an fd we own; this process has one thread (no runtime).
        if unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) } != 0 {
            bail!(
                "setns {}: {}",
                ns.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    let mut out = std::io::stdout().lock();
    match role {
        Role::Holder => {
            let held = hold(fds)?;
            writeln!(out, "ready {}", held.len())?;
            out.flush()?;
            wait_for_eof();
            drop(held);
        }
        Role::Server => {
            let listener = TcpListener::bind("127.0.0.1:0").context("bind the server")?;
            writeln!(out, "{}", listener.local_addr()?.port())?;
            out.flush()?;
            std::thread::spawn(|| {
                wait_for_eof();
                std::process::exit(0)
            });
            // The peer's socket goes to CLOSE_WAIT when this drop sends FIN.
            for conn in listener.incoming() {
                drop(conn);
            }
        }
        Role::Leaker => {
            let n = u64::from(rate) * secs;
            let start = Instant::now();
            let mut kept = Vec::with_capacity(n as usize);
            for i in 0..n {
                let at = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let c = TcpStream::connect(("127.0.0.1", port)).context("leaker connect")?;
                writeln!(out, "{}", c.local_addr()?.port())?;
                out.flush()?;
                kept.push(c); // never closed: CLOSE_WAIT once the server's FIN arrives
            }
            writeln!(out, "done")?;
            out.flush()?;
            wait_for_eof();
            drop(kept);
        }
    }
    Ok(())
}

/// Opens `n` fds: ~1/20 idle loopback TCP (a listener and connected pairs, ESTABLISHED), of
/// the rest ~1/5 eventfds, ~2/5 pipe ends, the others regular files.
fn hold(n: usize) -> Result<Vec<OwnedFd>> {
    let mut held: Vec<OwnedFd> = Vec::with_capacity(n);
    let pairs = n / 40;
    if pairs > 0 {
        let l = TcpListener::bind("127.0.0.1:0").context("bind a holder listener")?;
        let addr = l.local_addr()?;
        for _ in 0..pairs {
            held.push(TcpStream::connect(addr).context("holder connect")?.into());
            held.push(l.accept().context("holder accept")?.0.into());
        }
        held.push(l.into());
    }
    let rest = n.saturating_sub(held.len());
    for _ in 0..rest / 5 {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { eventfd(0, EFD_CLOEXEC) };
        if fd < 0 {
            bail!("eventfd: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        held.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    for _ in 0..rest * 2 / 5 / 2 {
        let (r, w) = std::io::pipe().context("pipe")?;
        held.push(r.into());
        held.push(w.into());
    }
    let exe = std::env::current_exe().context("current_exe")?;
    while held.len() < n {
        let path = if held.len().is_multiple_of(2) {
            Path::new("/dev/null")
        } else {
            &exe
        };
        held.push(File::open(path).context("open a file to hold")?.into());
    }
    Ok(held)
}

fn wait_for_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().lock().read_to_end(&mut sink);
}

/// Raises the soft RLIMIT_NOFILE to the hard one (best effort).
fn raise_nofile() {
    let mut lim = [0u64; 2];
    // SAFETY: `struct rlimit` is two u64 on Linux (64-bit).
    unsafe {
        if getrlimit(RLIMIT_NOFILE, lim.as_mut_ptr()) == 0 {
            lim[0] = lim[1];
            setrlimit(RLIMIT_NOFILE, lim.as_ptr());
        }
    }
}

/// The helpers of one configuration, and the namespaces they run in; dropping it kills the
/// process group, reaps the children and deletes the namespaces.
#[derive(Default)]
pub(super) struct Load {
    children: Vec<Child>,
    pgid: Option<i32>,
    namespaces: Vec<String>,
    /// Fds the holders said they hold.
    pub(super) held: u64,
    /// The leaker's pid.
    pub(super) leaker: u32,
    /// The leaker's stdout: one local port per connection, then `done`.
    pub(super) leaker_out: Option<BufReader<ChildStdout>>,
    /// The server's port.
    pub(super) server_port: u16,
}

impl Load {
    /// Creates `namespaces` namespaces (0: all in the host's), starts `processes` holders of
    /// `fds` fds spread over them, and the server; the leaker waits for [`Load::leak`].
    pub(super) fn start(namespaces: usize, processes: usize, fds: usize) -> Result<Self> {
        let mut load = Load::default();
        for i in 0..namespaces {
            let name = format!("{NETNS_PREFIX}{i}");
            ip(&["netns", "add", &name])?;
            load.namespaces.push(name.clone());
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
        }
        let mut outs = Vec::with_capacity(processes);
        for i in 0..processes {
            let args = ["--role", "holder", "--fds", &fds.to_string()];
            outs.push(load.spawn(&args, i)?);
        }
        for mut out in outs {
            let line = read_line(&mut out, "a holder")?;
            let n = line
                .strip_prefix("ready ")
                .and_then(|n| n.parse::<u64>().ok());
            load.held += n.with_context(|| format!("a holder said `{line}`, not `ready N`"))?;
        }
        let mut out = load.spawn(&["--role", "server"], 0)?;
        let line = read_line(&mut out, "the server")?;
        load.server_port = line
            .parse()
            .with_context(|| format!("the server said `{line}`, not a port"))?;
        Ok(load)
    }

    /// Starts the leaker in the server's namespace.
    pub(super) fn leak(&mut self, rate: u32, secs: u64) -> Result<()> {
        let port = self.server_port.to_string();
        let (rate, secs) = (rate.to_string(), secs.to_string());
        let args = ["--role", "leaker", "--port", &port, "--rate", &rate];
        let args = [&args[..], &["--seconds", &secs]].concat();
        let out = self.spawn(&args, 0)?;
        self.leaker = self.children.last().map_or(0, Child::id);
        self.leaker_out = Some(out);
        Ok(())
    }

    /// A channel of the leaker's local ports as it connects (fed by a thread).
    pub(super) fn leaked_ports(&mut self) -> Result<mpsc::Receiver<u16>> {
        let out = self.leaker_out.take().context("the leaker's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                match line.parse() {
                    Ok(p) if tx.send(p).is_ok() => {}
                    _ => break,
                }
            }
        });
        Ok(rx)
    }

    /// Starts the xtask binary with `args`, in namespace `i % n` if there are namespaces.
    fn spawn(&mut self, args: &[&str], i: usize) -> Result<BufReader<ChildStdout>> {
        let exe = std::env::current_exe().context("current_exe")?;
        let mut cmd = Command::new(exe);
        cmd.args(["bench-owners"]).args(args);
        if !self.namespaces.is_empty() {
            let ns = &self.namespaces[i % self.namespaces.len()];
            cmd.arg("--netns").arg(PathBuf::from("/run/netns").join(ns));
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        cmd.process_group(self.pgid.unwrap_or(0));
        die_with_parent(&mut cmd, 9);
        let mut child = cmd.spawn().context("start a helper process")?;
        self.pgid.get_or_insert(child.id() as i32);
        let out = child.stdout.take().context("helper stdout")?;
        self.children.push(child);
        Ok(BufReader::new(out))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: signals our own helpers' process group.
            unsafe { kill(-pgid, 9) };
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Deletes namespaces a previous bench left behind (one killed before it could clean up).
pub(super) fn delete_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(NETNS_PREFIX) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn read_line(out: &mut BufReader<ChildStdout>, who: &str) -> Result<String> {
    let mut line = String::new();
    out.read_line(&mut line)
        .with_context(|| format!("read from {who}"))?;
    if line.is_empty() {
        bail!("{who} exited before it was ready (its error is above)");
    }
    Ok(line.trim().to_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run ip (apt-get install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Fds open on the whole host (every /proc/<pid>/fd entry).
pub(super) fn host_fds() -> u64 {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|p| std::fs::read_dir(p.path().join("fd")).ok())
        .map(|fds| fds.count() as u64)
        .sum()
}

/// Makes the child get `sig` when the bench dies, even by SIGKILL (`PR_SET_PDEATHSIG`).
pub(super) fn die_with_parent(cmd: &mut Command, sig: u64) {
    // SAFETY: prctl is async-signal-safe; nothing is allocated between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0);
            Ok(())
        });
    }
}

/// Sends `sig` to `pid` (the agent).
pub(super) fn signal(pid: u32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe { kill(pid as i32, sig) };
}

const CLONE_NEWNET: i32 = 0x4000_0000;
const EFD_CLOEXEC: i32 = 0o2_000_000;
const RLIMIT_NOFILE: i32 = 7;
const PR_SET_PDEATHSIG: i32 = 1;

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
    fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
    fn setns(fd: i32, nstype: i32) -> i32;
    fn eventfd(initval: u32, flags: i32) -> i32;
    fn getrlimit(resource: i32, rlim: *mut u64) -> i32;
    fn setrlimit(resource: i32, rlim: *const u64) -> i32;
}
