//! The agent's neighbours in these tests, real ones: Prometheus with the bundled scrape
//! configuration, Alertmanager, and what the tests ask them.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use super::common::{
    alertmanager::{Neighbour, alertmanager, require},
    *,
};

/// GET `url`, body as text (None when unreachable).
pub(super) fn get(url: &str) -> Option<String> {
    ureq::get(url).call().ok()?.body_mut().read_to_string().ok()
}

/// Prometheus scraping the agent at `127.0.0.1:target_port` with the bundled scrape
/// configuration (`deploy/prometheus/scrape-config.yml`), its port and interval (1 s) aside.
pub(super) fn prometheus(dir: &std::path::Path, target_port: u16) -> (Neighbour, u16) {
    require("prometheus");
    let port = free_port();
    let config = dir.join("prometheus.yml");
    let bundled = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/prometheus/scrape-config.yml"
    ))
    .expect("bundled scrape config");
    let scrape = bundled
        .replace("'127.0.0.1:9977'", &format!("'127.0.0.1:{target_port}'"))
        .replace("scrape_interval: 15s", "scrape_interval: 1s");
    assert!(
        scrape.contains(&format!("'127.0.0.1:{target_port}'"))
            && scrape.contains("scrape_interval: 1s"),
        "the bundled scrape config changed shape: {bundled}"
    );
    std::fs::write(&config, format!("global:\n  scrape_interval: 1s\n{scrape}"))
        .expect("write prometheus.yml");
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    (Neighbour(child), port)
}

/// The PromQL query URL of Prometheus on `port` for `pid`'s CLOSE_WAIT sockets.
pub(super) fn close_wait_query(port: u16, pid: u32) -> String {
    format!(
        "http://127.0.0.1:{port}/api/v1/query?query=tcpwait_process_close_wait_sockets%7Bpid%3D%22{pid}%22%7D"
    )
}

/// Alertmanager on a free port, its files in `dir`, once it answers `/-/ready`.
pub(super) fn ready_alertmanager(dir: &std::path::Path) -> (Neighbour, u16) {
    let port = free_port();
    let am = alertmanager(dir, port, None);
    assert!(
        wait_until(Duration::from_secs(20), || get(&format!(
            "http://127.0.0.1:{port}/-/ready"
        ))
        .is_some()),
        "Alertmanager never became ready"
    );
    (am, port)
}

/// Alerts Alertmanager on `port` holds (active ones: resolved alerts are not listed) that
/// `keep` keeps.
pub(super) fn am_active(port: u16, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    let Some(body) = get(&format!("http://127.0.0.1:{port}/api/v2/alerts")) else {
        return vec![];
    };
    let all: Vec<Value> = serde_json::from_str(&body).unwrap_or_default();
    all.into_iter().filter(|a| keep(a)).collect()
}

/// Alerts Alertmanager holds for `pid`.
pub(super) fn am_alerts(port: u16, pid: u32) -> Vec<Value> {
    am_active(port, |a| {
        a["labels"]["pid"].as_str() == Some(pid.to_string().as_str())
    })
}

/// Alerts Alertmanager holds with label `rule` = `rule` and `netns` = `netns`.
pub(super) fn am_alerts_of(port: u16, rule: &str, netns: u64) -> Vec<Value> {
    am_active(port, |a| {
        a["labels"]["rule"] == rule && a["labels"]["netns"] == netns.to_string().as_str()
    })
}
