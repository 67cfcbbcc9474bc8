//! A real Alertmanager (Debian's `prometheus-alertmanager`, which `cargo xtask test` installs)
//! on loopback, for the tests of alert delivery (`monitoring.rs`, `tls_delivery.rs`): one
//! receiver (`null`), so that it holds every alert for the test to read through its API; no
//! cluster; its configuration and data in the test's own directory.
use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

/// A neighbour of the agent (Alertmanager, Prometheus) in its own process, killed and reaped
/// on drop.
pub struct Neighbour(pub Child);

impl Drop for Neighbour {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fails, saying what to install, where `bin` is not on the `PATH`.
pub fn require(bin: &str) {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success()),
        "{bin} not found: install the Debian packages prometheus and prometheus-alertmanager (cargo xtask test does)"
    );
}

/// Starts Alertmanager on `127.0.0.1:port`, its files in `dir`; `web_config` is its own
/// `--web.config.file` (TLS, basic auth) where given. Returns at once: a test waits for
/// `/-/ready` over its own client (plain or TLS), or starts the agent first on purpose.
pub fn alertmanager(dir: &Path, port: u16, web_config: Option<&Path>) -> Neighbour {
    require("prometheus-alertmanager");
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n",
    )
    .expect("write alertmanager.yml");
    let mut am = Command::new("prometheus-alertmanager");
    am.arg(format!("--config.file={}", config.display()));
    if let Some(web) = web_config {
        am.arg(format!("--web.config.file={}", web.display()));
    }
    let child = am
        .arg(format!("--storage.path={}", dir.join("am-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus-alertmanager");
    Neighbour(child)
}
